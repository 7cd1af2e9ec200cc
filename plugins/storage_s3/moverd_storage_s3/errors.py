"""Turn botocore/aiohttp and lean-client exceptions into moverd's errors; tell transient ones apart.

Callers of a storage only know :class:`moverd.StorageError` and :class:`moverd.NotFoundError`;
the message must name the bucket and key (or the endpoint, when the server was not reached) so
that an operator reading the job status in SciCat knows where to look. Secrets never appear:
botocore's messages do not contain them and we add only names.

botocore and aiohttp are not imported here: the lean path (:mod:`.fastget`) must not load them.
Their exception classes are looked up in ``sys.modules`` instead: a module that was never
imported cannot have raised anything.
"""

from __future__ import annotations

import asyncio
import sys
from typing import TYPE_CHECKING, Any

from moverd import NotFoundError, StorageError

if TYPE_CHECKING:
    from botocore.exceptions import ClientError

NOT_FOUND_CODES = frozenset({"NoSuchKey", "NotFound", "404", "NoSuchBucket"})


class PrematureEndError(Exception):
    """The body ended before the bytes the server announced: treated like a connection reset."""


class HTTPStatusError(Exception):
    """An error answer of the S3 server to the lean client (:mod:`.fastget`)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{code or 'HTTP ' + str(status)}: {message}".rstrip(": "))
        self.status, self.code, self.message = status, code, message


class TransientHTTPError(HTTPStatusError):
    """A 5xx or throttling answer: worth another attempt."""


def _loaded(module: str, *names: str) -> tuple[type[BaseException], ...]:
    """The named exception classes of ``module`` if it is imported, else none."""
    mod = sys.modules.get(module)
    return tuple(getattr(mod, name) for name in names) if mod is not None else ()


def client_error_code(exc: BaseException) -> str | None:
    """The S3 error code of a botocore ``ClientError``; None for any other exception."""
    if isinstance(exc, _loaded("botocore.exceptions", "ClientError")):
        return error_code(exc)
    return None


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
    code = client_error_code(exc)
    status = 0
    message = ""
    if code is not None:
        message = str(exc.response.get("Error", {}).get("Message", "") or "").strip()  # type: ignore[attr-defined]
        status = http_status(exc)
    elif isinstance(exc, HTTPStatusError):
        code, message, status = exc.code, exc.message.strip(), exc.status
        if not code and status == 404:
            code = "404"  # no error document (a HEAD): as botocore names it
    if code is not None:
        if code == "NoSuchBucket":
            return NotFoundError(f"{place}: bucket {bucket!r} does not exist at {endpoint}")
        if code in NOT_FOUND_CODES:
            return NotFoundError(f"{place}: no such object")
        if not message:
            message = f"HTTP {status}" if status else "no message"
        return StorageError(f"{place}: {doing}{code or 'error'}: {message}")
    if isinstance(exc, _loaded("botocore.exceptions", "NoCredentialsError", "PartialCredentialsError")):
        return StorageError(
            f"{place}: no usable credentials: set access_key_id and secret_access_key "
            "(or their *_file) or the AWS_* environment"
        )
    connection = (
        *_loaded("botocore.exceptions", "ConnectionError", "HTTPClientError"),
        *_loaded("aiohttp", "ClientError"),
        OSError,
        TimeoutError,
    )
    if isinstance(exc, connection):
        return StorageError(f"{place}: {doing}cannot talk to {endpoint}: {_reason(exc)}")
    if isinstance(exc, (*_loaded("botocore.exceptions", "BotoCoreError"), PrematureEndError)):
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
            # endpoint unreachable, connect timeout; connection closed, read timeout,
            # ResponseStreamingError; a body shorter than announced
            *_loaded("botocore.exceptions", "ConnectionError", "HTTPClientError", "IncompleteReadError"),
            PrematureEndError,
            *_loaded("aiohttp", "ClientPayloadError", "ClientConnectionError"),
            asyncio.TimeoutError,
            ConnectionError,
        ),
    )
