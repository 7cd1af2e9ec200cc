"""Retries with exponential backoff and jitter, for storages and catalogs alike.

One policy, two ways to wait: :func:`retry_async` on the event loop, :func:`retry_blocking` in
worker threads (where a storage's blocking client runs and ``await`` is not available).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio

T = TypeVar("T")
log = logging.getLogger(__name__)


def _delay(attempt: int, attempts: int, base_delay: float, max_delay: float, what: str, exc: BaseException) -> float:
    """The pause before the next attempt: doubling from ``base_delay``, capped, ±50 % jitter."""
    delay: float = min(max_delay, base_delay * 2.0 ** (attempt - 1)) * (0.5 + random.random())
    # Some errors have no message (httpx's timeouts): then their type says what happened.
    why = str(exc) or type(exc).__name__
    log.warning("%s failed (%s), retry %d/%d in %.1fs", what, why, attempt, attempts - 1, delay)
    return delay


async def retry_async(
    op: Callable[[], Awaitable[T]],
    *,
    retryable: Callable[[BaseException], bool],
    attempts: int = 5,
    base_delay: float = 0.2,
    max_delay: float = 10.0,
    what: str = "operation",
) -> T:
    """Run ``op`` until it succeeds, retrying errors ``retryable`` accepts, at most ``attempts``
    times in all; the last error propagates unchanged so callers can map it."""
    for attempt in range(1, attempts + 1):
        try:
            return await op()
        except Exception as exc:
            if attempt >= attempts or not retryable(exc):
                raise
            await anyio.sleep(_delay(attempt, attempts, base_delay, max_delay, what, exc))
    raise AssertionError("unreachable")


def retry_blocking(
    op: Callable[[], T],
    *,
    retryable: Callable[[BaseException], bool],
    attempts: int = 5,
    base_delay: float = 0.2,
    max_delay: float = 10.0,
    what: str = "operation",
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """:func:`retry_async` for code in worker threads. ``sleep`` may be replaced by one that
    wakes up early and raises, so that a cancelled reader does not sit out its backoff."""
    for attempt in range(1, attempts + 1):
        try:
            return op()
        except Exception as exc:
            if attempt >= attempts or not retryable(exc):
                raise
            sleep(_delay(attempt, attempts, base_delay, max_delay, what, exc))
    raise AssertionError("unreachable")
