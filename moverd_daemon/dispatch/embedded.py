"""The embedded mode (no ``PREFECT_API_URL``): flow runs are created here and run here, in order."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import anyio

from moverd.models import Job

from ..settings import daemon_settings
from .base import Dispatcher
from .runs import JobRun, Mode, NotAcceptingError, NotServedError

if TYPE_CHECKING:
    from prefect.client.schemas.objects import FlowRun

log = logging.getLogger(__name__)



class EmbeddedDispatcher(Dispatcher):
    """No shared Prefect server: flow runs are created here and run here, in order."""

    mode: Mode = "embedded"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._queue: list[JobRun] = []

    def queued(self) -> int:
        return len(self._queue)

    async def submit(self, job_id: str, job_type: str, job: Job | None = None) -> tuple[JobRun, bool]:
        from prefect.states import Scheduled

        async with self._lock(job_id):
            existing = self.runs.get(job_id)
            if existing is not None and not existing.final:
                return existing, False
            if not self._accepting:
                raise NotAcceptingError("moverd is shutting down and takes no new jobs")
            served = daemon_settings(self.app).server.job_types
            if job_type not in served:
                raise NotServedError(f"this daemon runs only {' and '.join(served)} "
                                     f"jobs (server.job_types), not {job_type} jobs")
            flow = self.flow_for(job_type)
            flow_run = await self.client.create_flow_run(
                flow, name=self.run_name(job_type, job_id), parameters={"job_id": job_id, "config": self.config},
                tags=self.tags(job_type, job_id), state=Scheduled(),
            )
            run = JobRun(job_id, job_type, str(flow_run.id), flow_run.name, daemon=self.name, flow_run=flow_run,
                         job=job)
            await self.journal.record(job_id, job_type, run.flow_run_id, run.flow_run_name, "queued",
                                      [d.pid for d in job.datasets] if job else None)
            self._enqueue(run)
            return run, True

    def _enqueue(self, run: JobRun) -> None:
        self.runs[run.job_id] = run
        self._queue.append(run)
        self.metrics.jobs_queued.set(len(self._queue))
        self._poke()

    async def _requeue(self, job_id: str, job_type: str, flow_run: FlowRun | None, state: str | None) -> bool:
        if flow_run is None or state != "SCHEDULED" or job_id in self.runs:
            return False
        self._enqueue(JobRun(job_id, job_type, str(flow_run.id), flow_run.name or "", daemon=self.name,
                             flow_run=flow_run))
        log.info("queued again %s job %s (never started before the stop)", job_type, job_id)
        return True

    async def _loop(self, tg: anyio.abc.TaskGroup) -> None:
        while not self._stopping:
            if self._queue and self._running < self.max_jobs:
                run = self._queue.pop(0)
                self.metrics.jobs_queued.set(len(self._queue))
                assert run.flow_run is not None
                try:
                    claimed = await self._claim(run.flow_run)
                except Exception as exc:
                    log.error("cannot start job %s: %s", run.job_id, exc)
                    self._queue.insert(0, run)
                    await self._sleep(2.0)
                    continue
                if not claimed:
                    run.state = "CANCELLED"
                    await self.journal.set_state(run.job_id, "failed", "the flow run was taken or cancelled elsewhere")
                    continue
                run.state = "PENDING"
                self._started(run)
                tg.start_soon(self._execute, run, self.flow_for(run.type))
                continue
            await self._sleep(60.0)
