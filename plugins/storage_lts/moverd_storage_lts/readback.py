"""Reading a file back from the medium while it is still being written.

The read-back verification of a datablock used to start after its last byte was written: on a
20 GiB datablock that is minutes of reading alone at the end of every transfer. Here a thread
follows the writer instead. Each time the writer has written another segment, the thread makes
that segment durable (``fdatasync``), evicts it from the page cache (``POSIX_FADV_DONTNEED`` on
now clean pages), reads it back — so the bytes come from the medium, not from memory — and feeds
them to the caller's hasher. At commit only the last segment is left to read.

The thread reads through its own descriptor and buffer; it never touches the pipeline's slabs.
It reads with ``O_DIRECT`` where the file system takes it: the device then writes into the
buffer and the kernel copies nothing (the buffer is an anonymous mapping, so page-aligned, and
segments start at multiples of ``SEGMENT``); elsewhere (tmpfs) it reads through the page cache
after the eviction.
"""

from __future__ import annotations

import errno
import mmap
import os
import queue
import threading

from moverd import Hasher, StorageError

from .oserrors import map_os_error

SEGMENT = 64 << 20
"""Bytes written between two read-backs: big enough for long sequential reads, small enough
that the last segment (read after the commit's fsync) is short."""

_READ_SIZE = 4 << 20
_ALIGN = 4096
_OPEN_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW
_DIRECT = getattr(os, "O_DIRECT", 0)


def _drop(fd: int, offset: int, length: int) -> None:
    try:
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
    except OSError:
        pass  # advice only: the bytes read are still the file's bytes


class ReadBack:
    """Reads ``path`` back behind its writer, in order, into ``hasher``.

    The writer calls :meth:`advance` after its writes (cheap: a queue put every ``SEGMENT``
    bytes) and :meth:`finish` once the file is complete and fsynced; :meth:`cancel` on abort.
    """

    def __init__(self, path: str, hasher: Hasher, *, sync: bool, where: str) -> None:
        self._path = path
        self._hasher = hasher
        self._sync = sync
        self._where = where
        self._queue: queue.SimpleQueue[int | None] = queue.SimpleQueue()
        self._submitted = 0
        self.done = 0
        """Bytes read back and hashed so far, in whole segments."""
        self._pos = 0
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def advance(self, written: int) -> None:
        """The writer has written ``written`` bytes in all: read back whole segments of them."""
        if written - self._submitted >= SEGMENT:
            self._submit(written - written % SEGMENT)

    def finish(self, size: int) -> None:
        """The file is complete (``size`` bytes) and fsynced: read the rest back and wait."""
        self._submit(size)
        self._stop()
        if self._error is not None:
            raise self._error
        if self.done != size:
            raise StorageError(f"{self._where}: read back {self.done} of {size} bytes of {self._path}")

    def cancel(self) -> None:
        self._stop()

    def _submit(self, end: int) -> None:
        if end <= self._submitted:
            return
        self._submitted = end
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="moverd-read-back", daemon=True)
            self._thread.start()
        self._queue.put(end)

    def _stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    # -- the read-back thread -----------------------------------------------------------------

    def _run(self) -> None:
        fd: int | None = None
        direct = bool(_DIRECT)
        area = mmap.mmap(-1, _READ_SIZE)
        buf = memoryview(area)
        try:
            while (end := self._queue.get()) is not None:
                if self._error is not None:
                    continue  # keep draining until stopped
                try:
                    if fd is None:
                        fd, direct = self._open(direct)
                    try:
                        self._read_segment(fd, end, buf, direct)
                    except OSError as exc:
                        if not (direct and exc.errno == errno.EINVAL):
                            raise
                        # The file system refused a direct read after all: read through the cache.
                        os.close(fd)
                        fd, direct = self._open(False)
                        self._read_segment(fd, end, buf, direct)
                except BaseException as exc:
                    self._error = exc
        finally:
            if fd is not None:
                os.close(fd)
            buf.release()
            area.close()

    def _open(self, direct: bool) -> tuple[int, bool]:
        try:
            if direct:
                try:
                    return os.open(self._path, _OPEN_FLAGS | _DIRECT), True
                except OSError as exc:
                    if exc.errno != errno.EINVAL:
                        raise
            return os.open(self._path, _OPEN_FLAGS), False
        except OSError as exc:
            raise map_os_error(exc, self._path, "read back", self._where) from exc

    def _read_segment(self, fd: int, end: int, buf: memoryview, direct: bool) -> None:
        start = self.done
        try:
            if self._sync:
                # Durable first, so that the eviction below drops clean pages and the read
                # goes to the medium (dirty pages cannot be dropped).
                os.fdatasync(fd)
            if not direct:
                _drop(fd, start, end - start)
            # Continue where a refused direct read stopped: the hasher has what came before.
            pos = self._pos = max(self._pos, start)
            while pos < end:
                want = min(len(buf), end - pos)
                # A direct read takes whole blocks; the file's last one is returned short.
                ask = -(-want // _ALIGN) * _ALIGN if direct else want
                n = min(os.preadv(fd, [buf[:ask]], pos), want)
                if n == 0:
                    raise StorageError(f"{self._where}: {self._path} ends at byte {pos} while reading it back")
                self._hasher.update(buf[:n])
                pos = self._pos = pos + n
            _drop(fd, start, end - start)
        except OSError as exc:
            if direct and exc.errno == errno.EINVAL:
                raise
            raise map_os_error(exc, self._path, "read back", self._where) from exc
        self.done = end
