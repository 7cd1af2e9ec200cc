"""Housekeeping on a timer (APScheduler 3, asyncio), inside the daemon's event loop.

* **pickup** (once, at start): jobs the previous process had queued or running run again;
* **catalog poll** (optional): submitted jobs nobody triggered (needs a catalog that lists jobs);
* **retrieval cleanup**: retrieval objects whose download links expired are deleted;
* **stale temp files**: what crashed writers left on the LTS (and any storage that has them);
* **free space**: the ``moverd_storage_free_bytes`` metric;
* **journal prune** (daily): jobs that ended more than ``journal_retention`` ago are forgotten.

Every task is idempotent, so several daemons sharing storages may all run them. A task that fails
logs one line and runs again at its next time; none can take the daemon down.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from apscheduler.schedulers.asyncio import AsyncIOScheduler

from moverd.app import App
from moverd.errors import UnsafePathError
from moverd.keys import safe_key
from moverd.models import JobStatus

from .dispatch import Dispatcher, NotAcceptingError
from .ingest.service import Ingest
from .journal import Journal
from .metrics import Metrics
from .settings import daemon_settings

log = logging.getLogger(__name__)

SAMPLE_SECONDS = 5.0
"""How often byte counts are sampled for the throughput gauge."""

JOURNAL_PRUNE_INTERVAL = 86400.0
"""How often ended jobs past ``scheduler.journal_retention`` are forgotten."""


class Housekeeping:
    def __init__(self, app: App, dispatcher: Dispatcher, journal: Journal, metrics: Metrics,
                 ingest: Ingest | None = None) -> None:
        self.app = app
        self.dispatcher = dispatcher
        self.journal = journal
        self.metrics = metrics
        self.ingest = ingest
        self.settings = daemon_settings(app).scheduler

    async def pickup(self) -> list[str]:
        resumed = await self.dispatcher.pickup()
        if resumed:
            log.info("resumed %d interrupted job(s): %s", len(resumed), ", ".join(resumed))
        return resumed

    async def poll_catalog(self) -> int:
        """Submit the catalog's jobs still at ``jobSubmitted``; the dispatcher skips ones it has."""
        lister = getattr(self.app.catalog, "list_jobs", None)
        if lister is None:
            log.warning("the %r catalog cannot list jobs: scheduler.poll_catalog_interval has no effect",
                        self.app.catalog.type_name)
            return 0
        count = 0
        for job in await lister(status=JobStatus.submitted.value):
            try:
                _, created = await self.dispatcher.submit(job.id, job.type.value, job)
            except NotAcceptingError:
                return count
            if created:
                count += 1
                log.info("picked up submitted %s job %s from the catalog", job.type.value, job.id)
        return count

    def _links_keep_for(self) -> float:
        """How long after its last use a retrieval copy is kept: its links' lifetime + the margin."""
        return self.app.settings.retrieve.url_expiry + self.settings.retrieval_cleanup_margin

    async def retrieval_cleanup(self, now: float | None = None) -> int:
        """Delete retrieval objects whose links expired (``retrieve.url_expiry`` + the margin).

        An object's age alone is not enough: a later job reuses a copy and hands out fresh links.
        The newest of its modification time and the end of the last retrieve job of its dataset
        that this daemon knows (the journal) counts.
        """
        now = time.time() if now is None else now
        keep_for = self._links_keep_for()
        linked: dict[str, float] = {}
        template = self.app.settings.retrieve.retrieval_prefix
        for entry in await self.journal.retrievals_since(now - keep_for):
            for pid in entry.datasets:
                try:
                    prefix = safe_key(template.format(pid=pid), allow_empty=True)
                except (UnsafePathError, KeyError, ValueError):
                    continue
                linked[prefix] = max(linked.get(prefix, 0.0), entry.finished or 0.0)
        storage = self.app.storage("retrieval")
        expired = []
        async for info in storage.list(""):
            last = info.mtime
            for prefix, t in linked.items():
                if not prefix or info.key.startswith(prefix.rstrip("/") + "/"):
                    last = max(last, t)
            if now - last > keep_for:
                expired.append(info.key)
        for key in expired:
            await storage.delete(key)
        if expired:
            log.info("deleted %d retrieval object(s) whose links expired", len(expired))
            self.metrics.housekeeping.labels(task="retrieval_cleanup").inc(len(expired))
        return len(expired)

    async def journal_prune(self, now: float | None = None) -> int:
        """Forget jobs that ended more than ``journal_retention`` ago (at least as long as the
        retrieval cleanup needs them)."""
        retention = self.settings.journal_retention
        if retention <= 0:
            return 0
        now = time.time() if now is None else now
        keep_for = max(retention, self._links_keep_for())
        removed = await self.journal.prune(now - keep_for)
        if removed:
            log.info("forgot %d job(s) that ended more than %.0f days ago", removed, keep_for / 86400)
            self.metrics.housekeeping.labels(task="journal_prune").inc(removed)
        return removed

    async def stale_temp_files(self) -> int:
        total = 0
        for name in sorted(self.app.settings.storages):
            removed = await self.app.storage(name).remove_stale_temp_files(self.settings.stale_temp_age)
            if removed:
                log.info("removed %d stale temporary file(s) from storage %s", removed, name)
                total += removed
        if total:
            self.metrics.housekeeping.labels(task="stale_temp_files").inc(total)
        return total

    async def free_space(self) -> None:
        for name in sorted(self.app.settings.storages):
            free = await self.app.storage(name).free_space()
            if free is not None:
                self.metrics.free_bytes.labels(storage=name).set(free)
        if self.ingest is not None:  # the landing quota, also between upload requests
            self.metrics.landing_usage(await self.ingest.quota.usage())

    async def sample(self) -> None:
        self.metrics.sample()


