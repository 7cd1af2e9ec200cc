"""Turn botocore/aiohttp exceptions into moverd's errors, and tell transient ones apart.

Callers of a storage only know :class:`moverd.StorageError` and :class:`moverd.NotFoundError`;
the message must name the bucket and key (or the endpoint, when the server was not reached) so
that an operator reading the job status in SciCat knows where to look. Secrets never appear:
botocore's messages do not contain them and we add only names.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    IncompleteReadError,
    NoCredentialsError,
    PartialCredentialsError,
)
from botocore.exceptions import (
    ConnectionError as BotoConnectionError,
)

from moverd import NotFoundError, StorageError

NOT_FOUND_CODES = frozenset({"NoSuchKey", "NotFound", "404", "NoSuchBucket"})


class PrematureEndError(Exception):
    """The body ended before the bytes the server announced: treated like a connection reset."""


def error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", "") or "")


def http_status(exc: ClientError) -> int:
    meta: Any = exc.response.get("ResponseMetadata", {})
    return int(meta.get("HTTPStatusCode") or 0)


def where(bucket: str, key: str | None) -> str:
    return f"s3 {bucket}/{key}" if key else f"s3 {bucket}"


def to_storage_error(
    exc: BaseException, *, bucket: str, key: str | None, endpoint: str, action: str = ""
) -> StorageError:
    """The moverd error for ``exc``; ``action`` (``"upload"``) prefixes the reason when given."""
    if isinstance(exc, StorageError):
        return exc
    place = where(bucket, key)
    doing = f"{action} failed: " if action else ""
    if isinstance(exc, ClientError):
        code = error_code(exc)
        message = str(exc.response.get("Error", {}).get("Message", "") or "").strip()
        if code == "NoSuchBucket":
            return NotFoundError(f"{place}: bucket {bucket!r} does not exist at {endpoint}")
        if code in NOT_FOUND_CODES:
            return NotFoundError(f"{place}: no such object")
        if not message:
            message = f"HTTP {http_status(exc)}" if http_status(exc) else "no message"
        return StorageError(f"{place}: {doing}{code or 'error'}: {message}")
    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        return StorageError(
            f"{place}: no usable credentials: set access_key_id and secret_access_key "
            "(or their *_file) or the AWS_* environment"
        )
    if isinstance(exc, (BotoConnectionError, HTTPClientError, aiohttp.ClientError, OSError, TimeoutError)):
        return StorageError(f"{place}: {doing}cannot talk to {endpoint}: {_reason(exc)}")
    if isinstance(exc, (BotoCoreError, PrematureEndError)):
        return StorageError(f"{place}: {doing}{_reason(exc)}")
    return StorageError(f"{place}: {doing}{type(exc).__name__}: {exc}")


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def is_transient(exc: BaseException) -> bool:
    """A broken or stalled connection that a new request from the same position may cure.

    Server answers (ClientError) are not: botocore already retried those that deserve it
    (5xx, throttling) ``max_attempts`` times before raising.
    """
    return isinstance(
        exc,
        (
            BotoConnectionError,  # endpoint unreachable, connect timeout
            HTTPClientError,  # connection closed, read timeout, ResponseStreamingError
            IncompleteReadError,
            PrematureEndError,
            aiohttp.ClientPayloadError,
            aiohttp.ClientConnectionError,
            asyncio.TimeoutError,
            ConnectionError,
        ),
    )
