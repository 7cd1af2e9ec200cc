"""LTS limits across hosts: Prefect global concurrency limits around the core's LTS sections.

Only with a Prefect server (``PREFECT_API_URL``): the ephemeral server of a single process adds
nothing the process's own semaphores do not already give. ``moverd prefect setup`` creates the
limits (``lts-write``, ``lts-read``); a missing limit would make Prefect wait forever, so the
daemon checks them at start.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from prefect.concurrency.asyncio import concurrency
from prefect.settings import PREFECT_API_URL

from moverd.app import App


@contextlib.asynccontextmanager
async def _global(name: str) -> AsyncIterator[None]:
    async with concurrency(name, occupy=1, strict=True):
        yield


def install_global_limits(app: App) -> None:
    if PREFECT_API_URL.value():
        app.global_slots = _global
