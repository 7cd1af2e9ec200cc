"""Reusable buffers under one memory budget.

Bytes travel in *slabs*: ``chunk_size`` bytearrays allocated once and reused for the life of the
process, so memory stays flat whatever the dataset size, and no chunk is ever copied into a new
``bytes`` on its way from source to sink.
"""

from __future__ import annotations

from collections.abc import Callable

import anyio

from .checksums import Hasher
from .storage import Reader


class SlabPool:
    """At most ``budget // chunk_size`` slabs, handed out first come, first served.

    FIFO order matters: the pipeline reserves slabs for files in the order it will consume them,
    so the file the consumer waits for always gets its slabs first and the pool cannot deadlock.
    """

    def __init__(self, chunk_size: int, budget: int) -> None:
        self.chunk_size = chunk_size
        self.capacity = max(1, budget // chunk_size)
        self._free: list[bytearray] = []
        self._allocated = 0
        self._lock = anyio.Lock()
        self._released = anyio.Event()

    @property
    def available(self) -> int:
        return len(self._free) + self.capacity - self._allocated

    @property
    def in_use(self) -> int:
        return self._allocated - len(self._free)

    async def acquire(self, count: int) -> list[bytearray]:
        """Wait until ``count`` slabs are free and take them (``count`` ≤ capacity)."""
        count = min(count, self.capacity)
        if not self._lock.locked() and self.available >= count:
            return self._take(count)  # nobody waits before us: no lock, no checkpoint
        async with self._lock:
            while self.available < count:
                await self._released.wait()
                self._released = anyio.Event()
            return self._take(count)

    def _take(self, count: int) -> list[bytearray]:
        out = [self._free.pop() for _ in range(min(count, len(self._free)))]
        while len(out) < count:
            out.append(bytearray(self.chunk_size))
            self._allocated += 1
        return out

    def release(self, slabs: list[bytearray]) -> None:
        self._free.extend(slabs)
        self._released.set()

    def discard(self, slabs: list[bytearray]) -> None:
        """Give up slabs that may still be written to (after a cancelled read): the budget comes
        back, the buffers themselves are left to the garbage collector."""
        self._allocated -= len(slabs)
        self._released.set()


async def fill(reader: Reader, view: memoryview) -> int:
    """Read until ``view`` is full or the stream ends; return the bytes read."""
    got = 0
    total = len(view)
    while got < total:
        n = await reader.readinto(view[got:])
        if n == 0:
            break
        got += n
    return got


def fill_and_hash(
    readinto_blocking: Callable[[memoryview], int], view: memoryview, hasher: Hasher | None
) -> int:
    """:func:`fill` for a blocking reader, hashing what it read (unless ``hasher`` is None): one
    worker-thread call per chunk does both (see :class:`~moverd.storage.BlockingReads`)."""
    got = 0
    total = len(view)
    while got < total:
        n = readinto_blocking(view[got:])
        if n == 0:
            break
        got += n
    if got and hasher is not None:
        hasher.update(view[:got])
    return got


def fill_many_and_hash(
    readinto_blocking: Callable[[memoryview], int], views: list[memoryview], hasher: Hasher | None
) -> list[int]:
    """:func:`fill_and_hash` into several buffers in a row, in one worker-thread call; stops after
    the first one the stream could not fill (its count is the last in the list)."""
    counts: list[int] = []
    for view in views:
        n = fill_and_hash(readinto_blocking, view, hasher)
        counts.append(n)
        if n < len(view):
            break
    return counts
