"""Progress of a transfer as a Prefect progress artifact, updated about once per percent."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from uuid import UUID

import anyio
from prefect.artifacts import acreate_progress_artifact, aupdate_progress_artifact

from moverd import Transfer

POLL_SECONDS = 0.5


def description(t: Transfer) -> str:
    """What the artifact says besides its percentage: the restores waited for, if any."""
    text = f"{t.kind} of {t.dataset}"
    if t.restores:
        text += "; restores: " + ", ".join(f"{n} {state.replace('_', ' ')}" for state, n in t.restores.items())
    return text


def percent(t: Transfer) -> float:
    if t.bytes_total:
        return min(100.0, 100.0 * t.bytes_done / t.bytes_total)
    return 100.0 if t.datablocks_total and t.datablocks_done >= t.datablocks_total else 0.0


@contextlib.asynccontextmanager
async def progress_artifact(transfer: Transfer, key: str | None = None) -> AsyncIterator[None]:
    """Publish the transfer's progress while the body runs: one update per whole percent at most,
    never one per file or chunk, and one per change of its restore counts."""
    artifact: UUID = await acreate_progress_artifact(0.0, key=key, description=description(transfer))
    last = 0
    said = description(transfer)

    async def push(force: bool = False) -> None:
        nonlocal last, said
        now = int(percent(transfer))
        text = description(transfer)
        if now > last or (force and percent(transfer) > last) or text != said:
            last, said = now, text
            await aupdate_progress_artifact(artifact, float(percent(transfer)), description=text)

    async with anyio.create_task_group() as tg:
        async def poll() -> None:
            while True:
                await anyio.sleep(POLL_SECONDS)
                await push()

        tg.start_soon(poll)
        try:
            yield
        finally:
            tg.cancel_scope.cancel()
    with anyio.CancelScope(shield=True):
        await push(force=True)
