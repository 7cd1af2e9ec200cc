"""Pieces of the daemon in-process, on the embedded default's local folders: what an aborted job
leaves on the LTS, the journal, and the retrieval cleanup's respect for links handed out again."""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from moverd.app import App
from moverd.events import Transfer
from moverd.models import index_key
from moverd.planner import archive_id, dataset_folder
from moverd_daemon.dispatch import EmbeddedDispatcher, JobRun
from moverd_daemon.journal import Journal
from moverd_daemon.metrics import Metrics
from moverd_daemon.scheduler import Housekeeping, build_scheduler
from moverd_daemon.settings import DaemonSettings
from moverd_daemon.views import JobView
from tests.support.apps import make_settings

pytestmark = pytest.mark.anyio


@pytest.fixture
async def app(tmp_path: Path) -> AsyncIterator[App]:
    """An App as the daemon builds it (from DaemonSettings)."""
    async with App(make_settings(tmp_path, DaemonSettings)) as a:
        yield a


def dispatcher(app: App, tmp_path: Path) -> tuple[EmbeddedDispatcher, Journal]:
    journal = Journal(tmp_path / "journal.sqlite")
    client: Any = None  # not used by what these tests call
    return EmbeddedDispatcher(app, client, journal, Metrics(), name="test", config=None), journal


async def test_an_aborted_archive_leaves_no_tar_without_its_index(app: App, tmp_path: Path) -> None:
    d, journal = dispatcher(app, tmp_path)
    lts = app.storage("lts")
    pid = "facility/ds-1"
    done, orphan = archive_id(pid, 0), archive_id(pid, 1)
    for key in (done, index_key(done), orphan):
        w = await lts.open_writer(key)
        await w.write(b"x" * 1024)
        await w.commit()
    run = JobRun("job-1", "archive", "run-1", "archive-job job-1", transfers=[Transfer(kind="archive", dataset=pid)])
    await d._discard_unindexed(run)
    keys = {i.key async for i in lts.list(dataset_folder(pid))}
    assert keys == {done, index_key(done)}
    journal.close()


