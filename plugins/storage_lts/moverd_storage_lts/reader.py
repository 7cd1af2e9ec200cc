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

``expect`` (the listing's :class:`~moverd.ObjectInfo`, passed by the archive pipeline) pins the
version: the file opened must have the listed size, mtime and inode, and when the last byte of
the range has been read its descriptor must still show that size and mtime and its path the same
inode. A file that grows, shrinks, is rewritten in place or replaced while it is read (a detector
still writing) raises :class:`~moverd.SourceChangedError` instead of ending up truncated in a
datablock. The checks cost one ``fstat`` at open and an ``fstat`` and a ``stat`` at the end, in
thread calls the reader makes anyway.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from datetime import UTC, datetime

import anyio

from moverd import NotFoundError, ObjectInfo, SourceChangedError, StorageError

from .oserrors import map_os_error

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_OPEN_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW
# Above this many bytes left to read, tell the kernel to read ahead aggressively.
_SEQUENTIAL_FROM = 1 << 20
# An uncached read drops what it read from the cache in steps this big, behind the read position:
# dropping after every read would also throw away the kernel's read-ahead and make it read twice.
_DROP_STEP = 8 << 20


def _when(mtime: float) -> str:
    return datetime.fromtimestamp(mtime, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _version_differs(expect: ObjectInfo, st: os.stat_result) -> str | None:
    """How the opened file differs from the listed one, or None."""
    if expect.inode is not None and st.st_ino != expect.inode:
        return "it was replaced by another file after it was listed"
    if st.st_size != expect.size:
        return f"it was listed with {expect.size} bytes and has {st.st_size} now"
    if st.st_mtime != expect.mtime:
        return f"it was modified at {_when(st.st_mtime)}, after it was listed"
    return None


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
        expect: ObjectInfo | None = None,
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
        self._expect = expect
        self._opened_as: os.stat_result | None = None

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
            if self._expect is not None:
                if (why := _version_differs(self._expect, st)) is not None:
                    raise self._changed(why)
                self._opened_as = st
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
        if self._opened_as is not None and (n == 0 or self._remaining == n):
            self._check_unchanged(fd, n)
        if self._uncached and self._pos - self._dropped_to >= _DROP_STEP:
            aligned = self._dropped_to - self._dropped_to % _PAGE
            _drop_cache(fd, aligned, self._pos - aligned)
            self._dropped_to = self._pos
        self._remaining -= n
        if n == 0 or self._remaining == 0:
            # The file shrank, or the range is done: close now and spare aclose a thread hop.
            self._close_sync()
        return n

    def _changed(self, why: str) -> SourceChangedError:
        return SourceChangedError(
            f"{self._where}: {self._key!r} changed while it was being read: {why}. Nothing read from it "
            "was committed; archive again once the file is complete"
        )

    def _check_unchanged(self, fd: int, n: int) -> None:
        """At the end of the range: the file must still be the one opened, as it was opened."""
        opened = self._opened_as
        assert opened is not None
        try:
            now = os.fstat(fd)
            try:
                at_path = os.stat(self._path)
            except FileNotFoundError:
                at_path = None
        except OSError as exc:
            self._close_sync()
            raise map_os_error(exc, self._path, "stat", self._where) from exc
        why = None
        if n == 0:
            why = f"it ended at byte {self._pos}, {self._remaining} bytes short of its listed size"
        elif now.st_size != opened.st_size:
            grew = "grew" if now.st_size > opened.st_size else "shrank"
            why = f"it {grew} from {opened.st_size} to {now.st_size} bytes"
        elif now.st_mtime_ns != opened.st_mtime_ns:
            why = f"it was modified at {_when(now.st_mtime)}"
        elif at_path is None:
            why = "it was removed"
        elif (at_path.st_dev, at_path.st_ino) != (now.st_dev, now.st_ino):
            why = "it was replaced by another file"
        if why is not None:
            self._close_sync()
            raise self._changed(why)

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
