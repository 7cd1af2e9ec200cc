"""LTS limits across hosts: Prefect global concurrency limits around the core's LTS sections.

Only when ``prefect.global_limits`` is on, which needs a Prefect server (``PREFECT_API_URL``):
the ephemeral server of a single process adds nothing its own semaphores do not already give.
``moverd prefect setup`` creates the limits (``lts-write``, ``lts-read``); acquiring a limit that
does not exist fails at once (``strict``) rather than waiting forever.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from prefect.concurrency.asyncio import concurrency
from prefect.settings import PREFECT_API_URL

from moverd import ConfigError
from moverd.app import GlobalSlots
from moverd.config import Settings


@contextlib.asynccontextmanager
async def _global(name: str) -> AsyncIterator[None]:
    async with concurrency(name, occupy=1, strict=True):
        yield


def global_slots(settings: Settings) -> GlobalSlots | None:
    """What an App holds around its LTS sections besides its own semaphores (``App(...,
    global_slots=)``): the limit named after the section, with ``prefect.global_limits``."""
    if not settings.prefect.global_limits:
        return None
    if not PREFECT_API_URL.value():
        raise ConfigError("prefect.global_limits needs a Prefect server: set PREFECT_API_URL")
    return _global
