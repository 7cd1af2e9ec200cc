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
import zlib
from collections.abc import AsyncIterator

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.client.schemas.objects import ConcurrencyLeaseHolder
from prefect.concurrency.asyncio import concurrency
from prefect.context import FlowRunContext, TaskRunContext
from prefect.exceptions import ObjectAlreadyExists
from prefect.settings import PREFECT_API_URL

from moverd import ConfigError
from moverd.app import GlobalLocks, GlobalSlots
from moverd.config import Settings


def _holder() -> ConcurrencyLeaseHolder | None:
    """The run this section belongs to, recorded with the lease (who holds the slot)."""
    task = TaskRunContext.get()
    if task is not None:
        return ConcurrencyLeaseHolder(type="task_run", id=task.task_run.id)
    flow = FlowRunContext.get()
    if flow is not None and flow.flow_run is not None:
        return ConcurrencyLeaseHolder(type="flow_run", id=flow.flow_run.id)
    return None


def global_slots(settings: Settings) -> GlobalSlots | None:
    """What an App holds around its LTS sections besides its own semaphores (``App(...,
    global_slots=)``): the limit named after the section, with ``prefect.global_limits``."""
    if not settings.prefect.global_limits:
        return None
    if not PREFECT_API_URL.value():
        raise ConfigError("prefect.global_limits needs a Prefect server: set PREFECT_API_URL")
    lease = settings.prefect.slot_lease

    @contextlib.asynccontextmanager
    async def slot(name: str) -> AsyncIterator[None]:
        async with concurrency(name, occupy=1, strict=True, lease_duration=lease, holder=_holder(),
                               raise_on_lease_renewal_failure=True):
            yield

    return slot


LOCK_BUCKETS = 64
"""Cross-host locks are this many limits of one slot (``moverd-lock-00`` ...), a name hashed to
one of them: a fixed set the Prefect server keeps, whatever the number of datasets; two names in
one bucket only wait for each other now and then."""


def lock_limit(name: str) -> str:
    return f"moverd-lock-{zlib.crc32(name.encode()) % LOCK_BUCKETS:02d}"


def global_locks(settings: Settings) -> GlobalLocks | None:
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
        async with concurrency(limit, occupy=1, strict=True, timeout_seconds=wait, lease_duration=lease,
                               holder=_holder(), raise_on_lease_renewal_failure=True):
            yield

    return lock
