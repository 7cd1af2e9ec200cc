"""Free space of the share, and the back-pressure the core applies before writing a datablock.

``f_bavail`` (not ``f_bfree``) because the blocks reserved for root are not ours to fill: the
daemon may run as root, and filling the reserve would starve the system, not only moverd.

A wait for space can last an hour on a full share, so it must be visible while it lasts: it is
logged (what it waits for: bytes needed, free, minimum, where) as soon as it starts and again
every ``free_space_report`` seconds, and reported to the ``storage_space_wait`` observer hook at
its start and end, for the daemon's metrics. A datablock that could not fit even on the empty
file system fails at once: waiting for it would only delay the error by ``free_space_timeout``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

from moverd import NoSpaceError, format_size

from .waiting import poll_until

log = logging.getLogger("moverd_storage_lts")

Observer = Callable[..., Any]
"""Called like the ``storage_space_wait`` hook (keyword arguments)."""


def free_bytes(path: str) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def capacity_bytes(path: str) -> int:
    """The whole file system's size as an unprivileged writer can fill it (root's reserve
    excluded): what nothing can ever exceed."""
    st = os.statvfs(path)
    return (st.f_blocks - (st.f_bfree - st.f_bavail)) * st.f_frsize


async def wait_for_space(
    *, storage: str, where: str, root: str, needed: int, min_free: int,
    free: Callable[[], Awaitable[int]], pending: Callable[[], int], capacity: Callable[[], Awaitable[int]],
    within: float, poll: float, report: float, observe: Observer | None = None,
) -> None:
    """Return once ``needed`` bytes may be written leaving ``min_free``; NoSpaceError when that
    cannot happen on this file system at all, or did not within ``within`` seconds."""
    state = {"free": 0, "pending": 0}

    async def enough() -> bool:
        state["free"], state["pending"] = await free(), pending()
        return state["free"] - state["pending"] - needed >= min_free

    def situation() -> str:
        held = state["pending"]
        return (
            f"{format_size(needed)} needed, {format_size(state['free'])} free"
            f"{f' ({format_size(held)} of it promised to open writers)' if held else ''}, "
            f"min_free {format_size(min_free)}"
        )

    if await enough():
        return
    total = await capacity()
    if needed + min_free > total:
        raise NoSpaceError(
            f"{where}: a datablock of {format_size(needed)} cannot be written to {root}: the file system "
            f"holds {format_size(total)} in all, and min_free {format_size(min_free)} must stay free"
        )
    start = time.monotonic()

    def notify(waiting: bool) -> None:
        if observe is None:
            return
        try:
            observe(storage=storage, needed=needed, free=state["free"] - state["pending"], min_free=min_free,
                    waited=time.monotonic() - start, waiting=waiting)
        except Exception:
            log.exception("storage_space_wait observer failed")

    log.warning("%s: waiting for free space in %s: %s; for up to %g s", where, root, situation(), within)
    notify(True)
    met = False
    try:
        while True:
            left = within - (time.monotonic() - start)
            met, _ = await poll_until(enough, within=max(0.0, min(report, left)), poll=poll)
            waited = time.monotonic() - start
            if met or waited >= within:
                break
            log.warning("%s: still waiting for free space in %s after %.0f s: %s", where, root, waited, situation())
    finally:
        notify(False)
    waited = time.monotonic() - start
    if not met:
        raise NoSpaceError(
            f"{where}: not enough free space in {root}: {situation()}; "
            f"waited {waited:.1f} s (free_space_timeout {within:g} s)"
        )
    log.info("%s: free space in %s after %.0f s: %s", where, root, waited, situation())
