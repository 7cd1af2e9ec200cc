"""Streaming multipart upload with bounded memory.

Incoming chunks are copied into part buffers of ``part_size``; each full part is uploaded in the
background while the next one fills, at most ``upload_concurrency`` at once. The buffers are
reused from a pool of ``upload_concurrency + 1``, so memory stays at that many parts whatever the
object's size. A part is sent only when the next byte arrives, so an object that fits in one
part is written with a single PutObject and no multipart upload at all.

S3 takes at most 10 000 parts. An object whose expected size (the datablock's, known from its
plan) needs more parts than that at ``part_size`` is written in bigger parts, so a datablock
larger than the setting allows is not refused at part 10 001, after the first 10 000 were sent;
an object that outgrows its size hint fails there with an error that says which setting to
raise.

Every part carries its CRC32 (``x-amz-checksum-crc32``, computed in a worker thread beside the
other parts' uploads), which the server checks on receipt, and the upload declares a
full-object checksum (or COMPOSITE, for servers without one), which :meth:`object_checksum`
gives after the commit: see :mod:`.crc`. The storage class, if configured, is set on the object.

Background uploads are plain asyncio tasks because the writer's life spans several calls from
its owner (``write``... ``commit``) and aiobotocore runs on asyncio anyway. Every path that
does not commit ends in :meth:`abort`, which cancels them and aborts the upload so that no
invisible (but billed) parts stay behind.
"""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from moverd import StorageError, Writer, format_size

from . import crc
from .errors import Waits, to_storage_error, within
from .options import MAX_PART_SIZE, MIB

log = logging.getLogger(__name__)

T = TypeVar("T")

ClientGetter = Callable[[], Coroutine[Any, Any, Any]]
"""The storage's aiobotocore client, opened on first use."""

MIN_FIRST_BUFFER = 64 * 1024

MAX_PARTS = 10_000
"""S3's largest part number."""

HINT_MARGIN = 1.01
"""Room kept above the size hint when parts are sized for it. A datablock's hint is an upper
bound of its tar (its plan's estimate), but a caller's hint may fall short."""


