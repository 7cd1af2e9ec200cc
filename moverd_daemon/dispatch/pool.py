"""The scale-out mode (a shared Prefect server): jobs are deployment runs on the work pools,
claimed by whichever daemon has room.

A job also outlives the daemon that runs it (:mod:`moverd_flows.takeover`): the daemon sends a
heartbeat for each run it executes, the server's automation marks a run whose heartbeats stopped
Orphaned, and every daemon claims Orphaned runs of its deployments as it claims scheduled ones.
A daemon that comes back finds its journaled runs taken over, or leaves them to that same claim,
so that a job never runs twice at once."""

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
        self._served = [i for i, s in self.specs.items() if s.job_type in types]
        self._window: float | None = None
        self._window_read = False
        self._beat_scope = anyio.CancelScope()
        self._unarmed: set[str] = set()

    def queued(self) -> int:
        return self._scheduled

    async def _takeover_window(self) -> float | None:
        """The window of the server's takeover automation (read once; None: no takeover)."""
        if not self._window_read:
            from moverd_flows.takeover import takeover_window

            window = await takeover_window(self.client)
            self._window, self._window_read = window, True
            configured = daemon_settings(self.app).server.takeover_after
            if window is None:
                log.error("no takeover automation on the Prefect server ('moverd prefect setup' creates it): "
                          "a job whose daemon dies waits for that daemon's restart")
            elif abs(window - configured) >= 1:
                log.warning("the Prefect server's takeover window is %g s, server.takeover_after here %g s: "
                            "heartbeats follow the server's", window, configured)
            prefect = daemon_settings(self.app).prefect
            if window is not None and prefect.global_limits and window <= prefect.slot_lease:
                log.warning("the takeover window (%g s) is not above prefect.slot_lease (%g s): a daemon cut off "
                            "from Prefect may still be writing when its job is taken over", window, prefect.slot_lease)
        return self._window

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
        from moverd_flows.takeover import is_orphaned
        from prefect.deployments import arun_deployment

        async with self._lock(job_id):
            existing = self.runs.get(job_id)
            if existing is not None and existing.local and not existing.final:
                return existing, False
            previous = await self._prefect_runs(job_id)
            # An Orphaned run is Crashed, but a daemon of the pool is about to take it over.
            active = [r for r in previous if r.state is None or not r.state.is_final() or is_orphaned(r)]
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
        tg.start_soon(self._beat)
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
        await self._idle.wait()  # running jobs beat until they end
        self._beat_scope.cancel()

    async def _beat(self) -> None:
        """A heartbeat for every run this daemon executes, ``BEATS_PER_WINDOW`` times per window,
        and the fence: a run whose heartbeats have not got through for most of the window stops
        here, before the automation can give it to another daemon (Prefect unreachable from
        here, or this host frozen and thawed)."""
        from moverd_flows.takeover import heartbeat_interval

        with self._beat_scope:
            while True:
                try:
                    window = await self._takeover_window()
                except Exception as exc:
                    log.warning("cannot read the takeover automation: %s", exc)
                    await anyio.sleep(self.poll_interval)
                    continue
                if window is None:
                    return
                break
            interval = heartbeat_interval(window)
            due = -math.inf
            while True:
                now = time.monotonic()
                self._fence(now, window - interval / 2)
                if now >= due:
                    due = now + interval
                    with anyio.move_on_after(interval / 2):
                        await self._beat_once()
                await anyio.sleep(min(1.0, interval / 4))

    def _fence(self, now: float, limit: float) -> None:
        for run in self.runs.values():
            if run.local and not run.final and run.lost is None and now - run.beat > limit:
                run.lost = (f"no heartbeat of its flow run got through for {now - run.beat:.0f} s; it may be "
                            "another daemon's by now")
                run.fence.cancel()
                self._unarmed.add(run.flow_run_id)

    async def _beat_once(self) -> None:
        live = [r for r in self.runs.values() if r.local and not r.final and r.lost is None]
        sent = time.monotonic()
        if await self._send_heartbeats([r.flow_run_id for r in live]):
            for r in live:
                r.beat = max(r.beat, sent)
        # A fenced run gets one more heartbeat, so that the automation orphans it even if none of
        # its earlier ones reached the server.
        unarmed = sorted(self._unarmed)
        if unarmed and await self._send_heartbeats(unarmed):
            self._unarmed.difference_update(unarmed)

    async def _send_heartbeats(self, flow_run_ids: list[str]) -> bool:
        from moverd_flows.takeover import send_heartbeats

        try:
            await send_heartbeats(self.client, flow_run_ids, self.name)
            return True
        except Exception as exc:
            log.warning("could not send the heartbeats of %d job(s): %s", len(flow_run_ids), exc)
            return False

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
                await self._take(tg, fr, spec)
        self._scheduled = scheduled
        self.metrics.jobs_queued.set(scheduled)
        if self._running < self.max_jobs and not self._stopping and await self._takeover_window() is not None:
            await self._take_over(tg)

    async def _take_over(self, tg: anyio.abc.TaskGroup) -> None:
        """Claim Orphaned runs of the deployments this daemon serves, as many as it has room for."""
        from moverd_flows.takeover import orphaned_runs

        for fr in await orphaned_runs(self.client, self._served):
            if self._running >= self.max_jobs or self._stopping:
                return
            mine = self.runs.get(str((fr.parameters or {}).get("job_id", "")))
            if mine is not None and mine.local and not mine.final:
                continue  # still running here: the automation saw no heartbeat of a live daemon
            assert fr.deployment_id is not None
            if await self._take(tg, fr, self.specs[fr.deployment_id], orphaned=True):
                self.metrics.taken_over.inc()

    async def _take(self, tg: anyio.abc.TaskGroup, fr: FlowRun, spec: DeploymentSpec, *,
                    orphaned: bool = False) -> bool:
        """Claim the run and start it here; False when another daemon was first."""
        if not await self._claim(fr):
            return False
        if self._window is not None:
            # At once: a run claimed here that never starts (this daemon dies, or the next steps
            # fail) is orphaned too, and goes to another daemon.
            await self._send_heartbeats([str(fr.id)])
        if orphaned:
            fr = await self.client.read_flow_run(fr.id)
        job_id = str((fr.parameters or {}).get("job_id", ""))
        run = JobRun(job_id, spec.job_type, str(fr.id), fr.name or "", state="PENDING", daemon=self.name,
                     flow_run=fr)
        self.runs[job_id] = run
        await self.journal.record(job_id, spec.job_type, run.flow_run_id, run.flow_run_name, "running")
        self._started(run)
        tg.start_soon(self._execute, run, spec.flow)
        log.info("%s %s job %s (flow run %s)", "took over" if orphaned else "took", spec.job_type, job_id, fr.id)
        return True

    async def _mark_crashed(self, run: JobRun) -> None:
        """A job aborted at a stop goes to the pool at once, as Orphaned, rather than waiting for
        this daemon's next start (without takeover: Crashed, and resumed at that start)."""
        from moverd_flows.takeover import ORPHANED
        from prefect.states import Crashed

        if self._window is None:
            return await super()._mark_crashed(run)
        try:
            current = await self.client.read_flow_run(UUID(run.flow_run_id))
            state, owner = current.state, (current.labels or {}).get("moverd.daemon")
            if (state is not None and state.is_final() and not state.is_crashed()) or owner != self.name:
                return  # it ended, or it is another daemon's now
            await self.client.set_flow_run_state(UUID(run.flow_run_id), Crashed(
                name=ORPHANED, message=f"moverd daemon {self.name} stopped; another daemon of the pool "
                                       "takes the job over"), force=True)
        except Exception as exc:
            log.warning("could not hand flow run %s over to the pool: %s", run.flow_run_id, exc)

    async def _left_to_takeover(self, job_id: str, flow_run: FlowRun | None) -> bool:
        """A run of the previous process, with takeover on: Orphaned or in the pool, it goes to
        the first daemon to claim it (this one, maybe); claimed elsewhere, it is that daemon's;
        still Running under this daemon's name, it gets one heartbeat, so that the automation
        orphans it within the window even if that process died before its first one."""
        from moverd_flows.takeover import is_orphaned

        if flow_run is None or flow_run.state is None or await self._takeover_window() is None:
            return False
        owner = (flow_run.labels or {}).get("moverd.daemon")
        if is_orphaned(flow_run) or flow_run.state.is_scheduled():
            why = "left to the pool: the first daemon to claim it runs it"
        elif flow_run.state.is_final():
            return False  # crashed at a stop, or ended: as without takeover
        elif owner != self.name:
            why = f"taken over by {owner}"
        else:
            await self._send_heartbeats([str(flow_run.id)])
            why = "its heartbeats stopped with the previous process: it is orphaned within the takeover window"
        await self.journal.set_state(job_id, "interrupted", f"not resumed here: {why}")
        log.info("job %s (flow run %s) not resumed here: %s", job_id, flow_run.id, why)
        return True
