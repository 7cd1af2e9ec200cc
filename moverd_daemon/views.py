"""The API's answers about jobs, as response models: what ``GET /jobs/{id}`` and ``GET /jobs`` return.

They live with the API, not with the dispatcher: a :class:`~.dispatch.JobRun` is the daemon's
record of a job, and this is one way of showing it (the OpenAPI document describes it).
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel

from moverd.events import Transfer

from .dispatch import JobRun


def _iso(t: float | None) -> str | None:
    return datetime.fromtimestamp(t, UTC).isoformat() if t else None


def _percent(done: int, total: int) -> float:
    return round(min(100.0, 100.0 * done / total), 2) if total else 0.0


def _summed(counts: list[dict[str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for c in counts:
        for state, n in c.items():
            out[state] = out.get(state, 0) + n
    return out


class DatasetProgress(BaseModel):
    pid: str
    kind: str
    bytes_total: int
    bytes_done: int
    files_total: int
    files_done: int
    datablocks_total: int
    datablocks_done: int
    percent: float
    restores: dict[str, int] = {}
    """Datablocks waited for to be restored (tape-class LTS) or recalled (HSM), per state:
    ``requested``, ``in_progress``, ``available``; empty when none needed it."""

    @classmethod
    def of(cls, t: Transfer) -> DatasetProgress:
        return cls(pid=t.dataset, kind=t.kind, bytes_total=t.bytes_total, bytes_done=t.bytes_done,
                   files_total=t.files_total, files_done=t.files_done, datablocks_total=t.datablocks_total,
                   datablocks_done=t.datablocks_done, percent=_percent(t.bytes_done, t.bytes_total),
                   restores=dict(t.restores))


class JobProgress(BaseModel):
    """Live progress, from the daemon that runs the job (None from the others)."""

    percent: float
    bytes_total: int
    bytes_done: int
    bytes_per_second: float
    files_total: int
    files_done: int
    datablocks_total: int
    datablocks_done: int
    restores: dict[str, int] = {}
    """The datasets' restore counts per state, summed."""
    datasets: list[DatasetProgress]


class FlowRunRef(BaseModel):
    id: str
    name: str
    state: str
    """Prefect state type (SCHEDULED, PENDING, RUNNING, COMPLETED, FAILED, CRASHED...)."""


class JobView(BaseModel):
    """A job: its flow run, its status and, where this daemon runs it, its progress."""

    id: str
    type: str | None
    flow_run: FlowRunRef | None
    daemon: str | None = None
    status: str | None
    """The job's catalog status (``inProgress``, ``finishedSuccessful`` ...)."""
    message: str = ""
    submitted: str | None = None
    started: str | None = None
    finished: str | None = None
    progress: JobProgress | None
    catalog: dict[str, Any] | None = None
    """What the catalog says of the job (``GET /jobs/{id}`` only), or why it could not say."""

    @classmethod
    def of(cls, run: JobRun, catalog: dict[str, Any] | None = None) -> JobView:
        transfers = run.transfers
        total = sum(t.bytes_total for t in transfers)
        done = sum(t.bytes_done for t in transfers)
        elapsed = (run.finished or time.time()) - run.started if run.started else 0.0
        progress = None if not run.local else JobProgress(
            percent=100.0 if run.state == "COMPLETED" else _percent(done, total),
            bytes_total=total, bytes_done=done, bytes_per_second=round(done / elapsed, 1) if elapsed > 0 else 0.0,
            files_total=sum(t.files_total for t in transfers), files_done=sum(t.files_done for t in transfers),
            datablocks_total=sum(t.datablocks_total for t in transfers),
            datablocks_done=sum(t.datablocks_done for t in transfers),
            restores=_summed([t.restores for t in transfers]),
            datasets=[DatasetProgress.of(t) for t in transfers],
        )
        # The catalog holds the job's status; the run's own is the fallback when the catalog is
        # away, or once the run ended (the status it ended with, even if the catalog lags).
        status = run.job_status
        if run.status is None and catalog and catalog.get("status"):
            status = str(catalog["status"])
        return cls(
            id=run.job_id, type=run.type, flow_run=FlowRunRef(id=run.flow_run_id, name=run.flow_run_name,
                                                               state=run.state),
            daemon=run.daemon, status=status, message=run.message, submitted=_iso(run.submitted),
            started=_iso(run.started), finished=_iso(run.finished), progress=progress, catalog=catalog,
        )


class JobList(BaseModel):
    daemon: str
    mode: str
    running: int
    queued: int
    jobs: list[JobView]
