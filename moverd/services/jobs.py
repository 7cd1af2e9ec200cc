"""Catalog jobs: archive and retrieve jobs carried out as the facility expects.

The sequence and the status values are SciCat's (see docs/jobs.md). Datasets of a job are
independent: a user error on one (``missingFilesError``) does not stop the others and the job
ends ``finishedWithDatasetErrors``; a system error ends it ``finishedUnsuccessful``, after this
attempt's catalog registrations were rolled back and with the landing zone kept, so that running
the job again resumes from the datablocks already committed on the LTS.
"""

from __future__ import annotations

import logging
import posixpath
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Literal

import anyio

from ..app import App
from ..errors import NotFoundError, StorageError, UserError
from ..events import Transfer
from ..keys import join_key, safe_key
from ..models import (
    Datablock,
    Download,
    Job,
    JobDataset,
    JobStatus,
    JobType,
    LifecycleUpdate,
    Member,
    RetrieveStatus,
)
from ..restores import restore_datablocks
from ..storage import Storage
from .archive import BlockRunner
from .archive import _direct as _direct_block
from .lifecycle import archive_with_lifecycle, best_effort
from .observed import observed
from .retrieve import load_indexes, retrieve_members, select_members
from .transfer import copy_datablock

Chosen = list[tuple[Datablock, list[Member]]]

log = logging.getLogger(__name__)

Outcome = Literal["ok", "user_error", "system_error"]


@dataclass
class DatasetOutcome:
    pid: str
    outcome: Outcome
    message: str = ""
    downloads: list[Download] = field(default_factory=list)
    """Retrieve jobs: the links this dataset's retrieval hands out."""


@dataclass
class JobOutcome:
    job: Job
    status: JobStatus
    datasets: list[DatasetOutcome]
    downloads: list[Download] = field(default_factory=list)
    """Retrieve jobs: every link, the catalog records them in its own layout."""

    @property
    def message(self) -> str:
        bad = [f"{d.pid}: {d.message}" for d in self.datasets if d.outcome != "ok"]
        return "; ".join(bad) if bad else f"{len(self.datasets)} dataset(s) done"


DatasetRunner = Callable[[str, Callable[[], Awaitable[DatasetOutcome]]], Awaitable[DatasetOutcome]]
"""Wraps each dataset's work (the Prefect layer runs it as a subflow); the default just awaits."""


async def _direct(pid: str, work: Callable[[], Awaitable[DatasetOutcome]]) -> DatasetOutcome:
    return await work()


def classify(exc: BaseException) -> Outcome:
    return "user_error" if isinstance(exc, UserError) else "system_error"


def job_status(outcomes: list[DatasetOutcome], kind: JobType = JobType.archive) -> JobStatus:
    """Archive: a system error anywhere is ``finishedUnsuccessful``, user errors only are
    ``finishedWithDatasetErrors``. Retrieve (as the facility expects): unsuccessful when every
    dataset failed, with dataset errors when only some did."""
    failed = [o for o in outcomes if o.outcome != "ok"]
    if kind is JobType.retrieve and failed:
        if len(failed) == len(outcomes):
            return JobStatus.finished_unsuccessful
        return JobStatus.finished_with_dataset_errors
    if any(o.outcome == "system_error" for o in outcomes):
        return JobStatus.finished_unsuccessful
    if any(o.outcome == "user_error" for o in outcomes):
        return JobStatus.finished_with_dataset_errors
    return JobStatus.finished_successful


async def run_job(
    app: App, job_id: str, *, runner: DatasetRunner = _direct, block_runner: BlockRunner = _direct_block,
    on_transfer: Callable[[Transfer], None] | None = None, job: Job | None = None,
) -> JobOutcome:
    """Carry out catalog job ``job_id`` and report its outcome back to the catalog (``job``: the
    job as already read, to save a request)."""
    catalog = app.catalog
    job = job if job is not None and job.id == job_id else await catalog.get_job(job_id)
    await catalog.set_job_status(job.id, JobStatus.in_progress.value, "jobStarted")
    outcomes: list[DatasetOutcome] = []
    for entry in job.datasets:
        transfer = Transfer(kind=job.type.value, dataset=entry.pid, job_id=job.id)  # type: ignore[arg-type]
        if on_transfer:
            on_transfer(transfer)
        if job.type is JobType.archive:
            work = _bind(archive_job_dataset, app, entry, transfer, block_runner)
        else:
            work = _bind(retrieve_job_dataset, app, entry, transfer, block_runner)
        outcomes.append(await runner(entry.pid, work))
    status = job_status(outcomes, job.type)
    outcome = JobOutcome(job=job, status=status, datasets=outcomes)
    retrieve = job.type is JobType.retrieve
    if retrieve:
        outcome.downloads = [d for o in outcomes for d in o.downloads]
    await catalog.set_job_status(job.id, status.value, outcome.message, outcome.downloads if retrieve else None)
    return outcome


def _bind(
    fn: Callable[[App, JobDataset, Transfer, BlockRunner], Awaitable[DatasetOutcome]], app: App, entry: JobDataset,
    transfer: Transfer, block_runner: BlockRunner,
) -> Callable[[], Awaitable[DatasetOutcome]]:
    async def work() -> DatasetOutcome:
        return await fn(app, entry, transfer, block_runner)

    return work


async def archive_job_dataset(
    app: App, entry: JobDataset, transfer: Transfer, block_runner: BlockRunner = _direct_block
) -> DatasetOutcome:
    """One dataset of an archive job, from ``started`` to ``datasetOnArchiveDisk`` (or an error)."""
    try:
        await archive_with_lifecycle(app, entry.pid, transfer=transfer, block_runner=block_runner)
    except Exception as exc:
        return DatasetOutcome(entry.pid, classify(exc), str(exc))
    return DatasetOutcome(entry.pid, "ok")


