"""Progress display for long transfers: rich bars on a terminal, nothing when piped or --json.

The bar polls the :class:`~moverd.events.Transfer` counters a few times a second instead of
being called per chunk, so the data path pays nothing for it.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import AsyncIterator
from typing import Any

import anyio

from moverd.events import Transfer
from moverd.units import plural


@contextlib.asynccontextmanager
async def show_progress(transfers: Transfer | list[Transfer], *, enabled: bool) -> AsyncIterator[None]:
    """Bars for one transfer, or for a list that grows as a job reaches its datasets."""
    watched = transfers if isinstance(transfers, list) else [transfers]
    if not enabled or not sys.stderr.isatty():
        yield
        return
    # Imported here: scripts and --json runs never show bars and need not pay for rich.
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TaskID,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )
    from rich.text import Text

    from moverd.units import format_size

    class BinarySpeed(TransferSpeedColumn):
        """MiB/s, as the sizes beside it and the summary at the end (rich's own says MB/s)."""

        def render(self, task: Any) -> Text:
            speed = task.finished_speed or task.speed
            return Text("?" if speed is None else f"{format_size(speed)}/s", style="progress.data.speed")

    columns = (
        TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(binary_units=True),
        BinarySpeed(), TextColumn("{task.fields[files]}"), TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(stderr=True), transient=False) as progress:
        tasks: dict[str, TaskID] = {}

        def refresh() -> None:
            for t in watched:
                if t.id not in tasks:
                    tasks[t.id] = progress.add_task(f"{t.kind} {t.dataset}", total=None, files="")
                progress.update(
                    tasks[t.id], total=t.bytes_total or None, completed=t.bytes_done,
                    files=f"{t.files_done}/{plural(t.files_total, 'file')}",
                )

        async with anyio.create_task_group() as tg:
            async def poll() -> None:
                while True:
                    refresh()
                    await anyio.sleep(0.2)

            tg.start_soon(poll)
            try:
                yield
            finally:
                tg.cancel_scope.cancel()
                refresh()
