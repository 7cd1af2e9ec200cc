"""Bounded concurrency that can be observed.

A :class:`Slots` is an anyio semaphore that also counts holders and waiters, because operators
need to see on ``/metrics`` whether LTS writers are queueing. Per process only; across hosts the
Prefect layer adds global concurrency limits around the same critical sections.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import anyio


class Slots:
    """A named semaphore with holder and waiter counts (and the peak of holders seen)."""

    def __init__(self, name: str, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"{name}: limit must be at least 1, not {limit}")
        self.name = name
        self.limit = limit
        self._sem = anyio.Semaphore(limit)
        self.holders = 0
        self.waiters = 0
        self.peak_holders = 0

    @contextlib.asynccontextmanager
    async def hold(self) -> AsyncIterator[None]:
        self.waiters += 1
        try:
            await self._sem.acquire()
        finally:
            self.waiters -= 1
        self.holders += 1
        self.peak_holders = max(self.peak_holders, self.holders)
        try:
            yield
        finally:
            self.holders -= 1
            self._sem.release()

    def __repr__(self) -> str:
        return f"Slots({self.name!r}, {self.holders}/{self.limit} held, {self.waiters} waiting)"
