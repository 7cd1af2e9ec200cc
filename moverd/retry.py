"""Retries with exponential backoff and jitter, for storages and catalogs alike."""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio

T = TypeVar("T")
log = logging.getLogger(__name__)


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
            delay = min(max_delay, base_delay * 2 ** (attempt - 1)) * (0.5 + random.random())
            log.warning("%s failed (%s), retry %d/%d in %.1fs", what, exc, attempt, attempts - 1, delay)
            await anyio.sleep(delay)
    raise AssertionError("unreachable")
