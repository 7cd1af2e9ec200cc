"""Reading a file, or a byte range of it, straight into the caller's buffer.

Small files dominate some datasets (20,000 files of 8 KiB), and every trip to a worker thread costs more
than reading 8 KiB. So the reader opens lazily inside its first ``readinto`` thread call, learns the
size there (``fstat``) and closes the file in the thread call that reaches the end: a small file
costs one thread hop in all. The price is that a missing file is reported by the first
``readinto`` (as :class:`~moverd.NotFoundError`), not by ``open_reader``.

``uncached=True`` is the read-back verification after commit: the writer fsynced, so the file's
pages are clean and ``POSIX_FADV_DONTNEED`` evicts them; the bytes then come from the medium. Each
range read is dropped again shortly after (every 8 MiB, behind the read position, so that the
kernel's sequential read-ahead keeps working), so a verify of a large datablock does not fill the
page cache either.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable

import anyio

from moverd import NotFoundError, StorageError

from .oserrors import map_os_error

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_OPEN_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW
# Above this many bytes left to read, tell the kernel to read ahead aggressively.
_SEQUENTIAL_FROM = 1 << 20
# An uncached read drops what it read from the cache in steps this big, behind the read position:
# dropping after every read would also throw away the kernel's read-ahead and make it read twice.
_DROP_STEP = 8 << 20


def _drop_cache(fd: int, offset: int, length: int) -> None:
    try:
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
    except OSError:
        # Advice only: a file system without fadvise support still returns correct bytes.
        pass


class PosixReader:
    """A :class:`moverd.Reader` over ``[offset, offset + length)`` of one file."""

    def __init__(
        self,
        resolve: Callable[[str], str],
        key: str,
        offset: int,
        length: int | None,
        *,
        uncached: bool,
        where: str,
    ) -> None:
        self._resolve = resolve
        self._key = key
        self._pos = offset
        self._length = length
        self._uncached = uncached
        self._where = where
        self._fd: int | None = None
        self._path = key
        self._remaining = 0
        self._opened = False
        self._done = False
        self._closed = False
        self._dropped_to = offset

    async def readinto(self, buf: memoryview) -> int:
        if self._closed:
            raise StorageError(f"{self._where}: reader of {self._key!r} is closed")
        if self._done or len(buf) == 0:
            return 0
        return await anyio.to_thread.run_sync(self.readinto_blocking, buf)

    async def aclose(self) -> None:
        self._closed = True
        if self._fd is not None:
            # In a thread: closing a file on NFSv4 is a round trip to the server.
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self._close_sync)

    # -- worker-thread side -------------------------------------------------------------------

    def _open_sync(self) -> None:
        path = self._resolve(self._key)
        self._path = path
        try:
            fd = os.open(path, _OPEN_FLAGS)
        except OSError as exc:
            raise map_os_error(exc, path, "open", self._where) from exc
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise NotFoundError(f"{self._where}: {self._key!r} is not a regular file")
            end = st.st_size if self._length is None else min(st.st_size, self._pos + self._length)
            self._remaining = max(0, end - self._pos)
            if self._uncached:
                _drop_cache(fd, 0, 0)
            if self._remaining >= _SEQUENTIAL_FROM:
                try:
                    os.posix_fadvise(fd, self._pos, self._remaining, os.POSIX_FADV_SEQUENTIAL)
                except OSError:
                    pass
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._opened = True

    def readinto_blocking(self, buf: memoryview) -> int:
        """``readinto`` in the caller's worker thread (the core reads and hashes in one call)."""
        if self._closed:
            raise StorageError(f"{self._where}: reader of {self._key!r} is closed")
        if self._done or len(buf) == 0:
            return 0
        if not self._opened:
            self._open_sync()
        fd = self._fd
        if fd is None:  # closed at the end by an earlier call
            return 0
        want = min(len(buf), self._remaining)
        if want == 0:
            self._close_sync()
            return 0
        if buf.format != "B" or buf.ndim != 1:
            buf = buf.cast("B")
        view = buf if want == len(buf) else buf[:want]
        start = self._pos
        try:
            n = os.preadv(fd, [view], start)
        except OSError as exc:
            raise map_os_error(exc, self._path, "read", self._where) from exc
        self._pos += n
        if self._uncached and self._pos - self._dropped_to >= _DROP_STEP:
            aligned = self._dropped_to - self._dropped_to % _PAGE
            _drop_cache(fd, aligned, self._pos - aligned)
            self._dropped_to = self._pos
        self._remaining -= n
        if n == 0 or self._remaining == 0:
            # The file shrank, or the range is done: close now and spare aclose a thread hop.
            self._close_sync()
        return n

    def _close_sync(self) -> None:
        fd, self._fd = self._fd, None
        self._done = True
        if fd is None:
            return
        if self._uncached:
            _drop_cache(fd, 0, 0)
        try:
            os.close(fd)
        except OSError:
            pass  # a read-only descriptor has nothing left to lose

    def __del__(self) -> None:
        # A reader dropped without aclose (an abandoned transfer) must not leak its descriptor.
        fd = getattr(self, "_fd", None)
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass
