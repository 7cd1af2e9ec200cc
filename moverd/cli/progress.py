"""Progress display for long transfers: rich bars on a terminal, nothing when piped or --json.

The bar polls the :class:`~moverd.events.Transfer` counters a few times a second instead of
being called per chunk, so the data path pays nothing for it.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import AsyncIterator

import anyio
from rich.console import Console
from rich.progress import (
    BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn,
)

from ..events import Transfer

err_console = Console(stderr=True)


@contextlib.asynccontextmanager
async def show_progress(transfer: Transfer, *, enabled: bool) -> AsyncIterator[None]:
    if not enabled or not sys.stderr.isatty():
        yield
        return
    columns = (
        TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(binary_units=True),
        TransferSpeedColumn(), TextColumn("{task.fields[files]}"), TimeRemainingColumn(),
    )
    with Progress(*columns, console=err_console, transient=False) as progress:
        task = progress.add_task(f"{transfer.kind} {transfer.dataset}", total=None, files="")

        def refresh() -> None:
            progress.update(
                task, total=transfer.bytes_total or None, completed=transfer.bytes_done,
                files=f"{transfer.files_done}/{transfer.files_total} files",
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
