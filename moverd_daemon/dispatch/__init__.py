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
In scale-out the run is marked Orphaned instead, and another daemon of the pool takes it over at
once, as it takes over the jobs of a daemon that died (:mod:`.pool`).

The pieces: :mod:`.runs` (a job as the daemon knows it), :mod:`.base` (what both modes share),
:mod:`.embedded` and :mod:`.pool` (each mode); ``GET /jobs``'s response models are the API's
(:mod:`moverd_daemon.views`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from uuid import UUID

from moverd.app import App

from ..journal import Journal
from ..metrics import Metrics
from .base import Dispatcher
from .embedded import EmbeddedDispatcher
from .pool import PoolDispatcher
from .runs import FINAL_STATES, JobRun, Mode, NotAcceptingError, NotServedError, job_tag

if TYPE_CHECKING:
    from moverd_flows.deployments import DeploymentSpec
    from prefect.client.orchestration import PrefectClient

__all__ = [
    "FINAL_STATES", "Dispatcher", "EmbeddedDispatcher", "JobRun", "Mode", "NotAcceptingError", "NotServedError",
    "PoolDispatcher", "job_tag", "make_dispatcher",
]


def make_dispatcher(mode: Mode, app: App, client: PrefectClient, journal: Journal, metrics: Metrics, *,
                    name: str, config: str | None, specs: dict[UUID, DeploymentSpec] | None = None) -> Dispatcher:
    if mode == "embedded":
        return EmbeddedDispatcher(app, client, journal, metrics, name=name, config=config)
    return PoolDispatcher(app, client, journal, metrics, name=name, config=config, specs=specs or {})
