"""Streaming reads of one object (or a byte range) through aiobotocore (``fast_get = false``),
resumed transparently when the stream breaks.

A GET of a multi-gigabyte object lasts long enough for a connection to be reset, a proxy to time
out or a MinIO node to restart. botocore retries the request, but not a body that breaks half
way, so the reader re-issues a ranged GET from the byte it got to, pinned to the object's ETag
with ``If-Match``: if the object was replaced meanwhile, the resumed read fails instead of
splicing two versions together. The lean path (:mod:`.lean`) resumes the same way, on the same
errors (:func:`.errors.is_transient`) and with the same answer to a 412
(:func:`.errors.replaced_error`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from typing import Any

from moverd import ObjectInfo, SourceChangedError, StorageError, retry_async

from .errors import (
    PrematureEndError,
    Waits,
    client_error_code,
    is_transient,
    replaced_error,
    to_storage_error,
    within,
)

log = logging.getLogger(__name__)

ClientGetter = Callable[[], Coroutine[Any, Any, Any]]


def range_header(start: int, end: int | None) -> str:
    """``bytes=start-`` or ``bytes=start-(end-1)`` for the half-open range [start, end)."""
    return f"bytes={start}-" if end is None else f"bytes={start}-{end - 1}"


class S3Reader:
    """Bytes [start, end) of one object; ``end`` comes from the first response's Content-Length."""

    def __init__(
        self, *, client: ClientGetter, bucket: str, key: str, full_key: str, endpoint: str,
        start: int, end: int, etag: str | None, body: Any, attempts: int,
        expect: ObjectInfo | None = None, deadline: float = 120.0, waits: Waits | None = None,
    ) -> None:
        self._client = client
        self._bucket = bucket
        self._key = key
        self._full_key = full_key
        self._endpoint = endpoint
        self._pos = start
        self._end = end
        self._etag = etag
        self._body = body
        self._attempts = attempts
        self._expect = expect
        self._deadline = deadline
        self._waits = waits
        self.resumes = 0
        """How many times the stream was re-opened after a break (for tests and metrics)."""

    @classmethod
    def empty(cls, **kw: Any) -> S3Reader:
        return cls(start=0, end=0, etag=None, body=None, **kw)

    async def readinto(self, buf: memoryview) -> int:
        if self._pos >= self._end or len(buf) == 0:
            if self._pos >= self._end:
                self._close_body()
            return 0
        want = min(len(buf), self._end - self._pos)
        try:
            data = await self._read(want)
        except (StorageError, SourceChangedError):
            raise
        except Exception as exc:
            if not is_transient(exc):
                raise self._error(exc) from exc
            self._close_body()
            data = await self._read_resuming(want, exc)
        n = len(data)
        buf[:n] = data
        self._pos += n
        if self._pos >= self._end:
            self._close_body()
        return n

    async def _read(self, want: int) -> bytes:
        if self._body is None:
            await self._reopen()
        data: bytes = await self._body.read(want)
        if not data:
            raise PrematureEndError(
                f"stream ended at byte {self._pos}, expected {self._end}"
            )
        return data

    async def _read_resuming(self, want: int, first: BaseException) -> bytes:
        log.warning(
            "s3 %s/%s: stream broke at byte %d (%s: %s), resuming",
            self._bucket, self._key, self._pos, type(first).__name__, first,
        )

        async def attempt() -> bytes:
            try:
                return await self._read(want)
            except BaseException:
                self._close_body()
                raise

        try:
            # The resumes together get ``request_timeout``, as one request would.
            return await within(
                retry_async(
                    attempt, retryable=is_transient, attempts=self._attempts,
                    what=f"resumed read of s3 {self._bucket}/{self._key} at byte {self._pos}",
                ),
                self._deadline, endpoint=self._endpoint,
                request=f"GET {self._bucket}/{self._full_key} (resumed at byte {self._pos})",
            )
        except (StorageError, SourceChangedError):
            raise
        except Exception as exc:
            raise self._error(exc, f"read at byte {self._pos} (resumed)") from exc

    async def _reopen(self) -> None:
        self.resumes += 1
        client = await self._client()
        kwargs: dict[str, Any] = {
            "Bucket": self._bucket, "Key": self._full_key, "Range": range_header(self._pos, self._end),
        }
        if self._etag:
            kwargs["IfMatch"] = self._etag
        try:
            resp = await client.get_object(**kwargs)
        except Exception as exc:
            if client_error_code(exc) == "PreconditionFailed":
                raise replaced_error(self._bucket, self._key, self._expect, self._pos) from None
            raise
        self._body = resp["Body"]

    def _error(self, exc: BaseException, action: str = "read") -> StorageError:
        if isinstance(exc, StorageError):
            return exc
        return to_storage_error(
            exc, bucket=self._bucket, key=self._key, endpoint=self._endpoint, action=action,
            request=f"GET {self._bucket}/{self._full_key} (at byte {self._pos})", waits=self._waits,
        )

    def _close_body(self) -> None:
        # Closing a body that was not read to the end drops its connection rather than
        # returning a half-read stream to the pool; a fully read one was already released.
        body, self._body = self._body, None
        if body is not None:
            try:
                body.close()
            except Exception:
                log.debug("closing an S3 response body failed", exc_info=True)

    async def aclose(self) -> None:
        self._close_body()
        self._pos = self._end
