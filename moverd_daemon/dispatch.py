"""Job execution in the daemon: every job a Prefect flow run, run in this process, a bounded number
at once.

Two ways in, one way to run:

* **embedded** (no ``PREFECT_API_URL``): ``POST /jobs`` creates the flow run (state Scheduled, so
  its id and name can be answered at once) and queues it here;
* **scale-out** (a shared Prefect server): ``POST /jobs`` creates a run of the job type's deployment
  on its work pool, and every daemon polls both pools; the first to move a run to Pending owns it
  (Prefect refuses the second claim), so each job runs once, on whichever host has room.

Either way the flow runs in this process with :func:`prefect.flow_engine.run_flow_async`, sharing
the daemon's :class:`~moverd.app.App` (its LTS slots, its connections, its metrics), and reports
its datasets' :class:`~moverd.Transfer` objects for ``GET /jobs/{id}``.

A second submission of a job that has a run not yet final answers that run. On SIGTERM the daemon
stops taking jobs, lets running ones go on for the grace period and then cancels them: the core
aborts half-written datablocks, the flow run is marked Crashed, and the journal keeps the job open
so that the next start runs it again (:meth:`Dispatcher.pickup`), resuming from what was committed.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal
from uuid import UUID

import anyio

from moverd.app import App
from moverd.events import Transfer
from moverd.models import Job

from .journal import Journal
from .metrics import Metrics
from .settings import daemon_settings

if TYPE_CHECKING:
    from moverd_flows.deployments import DeploymentSpec
    from prefect import Flow
    from prefect.client.orchestration import PrefectClient
    from prefect.client.schemas.objects import FlowRun

log = logging.getLogger(__name__)

FINAL_STATES = frozenset({"COMPLETED", "FAILED", "CRASHED", "CANCELLED"})
HEARTBEAT_SECONDS = 30.0
KEEP_FINISHED = 1000
"""Finished jobs kept in memory for ``GET /jobs`` (older ones are still in the journal and Prefect)."""

Mode = Literal["embedded", "scale-out"]


class NotAcceptingError(Exception):
    """The daemon is shutting down and takes no new jobs."""


class NotServedError(Exception):
    """This daemon does not run jobs of this type (``server.job_types``) and nobody else would."""


def job_tag(job_id: str) -> str:
    return f"moverd-job:{job_id}"


def _iso(t: float | None) -> str | None:
    return datetime.fromtimestamp(t, UTC).isoformat() if t else None


def _percent(done: int, total: int) -> float:
    return round(min(100.0, 100.0 * done / total), 2) if total else 0.0


@dataclass
class JobRun:
    """One job as the daemon knows it: its flow run, its state and its live progress."""

    job_id: str
    type: str
    flow_run_id: str
    flow_run_name: str
    state: str = "SCHEDULED"
    """Prefect state type of the flow run (SCHEDULED, PENDING, RUNNING, COMPLETED, FAILED, CRASHED...)."""
    submitted: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    status: str | None = None
    """The catalog status the job ended with (``finishedSuccessful`` ...), once it ended."""
    message: str = ""
    daemon: str | None = None
    local: bool = True
    """Runs (or ran, or will run) in this process; otherwise another daemon's, as Prefect tells."""
    transfers: list[Transfer] = field(default_factory=list)
    flow_run: FlowRun | None = field(default=None, repr=False)
    job: Job | None = field(default=None, repr=False)

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES

    @property
    def job_status(self) -> str | None:
        """The job's catalog status as far as the run tells, for ``GET /jobs`` (which reads no
        catalog): the one it ended with, else ``inProgress`` while its flow runs (the job service
        sets that first thing)."""
        if self.status is None and self.state == "RUNNING":
            return "inProgress"
        return self.status

    def view(self) -> dict[str, Any]:
        """The JSON of ``GET /jobs/{id}``."""
        datasets = [{
            "pid": t.dataset, "kind": t.kind, "bytes_total": t.bytes_total, "bytes_done": t.bytes_done,
            "files_total": t.files_total, "files_done": t.files_done, "datablocks_total": t.datablocks_total,
            "datablocks_done": t.datablocks_done, "percent": _percent(t.bytes_done, t.bytes_total),
        } for t in self.transfers]
        total = sum(t.bytes_total for t in self.transfers)
        done = sum(t.bytes_done for t in self.transfers)
        elapsed = (self.finished or time.time()) - self.started if self.started else 0.0
        return {
            "id": self.job_id, "type": self.type,
            "flow_run": {"id": self.flow_run_id, "name": self.flow_run_name, "state": self.state},
            "daemon": self.daemon, "status": self.job_status, "message": self.message,
            "submitted": _iso(self.submitted), "started": _iso(self.started), "finished": _iso(self.finished),
            "progress": None if not self.local else {
                "percent": 100.0 if self.state == "COMPLETED" else _percent(done, total),
                "bytes_total": total, "bytes_done": done,
                "bytes_per_second": round(done / elapsed, 1) if elapsed > 0 else 0.0,
                "files_total": sum(t.files_total for t in self.transfers),
                "files_done": sum(t.files_done for t in self.transfers),
                "datablocks_total": sum(t.datablocks_total for t in self.transfers),
                "datablocks_done": sum(t.datablocks_done for t in self.transfers),
                "datasets": datasets,
            },
        }


