"""An archive cancelled mid-stream (a daemon stopping, a job aborted) ends as a cancellation:
nothing registered, nothing marked failed, so that the job resumes at the next start."""

from __future__ import annotations

import os
from pathlib import Path

import anyio
import pytest

from moverd.app import App
from moverd.models import ArchiveStatus
from moverd.plugins import load_plugins
from moverd.services.folders import dataset_for_folder
from moverd.services.lifecycle import archive_with_lifecycle
from tests.support.apps import make_settings
from tests.support.badmedia import Gate, GatedReadsPlugin

MiB = 1024**2


@pytest.mark.anyio
async def test_a_cancelled_archive_stays_cancelled_and_marks_nothing_failed(tmp_path: Path) -> None:
    """Cancellation (a daemon stopping) reaches the consumer while a reader's worker thread is
    mid-read. That reader finds its consumer gone when the thread returns: it must end with the
    cancellation, not with an error of its own that turns the abort into a failed archive, a
    rollback and a failure status (the job would not resume)."""
    src = tmp_path / "src"
    src.mkdir()
    for i in range(4):
        (src / f"f{i:02d}.bin").write_bytes(os.urandom(MiB))
    gate = Gate("f02.bin")
    pm, report = load_plugins()
    pm.register(GatedReadsPlugin(gate), name="gated")
    settings = make_settings(tmp_path, storages={"src": {"type": "gatedreads", "root": str(src)}},
                             pipeline={"target_size": "8MiB", "datablock_concurrency": 1})
    async with App(settings, pm, report) as app:
        found = await dataset_for_folder(app, "src:")
        pid = found.dataset.pid
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(archive_with_lifecycle, app, pid)
                await anyio.to_thread.run_sync(gate.entered.wait, 30)
                await anyio.sleep(0.05)  # the consumer waits on that file's chunks
                scope.cancel()
                with anyio.CancelScope(shield=True):
                    await anyio.sleep(0.05)  # the cancellation reaches the consumer; the thread still reads
                    gate.release.set()
        assert scope.cancelled_caught and gate.release.is_set()
        ds = await app.catalog.get_dataset(pid)
        assert ds.lifecycle["archive_status"] == ArchiveStatus.started.value, ds.lifecycle
        assert await app.catalog.list_datablocks(pid) == []
