"""Jobs that outlive their daemon: a heartbeat on each flow run, an automation that notices when
it stops, and a claim of the orphaned run that only one daemon can win.

* A daemon posts the event ``moverd.job.heartbeat`` for each flow run it executes, about three
  times per window (:func:`send_heartbeats`), through the server's ``POST /events``: the answer
  says that the server has it, so a daemon knows how long ago its last heartbeat got through.
* ``moverd prefect setup`` creates the automation ``moverd-takeover`` (Prefect's recipe for
  zombie flow runs): a proactive trigger that expects, per flow run, another heartbeat or an end
  of the run within the window ``server.takeover_after`` of the last heartbeat, and otherwise
  sets the run's state Crashed, named ``Orphaned``.
* Every daemon of the pool looks for Orphaned runs of its deployments and claims one by proposing
  Pending from that state. Prefect refuses Pending from Pending or Running (the rule that makes
  a scheduled run go to one worker), so of several proposals one wins; the winner runs the same
  flow run again, and the job resumes from the committed and verified datablocks as after a
  restart.

Only the Prefect side is here; when to beat, claim and run is the daemon's business.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import timedelta
from uuid import UUID

from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterId,
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterState,
    FlowRunFilterStateName,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.events import Event
from prefect.events.actions import ChangeFlowRunState
from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
from prefect.events.schemas.events import ResourceSpecification

HEARTBEAT_EVENT = "moverd.job.heartbeat"
ORPHANED = "Orphaned"
"""The name of the Crashed state the automation gives a run whose heartbeat stopped."""
AUTOMATION = "moverd-takeover"
BEATS_PER_WINDOW = 3
MIN_WINDOW = 10.0
"""Prefect's shortest window for a proactive trigger."""


def heartbeat_interval(takeover_after: float) -> float:
    return takeover_after / BEATS_PER_WINDOW


def flow_run_resource(flow_run_id: UUID | str) -> str:
    return f"prefect.flow-run.{flow_run_id}"


def takeover_automation(takeover_after: float) -> AutomationCore:
    """The zombie-run recipe, on moverd's own heartbeat: after a heartbeat of a run, expect the
    next one (or the run's end) within ``takeover_after``, else mark the run Orphaned."""
    ends = {f"prefect.flow-run.{s}" for s in ("Completed", "Failed", "Cancelled", "Crashed", ORPHANED)}
    return AutomationCore(
        name=AUTOMATION,
        description="moverd: a job whose daemon stopped sending heartbeats is marked Orphaned, "
                    "for another daemon of the pool to take over",
        trigger=EventTrigger(
            after={HEARTBEAT_EVENT},
            expect={HEARTBEAT_EVENT, *ends},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=takeover_after),
        ),
        actions=[ChangeFlowRunState(
            state=StateType.CRASHED, name=ORPHANED,
            message=f"no moverd heartbeat for {takeover_after:g} s: its daemon is gone; "
                    "another daemon of the pool takes the job over",
        )],
    )


async def ensure_takeover_automation(client: PrefectClient, takeover_after: float) -> None:
    """Create the automation, or bring the one there to this window. Idempotent."""
    wanted = takeover_automation(takeover_after)
    existing = await client.read_automations_by_name(AUTOMATION)
    if not existing:
        await client.create_automation(wanted)
        return
    for automation in existing:
        await client.update_automation(automation.id, wanted)


async def takeover_window(client: PrefectClient) -> float | None:
    """The window of the server's ``moverd-takeover`` automation, None when there is none (or
    it is switched off)."""
    for automation in await client.read_automations_by_name(AUTOMATION):
        trigger = automation.trigger
        if automation.enabled and isinstance(trigger, EventTrigger) and trigger.within:
            return trigger.within.total_seconds()
    return None


async def send_heartbeats(client: PrefectClient, flow_run_ids: Iterable[str], daemon: str) -> None:
    """One heartbeat per flow run, in one request; raises when the server did not take them."""
    events = [Event(event=HEARTBEAT_EVENT,
                    resource={"prefect.resource.id": flow_run_resource(i), "moverd.daemon": daemon}).model_dump(
        mode="json") for i in flow_run_ids]
    if events:
        response = await client.request("POST", "/events", json=events)
        response.raise_for_status()


def is_orphaned(flow_run: FlowRun) -> bool:
    state = flow_run.state
    return state is not None and state.type == StateType.CRASHED and state.name == ORPHANED


async def orphaned_runs(client: PrefectClient, deployment_ids: Iterable[UUID], limit: int = 20) -> list[FlowRun]:
    """Orphaned runs of these deployments, oldest first."""
    from prefect.client.schemas.sorting import FlowRunSort

    ids = list(deployment_ids)
    if not ids:
        return []
    return await client.read_flow_runs(
        flow_run_filter=FlowRunFilter(state=FlowRunFilterState(
            type=FlowRunFilterStateType(any_=[StateType.CRASHED]), name=FlowRunFilterStateName(any_=[ORPHANED]))),
        deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=ids)),
        sort=FlowRunSort.EXPECTED_START_TIME_ASC, limit=limit,
    )


async def read_runs(client: PrefectClient, flow_run_ids: Iterable[str]) -> dict[str, FlowRun]:
    """The flow runs of these ids, in one request (a missing one is left out)."""
    ids = [UUID(i) for i in flow_run_ids]
    if not ids:
        return {}
    runs = await client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)), limit=len(ids))
    return {str(r.id): r for r in runs}
