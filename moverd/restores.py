"""Restores of datablocks from an LTS that keeps them offline (a tape-class S3 store), before
anything reads them.

Each restore is requested once: the state is looked up, and the request made only for an object
with no restore under way, under a cross-host lock named after the object, so two jobs (in one
daemon or in several) that want the same datablock never both ask; a later run, or a daemon
restarted mid-wait, finds the restore running and only waits. The wait is bounded by the
storage's restore timeout and backs off from ``poll`` to ``poll_max`` between looks; the counts
per state are kept on the transfer (``GET /jobs/{id}``, the progress artifact) and every change
goes to the ``restore_changed`` observers (metrics).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence

import anyio

from .app import App
from .errors import OfflineTimeoutError
from .events import Transfer
from .storage import RestoreState, Storage

log = logging.getLogger(__name__)

TIMED_OUT = "timed_out"
LOOKS_AT_ONCE = 8
"""Restore states looked up at once in a round (a HEAD each on S3)."""
FAILED = "failed"


def _count(transfer: Transfer, states: dict[str, RestoreState]) -> None:
    transfer.restores = {
        s.value: sum(1 for v in states.values() if v is s)
        for s in (RestoreState.requested, RestoreState.in_progress, RestoreState.available)
    }


async def _request_once(app: App, storage: Storage, key: str, locked: bool) -> RestoreState:
    """The object's state, after requesting its restore if none is under way."""
    if not locked:
        return await _request(storage, key)
    # Another run holds it for a look-up and a request; the wait is the retrieval lock's, as
    # cross-host locks share a few Prefect limits and this one may be a retrieval's.
    async with app.cross_host_lock(f"restore {storage.name} {key}", f"restore request of {key!r}",
                                   wait=app.settings.retrieve.wait_timeout):
        return await _request(storage, key)


async def _request(storage: Storage, key: str) -> RestoreState:
    state = await storage.restore_state(key)
    if state is RestoreState.archived:
        await storage.request_restore(key)
        log.info("requested the restore of %s on %s", key, storage.name)
        return RestoreState.requested
    return state


async def restore_datablocks(
    app: App, storage: Storage, keys: Sequence[str], transfer: Transfer,
    on_counts: Callable[[dict[str, int]], Awaitable[None]] | None = None, *, locked: bool = True,
) -> None:
    """Return once every object of ``keys`` on ``storage`` is readable, restoring those that are
    not; :class:`~moverd.OfflineTimeoutError` (a system error) after the restore timeout.
    ``on_counts`` hears the counts per state whenever they changed after a round of looks (the
    catalog's lifecycle); its errors are the caller's to swallow. ``locked=False`` requests
    without the cross-host lock, for many objects only one archive reads (a landing zone's
    files): a duplicate request of a restore under way is harmless, a lock per file is not."""
    if not storage.needs_restore or not keys:
        return
    policy = storage.restore_policy
    states: dict[str, RestoreState] = {}

    def moved(key: str, state: RestoreState) -> None:
        if states.get(key) is not state:
            states[key] = state
            _count(transfer, states)
            app.observers.restore_changed(transfer=transfer, storage=storage.name, key=key, state=state.value)

    told: dict[str, int] = {}

    async def tell() -> None:
        nonlocal told
        if on_counts is not None and transfer.restores != told:
            told = dict(transfer.restores)
            await on_counts(told)

    limiter = anyio.CapacityLimiter(LOOKS_AT_ONCE)

    async def first(key: str) -> None:
        async with limiter:
            try:
                moved(key, await _request_once(app, storage, key, locked))
            except Exception:
                app.observers.restore_changed(transfer=transfer, storage=storage.name, key=key, state=FAILED)
                raise

    async with anyio.create_task_group() as tg:
        for key in dict.fromkeys(keys):
            tg.start_soon(first, key)
    start = anyio.current_time()
    delay = policy.poll
    while pending := [k for k, s in states.items() if s is not RestoreState.available]:
        await tell()
        waited = anyio.current_time() - start
        if waited >= policy.timeout:
            for key in pending:
                app.observers.restore_changed(transfer=transfer, storage=storage.name, key=key, state=TIMED_OUT)
            more = f" and {len(pending) - 5} more" if len(pending) > 5 else ""
            shown = ", ".join(repr(k) for k in pending[:5]) + more
            raise OfflineTimeoutError(
                f"{len(pending)} of {len(states)} datablock(s) of {transfer.dataset!r} on {storage.name!r} were not "
                f"restored within {policy.timeout:g} s (restore_timeout): {shown}. Their restores go on; "
                "running the job again waits for them without requesting them again"
            )
        await anyio.sleep(min(delay, policy.timeout - waited))
        delay = min(delay * 2, policy.poll_max)

        async def look(key: str) -> None:
            async with limiter:
                state = await storage.restore_state(key)
                if state is RestoreState.archived:
                    # Not restored and nothing running: the restore expired or was lost. Ask again.
                    log.warning("the restore of %s on %s is neither running nor done; requesting it again",
                                key, storage.name)
                    state = await _request_once(app, storage, key, locked)
                moved(key, state)

        async with anyio.create_task_group() as tg:
            for key in pending:
                tg.start_soon(look, key)
    await tell()
