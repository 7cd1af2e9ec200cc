"""Archive and retrieve jobs as Prefect flows.

* the job is a flow run named after the job id;
* each dataset is a subflow run named after the job id and the dataset PID, publishing a
  progress artifact;
* each datablock of an archive is a task run named ``datablock <n>/<total> <archive id>`` and
  tagged ``moverd-datablock`` and ``lts``; the LTS bound itself is held by the core around the
  exact write and read sections, through Prefect's global concurrency limits
  ``lts-write``/``lts-read`` when a Prefect server is configured (see :mod:`moverd_flows.limits`),
  so it holds across every host;
* a retrieve job's links and download script are also a markdown artifact.

Artifacts carry keys (:mod:`moverd_flows.keys`): Prefect lists keyed artifacts on its Artifacts
page, each key with its history, so an operator finds a dataset's progress or a job's links there
without knowing the flow run.
"""

from __future__ import annotations

import contextvars
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
from prefect import flow, task
from prefect.artifacts import acreate_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import Abort

from moverd import Datablock, Job, JobType, Transfer
from moverd.app import App
from moverd.config import load_settings
from moverd.planner import DatablockPlan
from moverd.services.jobs import DatasetOutcome, JobOutcome, run_job

from .keys import artifact_key
from .limits import global_locks, global_slots
from .progress import progress_artifact
from .settings import FlowSettings

_transfer: contextvars.ContextVar[Transfer | None] = contextvars.ContextVar("moverd_transfer", default=None)
"""The transfer of the dataset subflow a datablock runs in: the engine's block runner is handed the
plan only, and the plan alone does not know how many datablocks its dataset has."""


@task(name="datablock", task_run_name="datablock {number}/{total} {plan.archive_id}",
      tags=["moverd-datablock", "lts"], cache_policy=NO_CACHE, retries=0)
async def datablock_task(
    plan: DatablockPlan, number: int, total: int, work: Callable[[], Awaitable[Datablock]]
) -> Datablock:
    return await work()


async def _block_runner(plan: DatablockPlan, work: Callable[[], Awaitable[Datablock]]) -> Datablock:
    transfer = _transfer.get()
    # The archive service sets the count before it starts any datablock.
    total = transfer.datablocks_total if transfer is not None and transfer.datablocks_total else plan.index + 1
    return await datablock_task(plan, plan.index + 1, total, work)


@flow(name="moverd-dataset", flow_run_name="{kind} {pid} (job {job_id})", validate_parameters=False)
async def dataset_flow(
    kind: str, job_id: str, pid: str, transfer: Transfer, work: Callable[[], Awaitable[DatasetOutcome]]
) -> DatasetOutcome:
    token = _transfer.set(transfer)
    try:
        async with progress_artifact(transfer, key=artifact_key(kind, pid)):
            return await work()
    finally:
        _transfer.reset(token)


async def _result_artifact(outcome: JobOutcome) -> None:
    if not outcome.downloads:
        return
    rows = "\n".join(f"| {d.dataset} | [{d.name}]({d.url}) | {d.size} |" for d in outcome.downloads)
    await acreate_markdown_artifact(
        markdown=f"# Retrieved data of job {outcome.job.id}\n\n| dataset | file | size |\n|---|---|---|\n{rows}\n",
        key=artifact_key("retrieve-links", outcome.job.id), description=f"download links of job {outcome.job.id}",
    )


async def job_flow(
    job_id: str, config: str | None = None, on_transfer: Callable[[Transfer], None] | None = None,
    app: App | None = None,
) -> dict[str, Any]:
    """Run catalog job ``job_id`` (archive or retrieve, as the catalog says) inside a flow run."""
    own = app is None
    app = app or _load(config)
    try:
        job = await app.catalog.get_job(job_id)
        the_flow = archive_job_flow if job.type is JobType.archive else retrieve_job_flow
        return await the_flow(job_id, config=config, on_transfer=on_transfer, app=app, job=job)
    finally:
        if own:
            await app.aclose()


def _load(config: str | None) -> App:
    """An App of this flow run's own (a worker that was handed no App), with the global limits."""
    settings = load_settings(config, FlowSettings)
    return App(settings, global_slots=global_slots(settings), global_locks=global_locks(settings))


async def _run(
    job_id: str, app: App, on_transfer: Callable[[Transfer], None] | None, job: Job | None = None
) -> dict[str, Any]:
    transfers: dict[str, Transfer] = {}

    def seen(t: Transfer) -> None:
        transfers[t.dataset] = t
        if on_transfer:
            on_transfer(t)

    async def runner(pid: str, work: Callable[[], Awaitable[DatasetOutcome]]) -> DatasetOutcome:
        t = transfers[pid]
        return await dataset_flow(t.kind, job_id, pid, t, work)

    outcome = await run_job(app, job_id, runner=runner, block_runner=_block_runner, on_transfer=seen, job=job)
    await _result_artifact(outcome)
    return {
        "job": job_id, "status": outcome.status.value, "message": outcome.message,
        "datasets": [{"pid": d.pid, "outcome": d.outcome, "message": d.message} for d in outcome.datasets],
        "downloads": [d.model_dump() for d in outcome.downloads],
    }


async def _in_app(
    job_id: str, config: str | None, on_transfer: Callable[[Transfer], None] | None, app: App | None,
    job: Job | None, fence: anyio.CancelScope | None,
) -> dict[str, Any]:
    """The job, inside ``fence`` when one is given: the daemon cancels it when the flow run is no
    longer its own (another daemon takes the job over). The job then stops as at a shutdown, and
    the flow run ends here with :class:`~prefect.exceptions.Abort`, on which Prefect sets no state:
    the state is the new owner's."""
    with fence or anyio.CancelScope():
        if app is not None:
            return await _run(job_id, app, on_transfer, job)
        async with _load(config) as own:
            return await _run(job_id, own, on_transfer, job)
    raise Abort(f"job {job_id} stopped here: its flow run was given to another daemon")


@flow(name="moverd-archive-job", flow_run_name="archive-job {job_id}", validate_parameters=False)
async def archive_job_flow(
    job_id: str, config: str | None = None, on_transfer: Callable[[Transfer], None] | None = None,
    app: App | None = None, job: Job | None = None, fence: anyio.CancelScope | None = None,
) -> dict[str, Any]:
    """An archive job; ``config`` is the daemon's configuration file (None: its environment)."""
    return await _in_app(job_id, config, on_transfer, app, job, fence)


@flow(name="moverd-retrieve-job", flow_run_name="retrieve-job {job_id}", validate_parameters=False)
async def retrieve_job_flow(
    job_id: str, config: str | None = None, on_transfer: Callable[[Transfer], None] | None = None,
    app: App | None = None, job: Job | None = None, fence: anyio.CancelScope | None = None,
) -> dict[str, Any]:
    """A retrieve job; ``config`` as for :func:`archive_job_flow`."""
    return await _in_app(job_id, config, on_transfer, app, job, fence)
