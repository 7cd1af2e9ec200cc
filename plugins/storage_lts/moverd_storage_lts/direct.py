"""Writing a big file around the page cache: ``O_DIRECT`` through an aligned staging buffer.

A datablock is written once and read again only by its read-back, which goes to the medium
anyway: passing it through the page cache costs a kernel copy and page allocation, dirty
accounting and writeback for every page (about 0.5 CPU-seconds per GiB here, twice that when the
machine touches fresh memory), and evicts pages other processes use. With ``O_DIRECT`` the
device reads straight from the writer's buffer. The tar stream's pieces have any length, so they
are copied into page-aligned staging buffers, each written by the stage's own thread when it is
full; the unaligned tail goes out through the page cache at the commit.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import queue
import threading
from collections.abc import Callable

STAGE_SIZE = 8 << 20
"""A staging buffer: one write to the device per 8 MiB."""

STAGE_BUFFERS = 2
"""One buffer is filled while the other is written."""

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
    """The staging buffers of one writer, written out by their own thread.

    The writer's thread copies pieces into one buffer while this stage's thread writes the
    previous one to the device: an ``O_DIRECT`` write blocks for as long as the device takes
    (6-8 ms per 8 MiB here, about as long as hashing it), and the datablock writer's thread
    also hashes, so writing in line made that thread the bottleneck of the whole pipeline.
    ``on_written(total)`` runs in the stage's thread after each write, with the bytes in the
    file so far. A failed write (its ``OSError``, or whatever ``on_written`` raised) is raised by
    the next :meth:`put` or by :meth:`finish`. Not thread-safe: one writer thread at a time.
    """

    def __init__(self, on_written: Callable[[int], None] | None = None, buffers: int = STAGE_BUFFERS) -> None:
        self._maps = [mmap.mmap(-1, STAGE_SIZE) for _ in range(buffers)]
        self._free: queue.SimpleQueue[memoryview] = queue.SimpleQueue()
        for m in self._maps[1:]:
            self._free.put(memoryview(m))
        self._view = memoryview(self._maps[0])
        self._todo: queue.SimpleQueue[tuple[int, memoryview] | None] = queue.SimpleQueue()
        self._on_written = on_written
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self.fill = 0
        self._written = 0
        """Bytes the stage's thread has written to the file."""

    def put(self, fd: int, data: memoryview) -> None:
        """Append ``data``, handing each full buffer to the stage's thread."""
        self._raise_failure()
        pos = 0
        while pos < len(data):
            n = min(len(data) - pos, STAGE_SIZE - self.fill)
            self._view[self.fill : self.fill + n] = data[pos : pos + n]
            self.fill += n
            pos += n
            if self.fill == STAGE_SIZE:
                self._hand_over(fd)

    def finish(self, fd: int) -> None:
        """Wait for the stage's thread, then write what is staged: the aligned part directly,
        the tail through the page cache."""
        self._drain()
        self._raise_failure()
        aligned = self.fill - self.fill % _ALIGN
        if aligned:
            write_all(fd, self._view[:aligned])
        if self.fill > aligned:
            set_direct(fd, False)
            write_all(fd, self._view[aligned : self.fill])
        self.fill = 0

    def close(self) -> None:
        """Stop the stage's thread (after its current write) and free the buffers."""
        self._drain()
        self._view.release()
        while True:
            try:
                self._free.get_nowait().release()
            except queue.Empty:
                break
        for m in self._maps:
            m.close()

    def _hand_over(self, fd: int) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="moverd-direct-write", daemon=True)
            self._thread.start()
        self._todo.put((fd, self._view))
        self._view = self._free.get()  # waits while every other buffer is being written
        self.fill = 0
        self._raise_failure()

    def _drain(self) -> None:
        if self._thread is not None:
            self._todo.put(None)
            self._thread.join()
            self._thread = None

    def _raise_failure(self) -> None:
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        while (job := self._todo.get()) is not None:
            fd, view = job
            try:
                if self._error is None:
                    write_all(fd, view)
                    self._written += len(view)
                    if self._on_written is not None:
                        self._on_written(self._written)
            except BaseException as exc:  # whatever it is, the writer's thread must learn of it
                self._error = exc
            finally:
                self._free.put(view)  # never strand the writer's thread waiting for a buffer
