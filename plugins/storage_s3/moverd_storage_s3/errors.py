"""Turn botocore/aiohttp/urllib3 exceptions into moverd's errors; tell transient ones apart.

Callers of a storage only know :class:`moverd.StorageError` and :class:`moverd.NotFoundError`;
the message must name the bucket and key (or the endpoint, when the server was not reached) so
that an operator reading the job status in SciCat knows where to look. Secrets never appear:
botocore's messages do not contain them and we add only names.

Both read paths (the lean one, :mod:`.lean`, and aiobotocore's, :mod:`.reader`) retry and resume
on the same errors (:func:`is_transient`, :data:`RETRY_STATUS`, :data:`RETRY_CODES`) with moverd's
policy (:func:`moverd.retry_blocking` / :func:`moverd.retry_async`). No client library is imported
here: their exception classes are looked up in ``sys.modules`` instead, since a module that was
never imported cannot have raised anything, and a storage that never writes never loads aiohttp.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from moverd import NotFoundError, ObjectInfo, SourceChangedError, StorageError

if TYPE_CHECKING:
    from botocore.exceptions import ClientError

NOT_FOUND_CODES = frozenset({"NoSuchKey", "NotFound", "404", "NoSuchBucket"})
RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
"""Statuses retried whatever the answer looks like (a proxy's error page in front of S3 too)."""
RETRY_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottled",
    "RequestThrottledException", "TooManyRequestsException", "RequestLimitExceeded",
    "BandwidthLimitExceeded", "RequestTimeout", "RequestTimeoutException", "PriorRequestNotComplete",
    "InternalError", "ServiceUnavailable",
})
"""Error codes retried whatever the status: botocore's standard-mode throttling and transient
codes (what aiobotocore's calls retry), and S3's own names for a 500 and a 503."""
T = TypeVar("T")

NOT_S3_KEY = "MoverdNotS3"
"""Where the aiobotocore client's ``before-parse`` handler leaves what an error answer that was
not S3's looked like (see :func:`not_s3_answer`), in the ``ClientError``'s response."""


class NoAnswerError(Exception):
    """A request that got no answer (or no more bytes of one) within its timeout, retries
    included. ``request`` is what was asked (``GET bucket/key``), ``seconds`` how long the last
    wait was allowed to take."""

    def __init__(
        self, request: str, seconds: float, attempts: int = 1, *, connect: bool = False,
        request_timeout: bool = False,
    ) -> None:
        notes = [f"{attempts} attempts"] if attempts > 1 else []
        if request_timeout:
            notes.append("request_timeout")
        waited = "no connection for" if connect else "no answer to"
        tail = f" ({', '.join(notes)})" if notes else ""
        super().__init__(f"{waited} {request} within {seconds:g} s{tail}")
        self.request, self.seconds, self.attempts = request, seconds, attempts


class NotS3Error(Exception):
    """An error answer without S3's XML error document: the endpoint is not (only) S3, such as
    a web server or another service's path. Reported as such, never as a missing object."""

    def __init__(self, status: int, reason: str, content_type: str, start: bytes) -> None:
        shown = start[:120].decode("utf-8", "replace")
        shown = " ".join(shown.split())
        super().__init__(
            f"the endpoint did not answer like S3: HTTP {status} {reason}".rstrip()
            + f", Content-Type {content_type or 'none'}"
            + (f", body starts {shown!r}" if shown else ", no body")
        )
        self.status = status


def not_s3_answer(status: int, content_type: str, body: bytes | None) -> bool:
    """An error answer S3 would not give: S3 sends an XML ``<Error>`` document with every error
    but a HEAD's. A HEAD's answer (``body`` None) cannot be told apart (some S3 servers label
    even that one ``text/html``), so it counts as S3's. A 5xx page of a proxy in front of S3 is
    still worth a retry, so callers keep retrying those whatever they look like."""
    if body is None:
        return False
    text = body.lstrip()
    if not text:
        return "xml" not in content_type.lower()
    return not (text.startswith(b"<?xml") or text.startswith(b"<Error"))


def quoted_etag(etag: str) -> str:
    """``If-Match`` takes the ETag as S3 sends it, in quotes (listings give it without)."""
    return etag if etag.startswith('"') or etag.startswith('W/"') else f'"{etag}"'


def changed_error(bucket: str, key: str, expect: ObjectInfo, found: str = "") -> SourceChangedError:
    listed = f"listed with ETag {expect.etag}, " if expect.etag else "listed with "
    listed += f"{expect.size} bytes"
    return SourceChangedError(
        f"{where(bucket, key)}: the object changed while it was read ({listed}"
        f"{'; ' + found if found else ''}): not archived, archive again once it is complete"
    )


def replaced_error(bucket: str, key: str, expect: ObjectInfo | None, pos: int) -> SourceChangedError | StorageError:
    """A resumed GET answered 412: the ETag it was pinned to is no longer the object's."""
    if expect is not None:
        return changed_error(bucket, key, expect)
    return StorageError(f"{where(bucket, key)}: the object was replaced while being read (at byte {pos})")


def check_version(bucket: str, key: str, expect: ObjectInfo, *, etag: str | None, size: int | None) -> None:
    """Raise :class:`~moverd.SourceChangedError` unless the answer is the listed version."""
    if expect.etag and etag and etag.strip('"') != expect.etag.strip('"'):
        raise changed_error(bucket, key, expect, f"now ETag {etag.strip(chr(34))}")
    if size is not None and size != expect.size:
        raise changed_error(bucket, key, expect, f"now {size} bytes")


