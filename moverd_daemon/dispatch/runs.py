"""A job as the daemon knows it (its flow run, state and live progress), and the states and
errors every dispatcher shares."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import anyio

from moverd.events import Transfer
from moverd.models import Job

if TYPE_CHECKING:
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
    fence: anyio.CancelScope = field(default_factory=anyio.CancelScope, repr=False)
    """Cancelled when the flow run may have become another daemon's: the job stops here."""
    lost: str | None = None
    """Why the fence was cancelled."""
    beat: float = field(default_factory=time.monotonic)
    """When the last heartbeat of this run that the server took was sent (monotonic)."""

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
