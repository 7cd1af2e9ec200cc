"""Retries for code that runs in worker threads: the blocking twin of :func:`moverd.retry_async`.

The lean S3 client does its socket work in worker threads, where ``await anyio.sleep`` is not
available. The policy is the same as the core's (attempts counting the first one, exponential
backoff from 0.2 s capped at 10 s, jitter of ±50 %, one warning per retry) so that both S3 paths
behave alike; only the sleep differs. ``sleep`` can be replaced by one that wakes up early and
raises, so that a closed reader does not sit out its backoff in a thread nobody waits for.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)


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
    """Run ``op`` until it succeeds, retrying errors ``retryable`` accepts, at most ``attempts``
    times in all; the last error propagates unchanged so callers can map it."""
    for attempt in range(1, attempts + 1):
        try:
            return op()
        except Exception as exc:
            if attempt >= attempts or not retryable(exc):
                raise
            delay = min(max_delay, base_delay * 2 ** (attempt - 1)) * (0.5 + random.random())
            log.warning("%s failed (%s), retry %d/%d in %.1fs", what, exc, attempt, attempts - 1, delay)
            sleep(delay)
    raise AssertionError("unreachable")