class Dispatcher:
    """Accepts jobs, runs at most ``max_jobs`` of them at once, drains on shutdown."""

    mode: Mode = "embedded"

    def __init__(self, app: App, client: PrefectClient, journal: Journal, metrics: Metrics, *,
                 name: str, config: str | None) -> None:
        self.app = app
        self.client = client
        self.journal = journal
        self.metrics = metrics
        self.name = name
        self.config = config
        self.max_jobs = daemon_settings(app).server.max_jobs
        self.runs: dict[str, JobRun] = {}
        self._locks: dict[str, anyio.Lock] = {}
        self._accepting = True
        self._stopping = False
        self._running = 0
        self._wake = anyio.Event()
        self._idle = anyio.Event()
        self._idle.set()
        self._done = anyio.Event()
        self._tg: anyio.abc.TaskGroup | None = None

    # -- flows ---------------------------------------------------------------------------------

    @staticmethod
    def flow_for(job_type: str) -> Flow[..., Any]:
        from moverd_flows.jobs import archive_job_flow, retrieve_job_flow

        return archive_job_flow if job_type == "archive" else retrieve_job_flow

    @staticmethod
    def run_name(job_type: str, job_id: str) -> str:
        return f"{job_type}-job {job_id}"

    def tags(self, job_type: str, job_id: str) -> list[str]:
        return ["moverd", f"moverd-{job_type}", job_tag(job_id)]

    # -- state ---------------------------------------------------------------------------------

    @property
    def accepting(self) -> bool:
        return self._accepting

    @property
    def running(self) -> int:
        return self._running

    def queued(self) -> int:
        return 0

    def _lock(self, job_id: str) -> anyio.Lock:
        return self._locks.setdefault(job_id, anyio.Lock())

    def _poke(self) -> None:
        self._wake.set()

    async def _sleep(self, seconds: float) -> None:
        with anyio.move_on_after(seconds):
            await self._wake.wait()
        self._wake = anyio.Event()

    # -- the interface the API and the scheduler use ---------------------------------------------

    async def submit(self, job_id: str, job_type: str, job: Job | None = None) -> tuple[JobRun, bool]:
        """Start a run of the job, or answer the one not yet final; ``(run, created)``."""
        raise NotImplementedError

    async def lookup(self, job_id: str) -> JobRun | None:
        run = self.runs.get(job_id)
        if run is not None and run.local:
            return run
        entry = await self.journal.get(job_id)
        if entry is None:
            return run
        state = {"done": "COMPLETED", "failed": "FAILED", "interrupted": "CRASHED"}.get(entry.state, "SCHEDULED")
        if entry.state == "running":
            state = "CRASHED"  # not in self.runs: the previous process had it
        return JobRun(entry.job_id, entry.type, entry.flow_run_id, entry.flow_run_name, state=state,
                      submitted=entry.submitted, started=entry.started, finished=entry.finished,
                      status=entry.message.split(":", 1)[0] if entry.state == "done" else None,
                      message=entry.message, daemon=self.name)

    async def serve(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Run jobs until :meth:`drain`; returns when every job this daemon started has ended."""
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                task_status.started()
                await self._loop(tg)
        finally:
            self._done.set()

    async def drain(self, grace: float) -> int:
        """Stop taking jobs; give running ones ``grace`` seconds, then abort them. Returns how many
        were aborted (they resume at the next start)."""
        self._accepting = False
        self._stopping = True
        self._poke()
        aborted = 0
        if self._running:
            log.info("waiting up to %.0f s for %d running job(s) to finish", grace, self._running)
            with anyio.move_on_after(grace):
                await self._idle.wait()
            if self._running and self._tg is not None:
                aborted = self._running
                log.warning("aborting %d job(s) still running after %.0f s; they resume at the next start",
                            aborted, grace)
                self._tg.cancel_scope.cancel()
        with anyio.move_on_after(max(grace, 0) + 60):
            await self._done.wait()
        return aborted

    def abort(self) -> None:
        """Cancel running jobs now (a second SIGTERM): they resume at the next start."""
        self._accepting = False
        self._stopping = True
        self._poke()
        if self._tg is not None:
            self._tg.cancel_scope.cancel()

    async def pickup(self) -> list[str]:
        """Run again the jobs the previous process had queued or running."""
        from prefect.exceptions import ObjectNotFound
        from prefect.states import Crashed

        resumed = []
        for entry in await self.journal.interrupted():
            flow_run = None
            try:
                flow_run = await self.client.read_flow_run(UUID(entry.flow_run_id))
            except (ObjectNotFound, ValueError):
                pass
            state = flow_run.state.type.value if flow_run is not None and flow_run.state is not None else None
            if await self._requeue(entry.job_id, entry.type, flow_run, state):
                resumed.append(entry.job_id)
                continue
            if state in ("COMPLETED", "FAILED", "CANCELLED"):
                # It ended (or an operator cancelled it) before the journal heard: running it again
                # would find its landing zone gone; leave it as it is.
                await self.journal.set_state(entry.job_id, "done" if state == "COMPLETED" else "failed",
                                             f"flow run ended {state} before the daemon stopped")
                continue
            if flow_run is not None and state not in FINAL_STATES:
                try:
                    await self.client.set_flow_run_state(flow_run.id, Crashed(
                        message=f"moverd daemon {self.name} stopped while this run was in progress; "
                                "the job was resumed in a new run"), force=True)
                except Exception as exc:
                    log.warning("could not mark flow run %s crashed: %s", flow_run.id, exc)
            await self.journal.set_state(entry.job_id, "interrupted", "interrupted; resumed in a new run")
            try:
                await self.submit(entry.job_id, entry.type)
                resumed.append(entry.job_id)
                log.info("resuming %s job %s, interrupted by a stop or a crash", entry.type, entry.job_id)
            except Exception as exc:
                log.error("could not resume job %s: %s", entry.job_id, exc)
        return resumed

    async def _requeue(self, job_id: str, job_type: str, flow_run: FlowRun | None, state: str | None) -> bool:
        """Embedded: a run still Scheduled never started; queue that same run again."""
        return False

    # -- running one job -------------------------------------------------------------------------

    async def _loop(self, tg: anyio.abc.TaskGroup) -> None:
        raise NotImplementedError

    async def _claim(self, flow_run: FlowRun) -> bool:
        """Move the run to Pending; False when another daemon (or an operator) was first."""
        from prefect.exceptions import Abort
        from prefect.states import Pending
        from prefect.utilities.engine import propose_state

        try:
            state = await propose_state(self.client, Pending(), flow_run_id=flow_run.id)
        except Abort as exc:
            log.debug("flow run %s taken elsewhere: %s", flow_run.id, exc)
            return False
        if not state.is_pending():
            return False
        try:
            await self.client.update_flow_run_labels(flow_run.id, {"moverd.daemon": self.name})
        except Exception as exc:  # labels are for operators; never fail a job for them
            log.debug("could not label flow run %s: %s", flow_run.id, exc)
        return True

    def _started(self, run: JobRun) -> None:
        if self._running == 0:
            self._idle = anyio.Event()
        self._running += 1
        self.metrics.jobs_running.set(self._running)

    def _prune(self) -> None:
        finished = sorted((r for r in self.runs.values() if r.final), key=lambda r: r.finished or r.submitted)
        for run in finished[:max(len(finished) - KEEP_FINISHED, 0)]:
            del self.runs[run.job_id]
            self._locks.pop(run.job_id, None)

    def _ended(self) -> None:
        self._prune()
        self._running -= 1
        self.metrics.jobs_running.set(self._running)
        if self._running == 0:
            self._idle.set()
        self._poke()

    async def _execute(self, run: JobRun, flow: Flow[..., Any]) -> None:
        from prefect.flow_engine import run_flow_async

        assert run.flow_run is not None
        run.state, run.started, run.daemon, run.local = "RUNNING", time.time(), self.name, True
        t0 = time.monotonic()
        status = "failed"

        def report(t: Transfer) -> None:
            run.transfers.append(t)
            self.metrics.track(t)

        params = {**(run.flow_run.parameters or {}), "job_id": run.job_id, "app": self.app, "on_transfer": report}
        if run.job is not None:
            params["job"] = run.job
        try:
            await self.journal.set_state(run.job_id, "running")
            result = await run_flow_async(flow, flow_run=run.flow_run, parameters=params, return_type="result")
            res = result if isinstance(result, dict) else {}
            run.status = status = str(res.get("status") or "unknown")
            run.message = str(res.get("message") or "")
            run.state = "COMPLETED"
            await self.journal.set_state(run.job_id, "done", f"{status}: {run.message}"[:2000],
                                         datasets=[t.dataset for t in run.transfers])
            log.info("%s job %s: %s", run.type, run.job_id, status)
        except Exception as exc:
            run.state, run.message = "FAILED", f"{type(exc).__name__}: {exc}"
            log.error("%s job %s failed: %s", run.type, run.job_id, run.message)
            with anyio.CancelScope(shield=True):
                await self.journal.set_state(run.job_id, "failed", run.message[:2000])
        except BaseException:
            # Cancelled by a shutdown: the journal keeps the job open; it resumes at the next start.
            run.state, run.message, status = "CRASHED", "interrupted: the daemon stopped", "interrupted"
            with anyio.CancelScope(shield=True):
                with anyio.move_on_after(30):
                    await self._discard_unindexed(run)
                with anyio.move_on_after(10):
                    await self._mark_crashed(run)
            raise
        finally:
            run.finished = time.time()
            for t in run.transfers:
                self.metrics.settle(t)
            self.metrics.job_finished(run.type, status, time.monotonic() - t0)
            self._ended()

    async def _discard_unindexed(self, run: JobRun) -> None:
        """Remove the tars an aborted archive committed without their member index.

        The core publishes a datablock's tar, then its index, inside one LTS write section; a
        cancel between the two leaves a whole tar that is not a datablock yet (never verified nor
        registered: a resume writes it again). Nothing of an aborted job may look half-done on the
        LTS, so those tars go now.
        """
        from moverd.models import index_key
        from moverd.planner import dataset_folder

        if run.type != "archive":
            return
        lts = self.app.storage("lts")
        for t in run.transfers:
            try:
                keys = {info.key async for info in lts.list(dataset_folder(t.dataset))}
                for key in sorted(k for k in keys if k.endswith(".tar") and index_key(k) not in keys):
                    await lts.delete(key)
                    log.info("removed %s: committed without its index when job %s was aborted", key, run.job_id)
            except Exception as exc:
                log.warning("could not check the LTS for unfinished datablocks of %s: %s", t.dataset, exc)

    async def _mark_crashed(self, run: JobRun) -> None:
        from prefect.states import Crashed

        try:
            current = await self.client.read_flow_run(UUID(run.flow_run_id))
            if current.state is not None and current.state.is_final():
                return
            await self.client.set_flow_run_state(UUID(run.flow_run_id), Crashed(
                message=f"moverd daemon {self.name} stopped; the job resumes at its next start"), force=True)
        except Exception as exc:
            log.warning("could not mark flow run %s crashed: %s", run.flow_run_id, exc)


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


def make_dispatcher(mode: Mode, app: App, client: PrefectClient, journal: Journal, metrics: Metrics, *,
                    name: str, config: str | None, specs: dict[UUID, DeploymentSpec] | None = None) -> Dispatcher:
    if mode == "embedded":
        return EmbeddedDispatcher(app, client, journal, metrics, name=name, config=config)
    return PoolDispatcher(app, client, journal, metrics, name=name, config=config, specs=specs or {})


ReadyCheck = Callable[[], Any]
