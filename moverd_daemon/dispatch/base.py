"""What both dispatchers do: accept jobs, run at most ``max_jobs`` at once as flow runs in this
process, journal them, drain on shutdown and pick interrupted ones up at the next start."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any
from uuid import UUID

import anyio

from moverd.app import App
from moverd.events import Transfer
from moverd.models import Job

from ..journal import Journal
from ..metrics import Metrics
from ..settings import daemon_settings
from .runs import FINAL_STATES, KEEP_FINISHED, JobRun, Mode, job_tag

if TYPE_CHECKING:
    from prefect import Flow
    from prefect.client.orchestration import PrefectClient
    from prefect.client.schemas.objects import FlowRun

log = logging.getLogger(__name__)



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
                log.info("job %s: its flow run ended %s; not run again", entry.job_id, state)
                continue
            if await self._left_to_takeover(entry.job_id, flow_run):
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

    async def _left_to_takeover(self, job_id: str, flow_run: FlowRun | None) -> bool:
        """Scale-out with takeover: the run is, or will be, another daemon's to claim; never run
        it here but through that claim."""
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
        from prefect.exceptions import Abort
        from prefect.flow_engine import run_flow_async

        assert run.flow_run is not None
        run.state, run.started, run.daemon, run.local = "RUNNING", time.time(), self.name, True
        t0 = time.monotonic()
        status = "failed"

        def report(t: Transfer) -> None:
            run.transfers.append(t)
            self.metrics.track(t)

        params = {**(run.flow_run.parameters or {}), "job_id": run.job_id, "app": self.app, "on_transfer": report,
                  "fence": run.fence}
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
        except Abort as exc:
            # Stopped here because the flow run is (or may be by now) another daemon's: Prefect
            # set no state, and nothing of this attempt is touched on the way out.
            run.state, status = "CRASHED", "interrupted"
            run.message = f"stopped here: {run.lost or exc}"
            log.warning("%s job %s %s", run.type, run.job_id, run.message)
            with anyio.CancelScope(shield=True):
                await self.journal.set_state(run.job_id, "interrupted", run.message[:2000])
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
        """An aborted archive leaves no tar without its index on the LTS (see
        :func:`moverd.datablocks.discard_unindexed`)."""
        from moverd.datablocks import discard_unindexed
        from moverd.planner import dataset_folder

        if run.type != "archive":
            return
        lts = self.app.storage("lts")
        for t in run.transfers:
            try:
                for key in await discard_unindexed(lts, dataset_folder(t.dataset)):
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
