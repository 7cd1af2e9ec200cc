"""Deployments of the job flows, and what ``moverd prefect setup`` creates on a Prefect server.

With a shared Prefect server (``PREFECT_API_URL``), a job becomes a run of a deployment:
``moverd-archive-job/archival`` on the archival work pool, ``moverd-retrieve-job/retrieval`` on the
retrieval work pool (names from ``[prefect]``, as the seed's ``PREFECT_*_WORKPOOL_NAME``). Every
``moverd serve`` polls both pools and runs what it claims in its own process; Prefect lets one
claim win. Parameters are JSON only: the job id and the path of the configuration file, so a plain
``prefect worker start --pool ...`` on a host with moverd installed could run them too (the flow
then loads its own configuration from that path).

``moverd prefect setup`` (the seed's prefect-config step) creates the work pools, the deployments,
a few variables describing the installation, the global concurrency limits
``<storage>-write``/``<storage>-read`` that bound LTS writers and readers across every host, and
the automation that marks a job whose daemon died Orphaned for another daemon to take over
(:mod:`.takeover`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

from prefect import Flow
from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

from moverd.app import App
from moverd.errors import MoverdError

from .jobs import archive_job_flow, retrieve_job_flow
from .settings import FlowSettings

log = logging.getLogger(__name__)

PARAMETER_SCHEMA: dict[str, Any] = {
    "title": "Parameters",
    "type": "object",
    "properties": {
        "job_id": {"title": "job_id", "type": "string", "description": "The catalog's job id.", "position": 0},
        "config": {"title": "config", "anyOf": [{"type": "string"}, {"type": "null"}], "default": None,
                   "description": "moverd's configuration file on the host that runs the job.", "position": 1},
    },
    "required": ["job_id"],
    "definitions": {},
}
"""What a deployment run takes: JSON only (the daemon adds its live objects when it runs it)."""

WORK_POOL_TYPE = "process"
"""The pools are ordinary process pools: moverd daemons poll them, and a stock Prefect process
worker could run the same deployments."""


@dataclass(frozen=True)
class DeploymentSpec:
    job_type: str
    flow: Flow[..., Any]
    name: str
    work_pool: str
    entrypoint: str
    description: str

    @property
    def full_name(self) -> str:
        return f"{self.flow.name}/{self.name}"


def deployment_specs(settings: FlowSettings) -> list[DeploymentSpec]:
    p = settings.prefect
    return [
        DeploymentSpec("archive", archive_job_flow, "archival", p.archival_work_pool,
                       "moverd_flows.jobs.archive_job_flow",
                       "SciCat archive jobs: datasets from the landing zone into verified datablocks on the LTS."),
        DeploymentSpec("retrieve", retrieve_job_flow, "retrieval", p.retrieval_work_pool,
                       "moverd_flows.jobs.retrieve_job_flow",
                       "SciCat retrieve jobs: datablocks from the LTS into the retrieval bucket, with links."),
    ]


def spec_for(settings: FlowSettings, job_type: str) -> DeploymentSpec:
    return next(s for s in deployment_specs(settings) if s.job_type == job_type)


async def ensure_work_pools(client: PrefectClient, settings: FlowSettings) -> list[str]:
    """Create the work pools that do not exist yet; return the names created."""
    from prefect.workers.process import ProcessWorker

    created = []
    for pool in sorted({s.work_pool for s in deployment_specs(settings)}):
        try:
            await client.read_work_pool(pool)
            continue
        except ObjectNotFound:
            pass
        try:
            await client.create_work_pool(WorkPoolCreate(
                name=pool, type=WORK_POOL_TYPE, description="moverd jobs (polled by moverd serve)",
                base_job_template=ProcessWorker.get_default_base_job_template(),
            ))
            created.append(pool)
        except ObjectAlreadyExists:
            pass  # another daemon was faster
    return created


async def apply_deployments(client: PrefectClient, settings: FlowSettings) -> dict[UUID, DeploymentSpec]:
    """Create or update the deployments (an upsert on the server); return them by id."""
    out: dict[UUID, DeploymentSpec] = {}
    for spec in deployment_specs(settings):
        flow_id = await client.create_flow(spec.flow)
        deployment_id = await client.create_deployment(
            flow_id=flow_id, name=spec.name, work_pool_name=spec.work_pool, entrypoint=spec.entrypoint,
            description=spec.description, parameter_openapi_schema=PARAMETER_SCHEMA,
            enforce_parameter_schema=True, tags=["moverd", f"moverd-{spec.job_type}"], paused=False,
        )
        out[deployment_id] = spec
    return out


def configured_limits(app: App) -> dict[str, int]:
    """``<storage>-write``/``<storage>-read`` for every storage with bounded slots, set to the
    storage's own limits (``write_limit``/``read_limit`` of the LTS: the seed's LTS_WRITE_LIMIT and
    LTS_READ_LIMIT). A storage this host cannot open (the LTS is not mounted where ``setup`` runs)
    falls back to the limits written in its configuration."""
    out: dict[str, int] = {}
    for name in sorted(app.settings.storages):
        try:
            storage = app.storage(name)
        except MoverdError as exc:
            section = app.settings.storages[name]
            for kind in ("write", "read"):
                if isinstance(section.get(f"{kind}_limit"), int):
                    out[f"{name}-{kind}"] = section[f"{kind}_limit"]
            log.warning("storage %s cannot be opened here (%s); using its configured limits", name, exc)
            continue
        if storage.write_slots is not None:
            out[f"{name}-write"] = storage.write_slots.limit
        if storage.read_slots is not None:
            out[f"{name}-read"] = storage.read_slots.limit
    return out


async def ensure_limits(client: PrefectClient, limits: dict[str, int]) -> dict[str, int]:
    """Create or update the global concurrency limits; return them as set."""
    for name, limit in sorted(limits.items()):
        await client.upsert_global_concurrency_limit_by_name(name, limit)
    return dict(limits)


async def missing_limits(client: PrefectClient, names: list[str]) -> list[str]:
    """The limits among ``names`` the server does not have (or has switched off)."""
    missing = []
    for name in names:
        try:
            limit = await client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            missing.append(name)
            continue
        if not limit.active:
            missing.append(name)
    return missing


def variables(settings: FlowSettings, limits: dict[str, int]) -> dict[str, Any]:
    """Prefect variables that describe the installation to operators (the seed kept its flow
    parameters there; moverd's configuration file is the source of truth, these mirror it)."""
    from moverd import __version__

    out: dict[str, Any] = {
        "moverd_version": __version__,
        "moverd_archival_work_pool": settings.prefect.archival_work_pool,
        "moverd_retrieval_work_pool": settings.prefect.retrieval_work_pool,
        "moverd_catalog_type": str(settings.catalog.get("type")),
        "moverd_datablock_target_size": settings.pipeline.target_size,
    }
    for name, limit in limits.items():
        out["moverd_limit_" + name.replace("-", "_")] = limit
    return out


@dataclass
class SetupReport:
    work_pools_created: list[str] = field(default_factory=list)
    deployments: list[str] = field(default_factory=list)
    limits: dict[str, int] = field(default_factory=dict)
    variables: dict[str, Any] = field(default_factory=dict)
    takeover_after: float | None = None


async def setup(client: PrefectClient, settings: FlowSettings, limits: dict[str, int], *,
                takeover_after: float) -> SetupReport:
    """Everything a Prefect server needs before daemons serve it. Idempotent."""
    from prefect.variables import Variable

    from .takeover import ensure_takeover_automation

    report = SetupReport()
    report.work_pools_created = await ensure_work_pools(client, settings)
    report.deployments = [s.full_name for s in (await apply_deployments(client, settings)).values()]
    report.limits = await ensure_limits(client, limits)
    report.variables = variables(settings, limits)
    for name, value in report.variables.items():
        await Variable.aset(name, value, overwrite=True)
    await ensure_takeover_automation(client, takeover_after)
    report.takeover_after = takeover_after
    return report