def part_size_for(part_size: int, size_hint: int | None) -> int:
    """``part_size``, or the smallest whole MiB that fits an object of ``size_hint`` and 1 % more
    in :data:`MAX_PARTS` parts (at most 5 GiB parts: the margin then gives way)."""
    if size_hint is None or size_hint * HINT_MARGIN <= part_size * MAX_PARTS:
        return part_size
    if size_hint > MAX_PART_SIZE * MAX_PARTS:
        raise StorageError(
            f"an object of {format_size(size_hint)} cannot be uploaded: S3 takes at most {MAX_PARTS} "
            f"parts of {format_size(MAX_PART_SIZE)}"
        )
    need = -(-int(size_hint * HINT_MARGIN) // MAX_PARTS)
    return min(-(-need // MIB) * MIB, MAX_PART_SIZE)


class PartBody(io.RawIOBase):
    """A read-only, seekable file over part of a buffer, without copying it.

    Given a file, aiohttp streams the body in chunks read in a worker thread; given a bytes-like
    object it would push it in one call that may stall the event loop (and warns about it).
    botocore seeks back to the start to retry a part. :meth:`release` drops the view so the
    buffer can be reused.
    """

    def __init__(self, view: memoryview) -> None:
        super().__init__()
        self._view = view
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def __len__(self) -> int:
        return len(self._view)

    def readinto(self, b: Any) -> int:
        n = min(len(b), len(self._view) - self._pos)
        b[:n] = self._view[self._pos : self._pos + n]
        self._pos += n
        return n

    def read(self, size: int | None = -1) -> bytes:
        end = len(self._view) if size is None or size < 0 else min(len(self._view), self._pos + size)
        data = bytes(self._view[self._pos : end])
        self._pos = max(self._pos, end)
        return data

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._view)}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def release(self) -> None:
        try:
            self._view.release()
        except BufferError:
            # A cancelled request's worker thread still holds a slice; it goes with the thread.
            pass


class BufferPool:
    """At most ``limit`` part buffers, allocated on demand and handed back after each upload."""

    def __init__(self, part_size: int, limit: int) -> None:
        self.part_size = part_size
        self.limit = limit
        self.allocated = 0
        self._free: asyncio.Queue[bytearray] = asyncio.Queue()

    async def get(self, size: int | None = None) -> bytearray:
        """A free buffer (waiting for one when all are in use); a new one may be ``size`` long."""
        if self._free.empty() and self.allocated < self.limit:
            self.allocated += 1
            return bytearray(size or self.part_size)
        return await self._free.get()

    def put(self, buf: bytearray) -> None:
        self._free.put_nowait(buf)


class MultipartWriter(Writer):
    """One object being uploaded; see the module docstring."""

    def __init__(
        self, *, client: ClientGetter, bucket: str, key: str, full_key: str, endpoint: str,
        part_size: int, concurrency: int, size_hint: int | None,
        deadline: float = 120.0, waits: Waits | None = None, storage_class: str | None = None,
        checksum_type: str = "FULL_OBJECT",
    ) -> None:
        self._client = client
        self._bucket = bucket
        self._key = key
        self._full_key = full_key
        self._endpoint = endpoint
        self._part_size = part_size_for(part_size, size_hint)
        if self._part_size != part_size:
            log.info(
                "s3 %s/%s: parts of %s instead of part_size %s, for an object of %s (S3 takes at most "
                "%d parts); the upload buffers take up to %s", bucket, key, format_size(self._part_size),
                format_size(part_size), format_size(size_hint or 0), MAX_PARTS,
                format_size(self._part_size * (concurrency + 1)),
            )
        self._configured_part_size = part_size
        self._deadline = deadline
        self._waits = waits
        self._request = f"PUT {bucket}/{full_key}"
        self._pool = BufferPool(self._part_size, concurrency + 1)
        self._slots = asyncio.Semaphore(concurrency)
        # A small object does not need a whole part's buffer; it grows if the hint was low.
        self._first_size = (
            self._part_size if size_hint is None else min(self._part_size, max(size_hint, MIN_FIRST_BUFFER))
        )
        self._buf: bytearray | None = None
        self._fill = 0
        self._upload_id: str | None = None
        self._next_part = 1
        self._etags: dict[int, str] = {}
        self._crcs: dict[int, tuple[int, int]] = {}
        """Part number → (CRC32, size) of the parts uploaded."""
        self._class = {"StorageClass": storage_class} if storage_class else {}
        self._checksum_type = checksum_type
        self._object_checksum: str | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._failure: BaseException | None = None
        self._state = "open"
        self.size = 0
        self._in_flight = 0
        self.parts_in_flight_peak = 0
        """The most part uploads seen running at once (for tests and metrics)."""

    @property
    def buffers_allocated(self) -> int:
        return self._pool.allocated

    async def write(self, data: memoryview | bytes) -> None:
        self._check_open()
        view = memoryview(data)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        total = len(view)
        pos = 0
        try:
            while pos < total:
                if self._buf is None:
                    self._buf = await self._pool.get(self._first_size)
                    self._first_size = self._part_size
                    self._fill = 0
                elif self._fill == len(self._buf):
                    if self._fill < self._part_size:
                        self._buf.extend(bytes(self._part_size - self._fill))
                    else:
                        buf, self._buf = self._buf, None
                        await self._start_part(buf, self._fill)
                        continue
                n = min(total - pos, len(self._buf) - self._fill)
                self._buf[self._fill : self._fill + n] = view[pos : pos + n]
                self._fill += n
                pos += n
            self.size += total
        except StorageError:
            raise
        except Exception as exc:
            raise await self._fail(exc, "upload") from exc

    async def commit(self) -> None:
        self._check_open()
        try:
            client = await self._client()
            last, self._buf = self._buf, None
            if self._upload_id is None:
                await self._put_single(client, last)
            else:
                if last is not None:
                    await self._start_part(last, self._fill)
                if self._tasks:
                    await asyncio.wait(set(self._tasks))
                self._check_failure()
                if len(self._etags) != self._next_part - 1:
                    raise StorageError(
                        f"s3 {self._bucket}/{self._key}: {self._next_part - 1 - len(self._etags)} "
                        "part(s) did not finish (upload aborted)"
                    )
                numbers = sorted(self._etags)
                parts = [
                    {"PartNumber": n, "ETag": self._etags[n], "ChecksumCRC32": crc.encode(self._crcs[n][0])}
                    for n in numbers
                ]
                sums = [self._crcs[n] for n in numbers]
                whole: dict[str, str] = {}
                if self._checksum_type == "FULL_OBJECT":
                    value = crc.encode(crc.full_object(sums))
                    whole = {"ChecksumCRC32": value, "ChecksumType": "FULL_OBJECT"}
                    checksum = crc.PREFIX + value
                else:
                    checksum = crc.PREFIX + crc.composite(sums)
                await self._bounded(client.complete_multipart_upload(
                    Bucket=self._bucket, Key=self._full_key, UploadId=self._upload_id,
                    MultipartUpload={"Parts": parts}, **whole,
                ), "CompleteMultipartUpload")
                self._object_checksum = checksum
        except StorageError as exc:
            await self._abort_quietly()
            raise exc
        except Exception as exc:
            raise await self._fail(exc, "upload") from exc
        self._state = "committed"

    def object_checksum(self) -> str | None:
        """``crc32:<base64>`` (``-N`` appended when COMPOSITE) as S3 reports it for the committed
        object, computed from the bytes this writer was given."""
        return self._object_checksum if self._state == "committed" else None

    async def abort(self) -> None:
        if self._state in ("committed", "aborted"):
            return
        await self._abort_quietly()

    async def _put_single(self, client: Any, buf: bytearray | None) -> None:
        """The whole object fits in one part: one PutObject, no multipart upload."""
        if buf is None or self._fill == 0:
            await self._bounded(client.put_object(
                Bucket=self._bucket, Key=self._full_key, Body=b"", ChecksumAlgorithm=crc.ALGORITHM,
                ChecksumCRC32=crc.encode(0), **self._class,
            ), "PUT")
            self._object_checksum = crc.PREFIX + crc.encode(0)
            return
        view = memoryview(buf)[: self._fill]
        value = crc.encode(await _crc_of(view))
        body = PartBody(view)
        try:
            await self._bounded(client.put_object(
                Bucket=self._bucket, Key=self._full_key, Body=body, ChecksumAlgorithm=crc.ALGORITHM,
                ChecksumCRC32=value, **self._class,
            ), "PUT")
        finally:
            body.release()
        self._object_checksum = crc.PREFIX + value

    async def _start_part(self, buf: bytearray, size: int) -> None:
        """Start uploading a full buffer as the next part (waiting for a free upload slot)."""
        self._check_failure()
        if self._next_part > MAX_PARTS:
            raise StorageError(
                f"s3 {self._bucket}/{self._key}: the object outgrew {MAX_PARTS} parts of "
                f"{format_size(self._part_size)} (more than {format_size(MAX_PARTS * self._part_size)}), the "
                f"most S3 takes; raise part_size (now {format_size(self._configured_part_size)}) for objects "
                "this big"
            )
        client = await self._client()
        if self._upload_id is None:
            resp = await self._bounded(
                client.create_multipart_upload(
                    Bucket=self._bucket, Key=self._full_key, ChecksumAlgorithm=crc.ALGORITHM,
                    ChecksumType=self._checksum_type, **self._class,
                ), "CreateMultipartUpload"
            )
            self._upload_id = str(resp["UploadId"])
        await self._slots.acquire()
        number = self._next_part
        self._next_part += 1
        task = asyncio.create_task(self._upload_part(client, number, buf, size))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self._in_flight += 1
        self.parts_in_flight_peak = max(self.parts_in_flight_peak, self._in_flight)

    async def _upload_part(self, client: Any, number: int, buf: bytearray, size: int) -> None:
        view = memoryview(buf)[:size]
        body = PartBody(view)
        try:
            part_crc = await _crc_of(view)
            resp = await self._bounded(client.upload_part(
                Bucket=self._bucket, Key=self._full_key, UploadId=self._upload_id,
                PartNumber=number, Body=body, ChecksumCRC32=crc.encode(part_crc),
            ), f"UploadPart {number} of")
            self._crcs[number] = (part_crc, size)
            self._etags[number] = str(resp["ETag"])
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if self._failure is None:
                self._failure = exc
            log.debug("s3 %s/%s: part %d failed: %s", self._bucket, self._key, number, exc)
        finally:
            body.release()
            self._in_flight -= 1
            self._slots.release()
            # Handed back even after a failure, so a writer waiting for a buffer wakes up and
            # sees the failure; the buffer is not touched again by this (finished) request.
            self._pool.put(buf)

    async def _bounded(self, call: Awaitable[T], method: str) -> T:
        """One request, botocore's retries included, within ``request_timeout`` (a part's
        upload included: raise it for big parts over slow links)."""
        return await within(call, self._deadline, endpoint=self._endpoint,
                            request=f"{method} {self._bucket}/{self._full_key}")

    def _check_open(self) -> None:
        if self._state != "open":
            raise StorageError(f"s3 {self._bucket}/{self._key}: writer already {self._state}")

    def _check_failure(self) -> None:
        if self._failure is not None:
            raise self._failure

    async def _fail(self, exc: BaseException, action: str) -> StorageError:
        """Abort everything, then give the error to raise (the first part failure if any)."""
        cause = self._failure or exc
        await self._abort_quietly()
        err = to_storage_error(
            cause, bucket=self._bucket, key=self._key, endpoint=self._endpoint, action=action,
            request=self._request, waits=self._waits,
        )
        return StorageError(f"{err} (upload aborted)") if type(err) is StorageError else err

    async def _abort_quietly(self) -> None:
        """Cancel part uploads, abort the multipart upload; log, never raise, on cleanup errors."""
        self._state = "aborted"
        self._buf = None
        tasks = set(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        upload_id, self._upload_id = self._upload_id, None
        if upload_id is None:
            return
        try:
            client = await self._client()
            # One attempt's wait, not a whole request_timeout: the abort follows a failure that
            # often already took that long, and a bucket lifecycle rule is the backstop.
            bound = self._waits.connect + self._waits.read if self._waits else self._deadline
            await within(
                client.abort_multipart_upload(Bucket=self._bucket, Key=self._full_key, UploadId=upload_id),
                min(bound, self._deadline), endpoint=self._endpoint,
                request=f"AbortMultipartUpload {self._bucket}/{self._full_key}",
            )
        except Exception as exc:
            log.warning(
                "s3 %s/%s: could not abort multipart upload %s (a bucket lifecycle rule will have "
                "to remove its parts): %s", self._bucket, self._key, upload_id, exc,
            )


CRC_THREAD_MIN = 256 * 1024
"""Parts at least this big are hashed in a worker thread; smaller ones inline."""


async def _crc_of(view: memoryview) -> int:
    if len(view) < CRC_THREAD_MIN:
        return crc.crc32(view)
    return await asyncio.to_thread(crc.crc32, view)
