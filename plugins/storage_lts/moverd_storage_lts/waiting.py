"""A bounded polling loop, shared by the free-space and HSM-recall waits.

Both conditions change outside our control (a tape recall finishes, an operator frees space), and
neither file systems nor HSMs offer a portable notification, so the plugin polls; the deadline keeps
a stuck share from hanging a transfer forever.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import anyio


async def poll_until(
    check: Callable[[], Awaitable[bool]], *, within: float, poll: float
) -> tuple[bool, float]:
    """Await ``check()`` every ``poll`` seconds until it is true or ``within`` seconds passed.

    Returns ``(met, seconds waited)``. The condition is checked once more at the deadline, so a
    timeout of 0 means "check once, do not wait".
    """
    start = time.monotonic()
    while True:
        if await check():
            return True, time.monotonic() - start
        waited = time.monotonic() - start
        if waited >= within:
            return False, waited
        await anyio.sleep(min(poll, within - waited))
