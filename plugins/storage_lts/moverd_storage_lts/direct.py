"""Writing a big file around the page cache: ``O_DIRECT`` through an aligned staging buffer.

A datablock is written once and read again only by its read-back, which goes to the medium
anyway: passing it through the page cache costs a kernel copy and page allocation, dirty
accounting and writeback for every page (about 0.5 CPU-seconds per GiB here, twice that when the
machine touches fresh memory), and evicts pages other processes use. With ``O_DIRECT`` the
device reads straight from the writer's buffer. The tar stream's pieces have any length, so they
are copied into a page-aligned staging buffer that is written whenever it is full; the unaligned
tail goes out through the page cache at the commit.
"""

from __future__ import annotations

import fcntl
import mmap
import os

STAGE_SIZE = 8 << 20
"""The staging buffer: one write to the device per 8 MiB."""

DIRECT_MIN = 64 << 20
"""Writers announcing at least this many bytes (``size_hint``) write around the page cache;
smaller files are not worth an 8 MiB buffer."""

_ALIGN = 4096
_O_DIRECT = getattr(os, "O_DIRECT", 0)


def set_direct(fd: int, on: bool) -> bool:
    """Switch ``O_DIRECT`` on a descriptor; False where the file system does not take it."""
    if not _O_DIRECT:
        return False
    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, (flags | _O_DIRECT) if on else (flags & ~_O_DIRECT))
    except OSError:
        return False
    return True


def write_all(fd: int, view: memoryview) -> None:
    """Write all of ``view`` (direct or not)."""
    done = 0
    while done < len(view):
        # os.write may write less than asked (signals, 2 GiB cap): loop on the rest.
        done += os.write(fd, view[done:] if done else view)


class Stage:
    """The staging buffer of one writer (not thread-safe: one writer thread at a time)."""

    def __init__(self) -> None:
        self._map = mmap.mmap(-1, STAGE_SIZE)
        self._view = memoryview(self._map)
        self.fill = 0

    def put(self, fd: int, data: memoryview) -> int:
        """Append ``data``, writing the buffer out each time it is full; return the bytes written
        to the file by this call."""
        flushed = 0
        pos = 0
        while pos < len(data):
            n = min(len(data) - pos, STAGE_SIZE - self.fill)
            self._view[self.fill : self.fill + n] = data[pos : pos + n]
            self.fill += n
            pos += n
            if self.fill == STAGE_SIZE:
                write_all(fd, self._view)
                flushed += STAGE_SIZE
                self.fill = 0
        return flushed

    def finish(self, fd: int) -> None:
        """Write what is staged: the aligned part directly, the tail through the page cache."""
        aligned = self.fill - self.fill % _ALIGN
        if aligned:
            write_all(fd, self._view[:aligned])
        if self.fill > aligned:
            set_direct(fd, False)
            write_all(fd, self._view[aligned : self.fill])
        self.fill = 0

    def close(self) -> None:
        self._view.release()
        self._map.close()