async def retrieve_job_dataset(
    app: App, entry: JobDataset, transfer: Transfer, block_runner: BlockRunner = _direct_block
) -> DatasetOutcome:
    """One dataset of a retrieve job: whole datablocks, or only the listed files, into the
    retrieval storage, with a download URL for each."""
    catalog = app.catalog
    pid = entry.pid
    try:
        await catalog.update_lifecycle(pid, LifecycleUpdate(retrieve_status=RetrieveStatus.started))
        with observed(app, transfer):
            chosen = select_members(await load_indexes(app, pid), entry.files or None)
            # Outside the retrieval lock: a second job for the dataset waits for the same
            # restores (requested once) rather than for the lock.
            lts = app.storage("lts")
            async def told(counts: dict[str, int]) -> None:
                await best_effort(catalog.update_lifecycle(pid, LifecycleUpdate(
                    retrieve_return_message={"restores": counts})), f"lifecycle of {pid}")

            await restore_datablocks(app, lts, await _to_restore(app, pid, chosen, bool(entry.files)), transfer,
                                     told)
            async with app.retrieval_lock(pid):
                results = await _retrieve_for_download(app, pid, chosen, bool(entry.files), transfer)
        await catalog.update_lifecycle(pid, LifecycleUpdate(retrieve_status=RetrieveStatus.retrieved, retrievable=True))
        return DatasetOutcome(pid, "ok", downloads=results)
    except Exception as exc:
        outcome = classify(exc)
        log.warning("retrieving %s failed (%s): %s", pid, outcome, exc)
        with anyio.CancelScope(shield=True):
            await best_effort(catalog.update_lifecycle(pid, LifecycleUpdate(
                retrieve_status=RetrieveStatus.failed)), f"lifecycle of {pid}")
        return DatasetOutcome(pid, outcome, str(exc))


def _retrieval_keys(app: App, pid: str) -> tuple[Callable[[Member], str], Callable[[Datablock], str]]:
    """Where a retrieved file, and a retrieved whole datablock, go in the retrieval storage."""
    prefix = safe_key(app.settings.retrieve.retrieval_prefix.format(pid=pid), allow_empty=True)

    def file_key(m: Member) -> str:
        return join_key(prefix, join_key("files", m.path))

    def block_key(b: Datablock) -> str:
        return join_key(prefix, posixpath.basename(b.archive_id))

    return file_key, block_key


async def _to_restore(app: App, pid: str, chosen: Chosen, files: bool) -> list[str]:
    """The datablocks the retrieval will read: those with something not already copied."""
    retrieval = app.storage("retrieval")
    file_key, block_key = _retrieval_keys(app, pid)
    out = []
    for block, members in chosen:
        wanted = [(file_key(m), m.size) for m in members] if files else [(block_key(block), block.packed_size)]
        if not all([await _present(retrieval, key, size) for key, size in wanted]):
            out.append(block.archive_id)
    return out


async def _retrieve_for_download(
    app: App, pid: str, chosen: Chosen, files: bool, transfer: Transfer
) -> list[Download]:
    """Copy what the job asks for into the retrieval storage (reusing copies already there) and
    return their download links."""
    retrieval = app.storage("retrieval")
    lts = app.storage("lts")
    key_of, block_key = _retrieval_keys(app, pid)
    expiry = timedelta(seconds=app.settings.retrieve.url_expiry)
    transfer.datablocks_total = len(chosen)
    results: list[Download] = []
    if files:
        transfer.bytes_total = sum(m.size for _, ms in chosen for m in ms)
        transfer.files_total = sum(len(ms) for _, ms in chosen)
        for block, members in chosen:
            missing = [m for m in members if not await _reuse(retrieval, key_of(m), m.size)]
            if missing:
                async with app.slot(lts, "read"):
                    await retrieve_members(app, lts, block, missing, retrieval, transfer, key_of=key_of)
            for m in members:
                results.append(await _entry(retrieval, key_of(m), pid, m.path, m.size, block.archive_id, expiry))
            transfer.datablocks_done += 1
        return results
    transfer.bytes_total = sum(b.packed_size for b, _ in chosen)
    for block, _ in chosen:
        key = block_key(block)
        if not await _reuse(retrieval, key, block.packed_size):
            async with app.slot(lts, "read"):
                await copy_datablock(app, lts, block, retrieval, key, transfer)
        else:
            transfer.bytes_done += block.packed_size
        name = posixpath.basename(block.archive_id)
        results.append(await _entry(retrieval, key, pid, name, block.size, block.archive_id, expiry))
        transfer.datablocks_done += 1
    return results


async def _present(storage: Storage, key: str, size: int) -> bool:
    """Is a copy of ``size`` bytes already there?"""
    try:
        return (await storage.stat(key)).size == size
    except NotFoundError:
        return False


async def _reuse(storage: Storage, key: str, size: int) -> bool:
    """Is a copy of ``size`` bytes already there? Then it is reused, its age reset so that the
    expired-links cleanup counts from the new link (where the storage keeps mtimes)."""
    if not await _present(storage, key, size):
        return False
    await storage.set_metadata(key, mtime=time.time())
    return True


async def _entry(storage: Storage, key: str, pid: str, name: str, size: int, archive_id: str,
                 expiry: timedelta) -> Download:
    try:
        url = await storage.presign(key, expiry)
    except NotImplementedError as exc:
        raise StorageError(f"the retrieval storage cannot give download links: {exc}") from None
    return Download(dataset=pid, name=name, size=size, archive_id=archive_id, url=url)
