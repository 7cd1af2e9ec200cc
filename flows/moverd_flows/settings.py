"""The Prefect layer's section of the configuration, ``[prefect]``, and the settings that carry it.

The engine's :class:`~moverd.config.Settings` passes over sections it does not own; this layer
adds its own, as the daemon adds ``[server]`` and ``[scheduler]`` on top of this one
(``moverd_daemon.settings.DaemonSettings``). A flow run on a worker that was handed no App loads
:class:`FlowSettings` from the same file.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from moverd.config import Settings
from moverd.units import Duration


class PrefectSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    global_limits: bool = False
    """Hold the LTS read/write bounds across hosts with Prefect global concurrency limits
    (``<storage>-read``/``<storage>-write``, created by ``moverd prefect setup``). Needs a Prefect
    server (``PREFECT_API_URL``); without one each process's own semaphores are the bound."""
    slot_lease: Duration = Field(60.0, ge=60, le=3600)
    """How long a global slot is leased (Prefect's shortest lease is 60 s); the holder renews it
    while it writes. A holder that died (kill -9, a lost host) gives its slot back when the lease
    runs out: within ``slot_lease`` plus the Prefect server's sweep of expired leases (its
    ``PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS``, 15 s by default), 75 s on defaults. A
    holder that cannot renew stops its write first, so a freed slot never lets more writers in
    than the limit."""
    archival_work_pool: str = "archival-docker-workpool"
    retrieval_work_pool: str = "retrieval-docker-workpool"


class FlowSettings(Settings):
    """The engine's sections and ``[prefect]``."""

    prefect: PrefectSettings = Field(default_factory=PrefectSettings)