def total_size(content_range: str | None, length: int, start: int) -> int | None:
    """The object's size from a GET answer: ``Content-Range: bytes a-b/total`` of a ranged one,
    Content-Length of a whole one; None when a ranged answer does not say."""
    if content_range:
        total = content_range.rpartition("/")[2].strip()
        return int(total) if total.isdigit() else None
    return length if start == 0 else None


class PrematureEndError(Exception):
    """The body ended before the bytes the server announced: treated like a connection reset."""


class HTTPStatusError(Exception):
    """An error answer of the S3 server to the lean client (:mod:`.lean`)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{code or 'HTTP ' + str(status)}: {message}".rstrip(": "))
        self.status, self.code, self.message = status, code, message


class TransientHTTPError(HTTPStatusError):
    """A 5xx or throttling answer: worth another attempt."""


def _loaded(module: str, *names: str) -> tuple[type[BaseException], ...]:
    """The named exception classes of ``module`` if it is imported, else none. A module that
    another thread is still importing (aiobotocore's first client opens while lean reads run in
    worker threads) may lack some yet: those are left out, as nothing can have raised them."""
    mod = sys.modules.get(module)
    if mod is None:
        return ()
    found = (getattr(mod, name, None) for name in names)
    return tuple(cls for cls in found if isinstance(cls, type) and issubclass(cls, BaseException))


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


@dataclass(frozen=True)
class Waits:
    """The storage's timeouts, for naming what a timed-out request waited for."""

    connect: float
    read: float
    attempts: int


def timeout_kind(exc: BaseException) -> str | None:
    """``"connect"`` or ``"read"`` for a timeout botocore/aiohttp gave up on, else None."""
    if isinstance(exc, _loaded("botocore.exceptions", "ConnectTimeoutError")):
        return "connect"
    if isinstance(exc, (*_loaded("botocore.exceptions", "ReadTimeoutError"),
                        *_loaded("aiohttp", "ServerTimeoutError"), TimeoutError, asyncio.TimeoutError)):
        return "read"
    return None


def to_storage_error(
    exc: BaseException, *, bucket: str, key: str | None, endpoint: str, action: str = "",
    request: str = "", waits: Waits | None = None,
) -> StorageError:
    """The moverd error for ``exc``; ``action`` (``"upload"``) prefixes the reason when given.
    A timeout names ``request`` (``"GET bucket/key"``) and the wait of ``waits`` it exceeded."""
    if isinstance(exc, StorageError):
        return exc
    place = where(bucket, key)
    doing = f"{action} failed: " if action else ""
    if isinstance(exc, NoAnswerError):
        return StorageError(f"s3 {endpoint}: {exc}")
    kind = timeout_kind(exc)
    if kind is not None and waits is not None:
        asked = request or (f"{action} of {bucket}/{key or ''}" if action else f"{bucket}/{key or ''}")
        seconds = waits.connect if kind == "connect" else waits.read
        waited = NoAnswerError(asked, seconds, waits.attempts, connect=kind == "connect")
        return StorageError(f"s3 {endpoint}: {waited}")
    if isinstance(exc, NotS3Error):
        return StorageError(f"{place}: {doing}{endpoint}: {exc}")
    code = client_error_code(exc)
    status = 0
    message = ""
    if code is not None:
        seen = exc.response.get(NOT_S3_KEY)  # type: ignore[attr-defined]
        if seen:
            return StorageError(f"{place}: {doing}{endpoint}: {seen}")
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
        *_loaded("urllib3.exceptions", "HTTPError"),
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
    """Worth another attempt from the same position, on either read path: a broken, refused or
    stalled connection, a body shorter than announced, and the lean client's 5xx/throttling
    answers (:class:`TransientHTTPError`).

    aiobotocore's answers (ClientError) are not: botocore already retried those that deserve it
    (the same statuses and codes, standard mode) ``max_attempts`` times before raising. Neither is
    a certificate that does not verify: another attempt would fail the same way.
    """
    if isinstance(exc, (*_loaded("ssl", "SSLCertVerificationError"), *_loaded("urllib3.exceptions", "SSLError"))):
        return False
    return isinstance(
        exc,
        (
            TransientHTTPError,
            PrematureEndError,
            # endpoint unreachable, connect timeout; connection closed, read timeout,
            # ResponseStreamingError; a body shorter than announced
            *_loaded("botocore.exceptions", "ConnectionError", "HTTPClientError", "IncompleteReadError"),
            *_loaded("aiohttp", "ClientPayloadError", "ClientConnectionError"),
            *_loaded("urllib3.exceptions", "ProtocolError", "NewConnectionError", "ConnectTimeoutError",
                     "ReadTimeoutError"),
            *_loaded("http.client", "HTTPException"),
            asyncio.TimeoutError,
            OSError,
        ),
    )


async def within(call: Awaitable[T], seconds: float, *, endpoint: str, request: str) -> T:
    """``call`` (one aiobotocore request, botocore's retries included) within ``request_timeout``:
    ``max_attempts`` waits of ``read_timeout`` on a silent endpoint would add up to many minutes.
    A timeout the call raises itself stays the call's error; only this bound's becomes the
    ``no answer ... (request_timeout)`` error."""
    bound = asyncio.timeout(seconds)
    try:
        async with bound:
            return await call
    except TimeoutError:
        if not bound.expired():
            raise
    raise StorageError(f"s3 {endpoint}: {NoAnswerError(request, seconds, request_timeout=True)}")
