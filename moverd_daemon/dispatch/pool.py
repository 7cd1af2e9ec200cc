"""The scale-out mode (a shared Prefect server): jobs are deployment runs on the work pools,
claimed by whichever daemon has room."""

from __future__ import annotations

import logging
import math
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from uuid import UUID

import anyio

from moverd.models import Job

from ..settings import daemon_settings
from .base import Dispatcher
from .runs import HEARTBEAT_SECONDS, JobRun, Mode, NotAcceptingError, job_tag

if TYPE_CHECKING:
    from moverd_flows.deployments import DeploymentSpec
    from prefect.client.schemas.objects import FlowRun

log = logging.getLogger(__name__)



class PoolDispatcher(Dispatcher):
    """A shared Prefect server: jobs are deployment runs on the work pools, claimed by any daemon."""

    mode: Mode = "scale-out"

    def __init__(self, *args: Any, specs: dict[UUID, DeploymentSpec], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.specs = specs
        self.poll_interval = daemon_settings(self.app).server.poll_interval
        self._last_heartbeat = -math.inf
        self._scheduled = 0
        types = daemon_settings(self.app).server.job_types
        self._pools = sorted({s.work_pool for s in self.specs.values() if s.job_type in types})

    def queued(self) -> int:
        return self._scheduled

    def _spec(self, job_type: str) -> DeploymentSpec:
        return next(s for s in self.specs.values() if s.job_type == job_type)

    async def _prefect_runs(self, job_id: str) -> list[FlowRun]:
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags
        from prefect.client.schemas.sorting import FlowRunSort

        return await self.client.read_flow_runs(
            flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[job_tag(job_id)])),
            sort=FlowRunSort.EXPECTED_START_TIME_DESC, limit=200,
        )

    def _from_prefect(self, job_id: str, job_type: str, fr: FlowRun) -> JobRun:
        state = fr.state.type.value if fr.state is not None else "SCHEDULED"
        labels = fr.labels or {}
        return JobRun(job_id, job_type, str(fr.id), fr.name or "", state=state, local=False,
                      daemon=str(labels.get("moverd.daemon")) if labels.get("moverd.daemon") else None,
                      submitted=fr.created.timestamp() if fr.created else time.time(),
                      started=fr.start_time.timestamp() if fr.start_time else None,
                      finished=fr.end_time.timestamp() if fr.end_time else None)

    async def submit(self, job_id: str, job_type: str, job: Job | None = None) -> tuple[JobRun, bool]:
        from prefect.deployments import arun_deployment

        async with self._lock(job_id):
            existing = self.runs.get(job_id)
            if existing is not None and existing.local and not existing.final:
                return existing, False
            previous = await self._prefect_runs(job_id)
            active = [r for r in previous if r.state is None or not r.state.is_final()]
            if active:
                return self._from_prefect(job_id, job_type, active[0]), False
            if not self._accepting:
                raise NotAcceptingError("moverd is shutting down and takes no new jobs")
            spec = self._spec(job_type)
            # Daemons that race on the same job compute the same key: Prefect returns one run.
            flow_run = await arun_deployment(
                spec.full_name, client=self.client, parameters={"job_id": job_id, "config": self.config},
                timeout=0, flow_run_name=self.run_name(job_type, job_id), tags=self.tags(job_type, job_id),
                idempotency_key=f"{job_tag(job_id)}#{len(previous)}", as_subflow=False,
            )
            run = self._from_prefect(job_id, job_type, flow_run)
            self._poke()  # this daemon may have room for it right away
            return run, True

    async def lookup(self, job_id: str) -> JobRun | None:
        run = self.runs.get(job_id)
        if run is not None and run.local and not run.final:
            return run
        runs = await self._prefect_runs(job_id)
        if runs:
            fr = runs[0]
            if run is not None and run.flow_run_id == str(fr.id):
                return run
            job_type = "retrieve" if "moverd-retrieve" in (fr.tags or []) else "archive"
            return self._from_prefect(job_id, job_type, fr)
        return await super().lookup(job_id)

    async def _loop(self, tg: anyio.abc.TaskGroup) -> None:
        failures = 0
        while not self._stopping:
            try:
                await self._heartbeat()
                await self._poll(tg)
                failures = 0
            except Exception as exc:
                failures += 1
                log.warning("polling the work pools failed (%d in a row): %s", failures, exc)
            await self._sleep(min(self.poll_interval * (2 ** min(failures, 5)), 60.0))

    async def _heartbeat(self) -> None:
        now = time.monotonic()
        if now - self._last_heartbeat < HEARTBEAT_SECONDS:
            return
        self._last_heartbeat = now
        for pool in self._pools:
            await self.client.send_worker_heartbeat(pool, self.name, heartbeat_interval_seconds=HEARTBEAT_SECONDS)

    async def _poll(self, tg: anyio.abc.TaskGroup) -> None:
        scheduled = 0
        # Rotate which pool is asked first, so that a flood of one job type cannot starve the other.
        self._pools = self._pools[1:] + self._pools[:1]
        for pool in list(self._pools):
            if self._stopping:
                return
            responses = await self.client.get_scheduled_flow_runs_for_work_pool(
                pool, scheduled_before=datetime.now(UTC))
            scheduled += len(responses)
            for response in responses:
                if self._running >= self.max_jobs or self._stopping:
                    break
                fr = response.flow_run
                spec = self.specs.get(fr.deployment_id) if fr.deployment_id else None
                if spec is None or spec.job_type not in daemon_settings(self.app).server.job_types:
                    continue  # another deployment on the same pool: not ours to run
                if not await self._claim(fr):
                    continue
                job_id = str((fr.parameters or {}).get("job_id", ""))
                run = JobRun(job_id, spec.job_type, str(fr.id), fr.name or "", state="PENDING", daemon=self.name,
                             flow_run=fr)
                self.runs[job_id] = run
                await self.journal.record(job_id, spec.job_type, run.flow_run_id, run.flow_run_name, "running")
                self._started(run)
                tg.start_soon(self._execute, run, spec.flow)
                log.info("took %s job %s (flow run %s)", spec.job_type, job_id, fr.id)
        self._scheduled = scheduled
        self.metrics.jobs_queued.set(scheduled)