async def test_journal_keeps_open_jobs_for_the_next_start(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.sqlite")
    await journal.record("a", "archive", "r1", "archive-job a")
    await journal.record("b", "retrieve", "r2", "retrieve-job b")
    await journal.set_state("a", "running")
    await journal.set_state("b", "done", "finishedSuccessful: ok", datasets=["p1"])
    assert [e.job_id for e in await journal.interrupted()] == ["a"]
    await journal.record("a", "archive", "r3", "archive-job a")  # a new attempt
    entry = await journal.get("a")
    assert entry is not None and entry.flow_run_id == "r3" and entry.attempts == 2 and entry.state == "queued"
    [b] = await journal.retrievals_since(time.time() - 60)
    assert b.datasets == ["p1"] and b.finished is not None
    journal.close()


async def test_journal_prune_forgets_ended_jobs_only(app: App, tmp_path: Path) -> None:
    d, journal = dispatcher(app, tmp_path)
    hk = Housekeeping(app, d, journal, d.metrics)
    for job in ("done", "failed", "running"):
        await journal.record(job, "retrieve", "r", f"retrieve-job {job}")
    await journal.set_state("done", "done", "finishedSuccessful: ok", datasets=["p1"])
    await journal.set_state("failed", "error", "finishedWithDatasetErrors: x")
    await journal.set_state("running", "running")
    retention = app.settings.scheduler.journal_retention
    assert retention > app.settings.retrieve.url_expiry + app.settings.scheduler.retrieval_cleanup_margin
    assert await hk.journal_prune() == 0  # they just ended
    # a day after the retention: the ended jobs go, the one still running stays
    assert await hk.journal_prune(now=time.time() + retention + 86400) == 2
    assert await journal.get("done") is None and await journal.get("failed") is None
    assert [e.job_id for e in await journal.interrupted()] == ["running"]
    journal.close()


@pytest.mark.parametrize("retention", ["1s", 0])
async def test_journal_prune_keeps_what_the_retrieval_cleanup_needs(tmp_path: Path, retention: str | int) -> None:
    """A retention shorter than the links' lifetime still keeps the retrieve jobs whose links may
    be valid; 0 keeps everything."""
    async with App(make_settings(tmp_path, DaemonSettings, scheduler={"journal_retention": retention})) as app:
        d, journal = dispatcher(app, tmp_path)
        hk = Housekeeping(app, d, journal, d.metrics)
        await journal.record("j", "retrieve", "r", "retrieve-job j")
        await journal.set_state("j", "done", "finishedSuccessful: ok", datasets=["p1"])
        assert await hk.journal_prune(now=time.time() + 3600) == 0  # links still valid: kept
        keep = app.settings.retrieve.url_expiry + app.settings.scheduler.retrieval_cleanup_margin
        assert await hk.journal_prune(now=time.time() + keep + 60) == (1 if retention else 0)
        journal.close()


@pytest.mark.parametrize(("retention", "scheduled"), [("90d", True), (0, False)])
async def test_the_journal_is_pruned_daily_unless_turned_off(
    tmp_path: Path, retention: str | int, scheduled: bool
) -> None:
    async with App(make_settings(tmp_path, DaemonSettings, scheduler={"journal_retention": retention})) as app:
        d, journal = dispatcher(app, tmp_path)
        job = build_scheduler(Housekeeping(app, d, journal, d.metrics), pickup=False).get_job("journal_prune")
        assert (job is not None) == scheduled
        if job is not None:
            assert job.trigger.interval.total_seconds() == 86400
        journal.close()


async def test_retrieval_cleanup_keeps_objects_whose_links_were_renewed(app: App, tmp_path: Path) -> None:
    d, journal = dispatcher(app, tmp_path)
    hk = Housekeeping(app, d, journal, d.metrics)
    root = tmp_path / "state" / "retrieval"
    old = time.time() - app.settings.retrieve.url_expiry - app.settings.scheduler.retrieval_cleanup_margin - 60
    for rel in ("p1/a.tar", "p2/b.tar", "p3/new.tar"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x")
    for rel in ("p1/a.tar", "p2/b.tar"):
        os.utime(root / rel, (old, old))
    # a retrieve job of p2 ended just now: it handed out fresh links to the old copy
    await journal.record("j", "retrieve", "r", "retrieve-job j")
    await journal.set_state("j", "done", "finishedSuccessful: ok", datasets=["p2"])
    assert await hk.retrieval_cleanup() == 1
    assert not (root / "p1/a.tar").exists()
    assert (root / "p2/b.tar").exists() and (root / "p3/new.tar").exists()
    journal.close()


async def test_job_view_progress(app: App) -> None:
    t = Transfer(kind="archive", dataset="p", bytes_total=200, bytes_done=50, files_total=4, files_done=1,
                 datablocks_total=2, datablocks_done=0)
    run = JobRun("j", "archive", "r", "archive-job j", state="RUNNING", started=time.time() - 1, transfers=[t])
    view = JobView.of(run).model_dump()
    assert view["flow_run"] == {"id": "r", "name": "archive-job j", "state": "RUNNING"}
    assert view["progress"]["percent"] == 25.0 and view["progress"]["datasets"][0]["pid"] == "p"
    assert view["status"] == "inProgress"
    assert JobView.of(run, {"status": "inProgress", "type": "archive"}).catalog == {
        "status": "inProgress", "type": "archive"}
    assert not run.final


async def test_a_task_running_at_shutdown_stops_without_a_traceback(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The daemon's stop cancels the housekeeping still running; that is a stop, not a fault,
    and its log holds no traceback (APScheduler logs one for anything its task raises)."""
    import anyio

    async with App(make_settings(tmp_path, DaemonSettings, scheduler={"stale_temp_interval": 0.5})) as app:
        d, journal = dispatcher(app, tmp_path)
        hk = Housekeeping(app, d, journal, d.metrics)
        started, ended = anyio.Event(), anyio.Event()

        async def slow() -> int:
            started.set()
            try:
                await anyio.sleep(60)
            finally:
                ended.set()
            return 0

        hk.stale_temp_files = slow  # type: ignore[method-assign]
        scheduler = build_scheduler(hk, pickup=False)
        scheduler.start()
        with anyio.fail_after(10):
            await started.wait()
        scheduler.shutdown(wait=False)
        with anyio.fail_after(10):
            await ended.wait()
        await anyio.sleep(0.1)  # the executor's done-callback runs after the task's last step
        journal.close()
    failures = [r for r in caplog.records if r.exc_info or "raised an exception" in r.getMessage()]
    assert not failures, caplog.text