def _logged(name: str, fn: Callable[[], Awaitable[Any]]) -> Callable[[], Awaitable[None]]:
    async def run() -> None:
        try:
            await fn()
        except asyncio.CancelledError:
            # The scheduler's shutdown cancels the tasks still running, and APScheduler's
            # run_coroutine_job, the only frame above this one in that task, logs whatever it
            # gets, a cancellation included, as a failed job with a traceback. A task stopped
            # there is no fault: every task is idempotent and runs again at the next start. A
            # CancelledError without a cancellation of this task is not that, and goes on.
            task = asyncio.current_task()
            if task is None or not task.cancelling():
                raise
            log.debug("housekeeping task %s stopped by the shutdown", name)
        except Exception as exc:
            log.warning("housekeeping task %s failed: %s", name, exc)

    run.__name__ = name
    return run


def build_scheduler(hk: Housekeeping, *, pickup: bool = True) -> AsyncIOScheduler:
    """The scheduler with every task the configuration turns on; not started."""
    s = hk.settings
    scheduler = AsyncIOScheduler(
        event_loop=asyncio.get_running_loop(),
        job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 300},
    )
    scheduler.add_job(_logged("sample", hk.sample), "interval", seconds=SAMPLE_SECONDS, id="sample")
    if not s.enabled:
        return scheduler
    if pickup and s.pickup_interrupted:
        scheduler.add_job(_logged("pickup", hk.pickup), "date", id="pickup")
    tasks: list[tuple[str, float, Callable[[], Awaitable[Any]], bool]] = [
        ("poll_catalog", s.poll_catalog_interval, hk.poll_catalog, True),
        ("retrieval_cleanup", s.retrieval_cleanup_interval, hk.retrieval_cleanup, False),
        ("stale_temp_files", s.stale_temp_interval, hk.stale_temp_files, False),
        ("journal_prune", JOURNAL_PRUNE_INTERVAL if s.journal_retention > 0 else 0, hk.journal_prune, False),
        ("free_space", s.free_space_interval, hk.free_space, True),
    ]
    for name, interval, fn, now in tasks:
        if interval > 0:
            # Tasks that feed the API or metrics run at once; the cleanups wait one interval.
            first = {"next_run_time": _now()} if now else {}
            scheduler.add_job(_logged(name, fn), "interval", seconds=interval, id=name, **first)
    return scheduler


def _now() -> Any:
    from datetime import datetime

    return datetime.now().astimezone()
