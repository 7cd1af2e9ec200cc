"""LTS limits across hosts: Prefect global concurrency limits around the core's LTS sections.

Only when ``prefect.global_limits`` is on, which needs a Prefect server (``PREFECT_API_URL``):
the ephemeral server of a single process adds nothing its own semaphores do not already give.
``moverd prefect setup`` creates the limits (``lts-write``, ``lts-read``); acquiring a limit that
does not exist fails at once (``strict``) rather than waiting forever.

A slot is a lease of ``prefect.slot_lease`` seconds that a thread renews while the section runs.
A holder that dies (kill -9, a lost host) renews nothing, and the Prefect server takes the slot
back when the lease has run out (its repossessor looks every 15 s by default). A holder that is
alive but cannot renew (the server unreachable for longer than the lease) has its section
cancelled before the slot can go to anyone else: a freed slot never lets in more writers than
the limit. The lease names the task or flow run that holds it.
"""

from __future__ import annotations

import contextlib
import time
import zlib
from collections.abc import AsyncIterator

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.client.schemas.objects import ConcurrencyLeaseHolder
from prefect.concurrency.asyncio import AcquireConcurrencySlotTimeoutError, concurrency
from prefect.context import FlowRunContext, TaskRunContext
from prefect.exceptions import ObjectAlreadyExists
from prefect.settings import PREFECT_API_URL

from moverd import ConfigError
from moverd.app import GlobalLocks, GlobalSlots

from .settings import FlowSettings


def _holder() -> ConcurrencyLeaseHolder | None:
    """The run this section belongs to, recorded with the lease (who holds the slot)."""
    task = TaskRunContext.get()
    if task is not None:
        return ConcurrencyLeaseHolder(type="task_run", id=task.task_run.id)
    flow = FlowRunContext.get()
    if flow is not None and flow.flow_run is not None:
        return ConcurrencyLeaseHolder(type="flow_run", id=flow.flow_run.id)
    return None


def global_slots(settings: FlowSettings) -> GlobalSlots | None:
    """What an App holds around its LTS sections besides its own semaphores (``App(...,
    global_slots=)``): the limit named after the section, with ``prefect.global_limits``."""
    if not settings.prefect.global_limits:
        return None
    if not PREFECT_API_URL.value():
        raise ConfigError("prefect.global_limits needs a Prefect server: set PREFECT_API_URL")
    lease = settings.prefect.slot_lease

    @contextlib.asynccontextmanager
    async def slot(name: str) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as held:
            await _acquire(held, name, lease, None)
            yield

    return slot


WAIT_STEP = 5.0
"""A wait for a slot is made of attempts this long. Prefect hands each attempt to a service thread
that keeps trying until it gets the slot or its time runs out, whatever became of the caller: an
attempt without an end would keep a stopping daemon alive for as long as the slot stays taken.
With attempts of a few seconds a cancelled wait (SIGTERM) is over within one."""


async def _acquire(held: contextlib.AsyncExitStack, name: str, lease: float, wait: float | None) -> None:
    """Take one slot of limit ``name`` into ``held``, waiting at most ``wait`` seconds (None: as long
    as it takes), in attempts of :data:`WAIT_STEP`."""
    deadline = None if wait is None else time.monotonic() + wait
    while True:
        step = WAIT_STEP if deadline is None else max(0.1, min(WAIT_STEP, deadline - time.monotonic()))
        try:
            await held.enter_async_context(concurrency(
                name, occupy=1, strict=True, timeout_seconds=step, lease_duration=lease, holder=_holder(),
                raise_on_lease_renewal_failure=True))
            return
        except AcquireConcurrencySlotTimeoutError:
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"no slot of {name!r} within {wait:.0f} s") from None


LOCK_BUCKETS = 64
"""Cross-host locks are this many limits of one slot (``moverd-lock-00`` ...), a name hashed to
one of them: a fixed set the Prefect server keeps, whatever the number of datasets; two names in
one bucket only wait for each other now and then."""


def lock_limit(name: str) -> str:
    return f"moverd-lock-{zlib.crc32(name.encode()) % LOCK_BUCKETS:02d}"


def global_locks(settings: FlowSettings) -> GlobalLocks | None:
    """Locks across every daemon sharing the Prefect server (``App(..., global_locks=)``): one slot
    of a limit made on first use, leased like the LTS slots, so a dead holder's lock comes back."""
    if not settings.prefect.global_limits:
        return None
    if not PREFECT_API_URL.value():
        raise ConfigError("prefect.global_limits needs a Prefect server: set PREFECT_API_URL")
    lease = settings.prefect.slot_lease
    made: set[str] = set()

    @contextlib.asynccontextmanager
    async def lock(name: str, wait: float) -> AsyncIterator[None]:
        limit = lock_limit(name)
        if limit not in made:
            async with get_client() as client:
                try:
                    await client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=limit, limit=1))
                except ObjectAlreadyExists:
                    pass
            made.add(limit)
        async with contextlib.AsyncExitStack() as held:
            await _acquire(held, limit, lease, wait)
            yield

    return lock
