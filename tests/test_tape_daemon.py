"""``kill -9`` of ``moverd serve`` while a retrieve job waits for restores from a tape-class S3
LTS: the restarted daemon resumes the job, which waits for the restores already under way and
requests none again. While it waits, ``GET /jobs/{id}`` and the metrics show the restores."""

from __future__ import annotations

import re
import signal
from pathlib import Path
from typing import Any

import httpx
from moverd_flows.keys import artifact_key

from moverd.services.jobs import run_job
from tests.support.daemon import Daemon, wait_for
from tests.support.facility import Facility, dataset_files
from tests.support.faultproxy import FaultProxy
from tests.test_tape_archive import tape_lts
from tests.test_tape_retrieve import FAST, ONGOING, ColdLanding, restore_requests


def job_view(daemon: Daemon, job_id: str) -> dict[str, Any]:
    data: dict[str, Any] = httpx.get(f"{daemon.url}/jobs/{job_id}", timeout=30).json()
    return data


def metric(daemon: Daemon, name: str) -> float:
    """The sample's value, -1 when there is no such series."""
    text = httpx.get(f"{daemon.url}/metrics", timeout=30).text
    found = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", text, re.M)
    return float(found.group(1)) if found else -1.0


def test_sigkill_mid_wait_then_restart_resumes_the_wait(
    facility: Facility, s3_fault_proxy: FaultProxy, prefect_db_template: Path,
) -> None:
    import anyio

    files = dataset_files(61, n=6)
    pid = facility.add_dataset(files)
    tape_lts(facility, endpoint_url=s3_fault_proxy.url, **{**FAST, "restore_timeout": 300})

    async def archive() -> None:
        async with facility.app() as app:
            res = await run_job(app, facility.scicat.add_job("archive", [pid]))
            assert res.status.value == "finishedSuccessful", res.datasets

    anyio.run(archive)
    n_blocks = len(facility.scicat.datablocks(pid))
    s3_fault_proxy.rewrite_header("x-amz-restore", ONGOING, method="HEAD")
    job_id = facility.scicat.add_job("retrieve", [pid])
    daemon = Daemon.create(facility.tmp, facility.settings_dict(), template=prefect_db_template, name="tape")
    daemon.start().wait_ready()
    try:
        accepted = httpx.post(f"{daemon.url}/jobs", json={"id": job_id, "type": "retrieve"}, timeout=30)
        assert accepted.status_code == 201, accepted.text
        view = wait_for(lambda: ((v := job_view(daemon, job_id)).get("progress") or {}).get("restores", {})
                        .get("in_progress") == n_blocks and v, 120, 0.1, "the restores to show as in progress")
        assert view["progress"]["datasets"][0]["restores"] == {"requested": 0, "in_progress": n_blocks,
                                                               "available": 0}
        assert metric(daemon, 'moverd_restores_in_progress{storage="lts"}') == n_blocks
        assert metric(daemon, 'moverd_restores_total{event="requested",storage="lts"}') == n_blocks
        assert facility.scicat.lifecycle(pid)["retrieveReturnMessage"] == {
            "restores": {"requested": 0, "in_progress": n_blocks, "available": 0}}
        assert facility.scicat.job(job_id)["statusCode"] == "inProgress"

        def described() -> list[str]:
            found = httpx.post(f"{daemon.prefect_api()}/artifacts/filter", timeout=30, json={
                "artifacts": {"key": {"any_": [artifact_key("retrieve", pid)]}}}).json()
            return [str(a.get("description")) for a in found if a["type"] == "progress"]

        wanted = f"retrieve of {pid}; restores: 0 requested, {n_blocks} in progress, 0 available"
        wait_for(lambda: wanted in described(), 30, 0.2, "the progress artifact to show the restores")
    finally:
        daemon.stop(signal.SIGKILL)
    assert len(restore_requests(s3_fault_proxy)) == n_blocks

    daemon.start().wait_ready()
    try:
        wait_for(lambda: "resuming retrieve job" in daemon.log(200_000), 60, 0.2, "the job to resume")
        # The resumed job finds the restores running, and waits for them.
        wait_for(lambda: ((job_view(daemon, job_id).get("progress") or {}).get("restores") or {})
                 .get("in_progress") == n_blocks, 120, 0.1, "the resumed wait")
        s3_fault_proxy.stop_rewriting("x-amz-restore")
        view = wait_for(lambda: str((v := job_view(daemon, job_id))["status"]).startswith("finished") and v, 180,
                        0.5, "the resumed job")
        assert view["status"] == "finishedSuccessful", view
        assert metric(daemon, 'moverd_restores_total{event="requested",storage="lts"}') <= 0  # none (-1: no series)
        assert metric(daemon, 'moverd_restores_total{event="done",storage="lts"}') == n_blocks
    finally:
        assert daemon.stop() == 0, daemon.log()
    assert len(restore_requests(s3_fault_proxy)) == n_blocks  # nothing requested twice
    for entry in facility.scicat.job(job_id)["jobResultObject"]["result"]:
        assert httpx.get(entry["url"]).status_code == 200


def test_a_resumed_archive_from_a_cold_landing_zone_restores_only_what_it_still_reads(
    facility: Facility, s3_fault_proxy: FaultProxy, prefect_db_template: Path,
) -> None:
    """An archive job on ``moverd serve`` from a landing zone in GLACIER (``restore_reads``),
    after an earlier attempt registered all datablocks but the last and the restored copies
    expired: it restores the last datablock's files only; killed with SIGKILL while it waits,
    the restarted daemon resumes the job and requests no restore again."""
    import anyio

    cold = ColdLanding(facility, s3_fault_proxy, 62, restore_timeout=300)
    pid = cold.pid

    async def earlier_attempt() -> list[str]:
        async with facility.app() as app:
            plans = await cold.archive_all_but_the_last_datablock(app)
        return sorted(f.path for f in plans[-1].files)

    still_to_read = anyio.run(earlier_attempt)
    n_blocks = len(facility.scicat.datablocks(pid)) + 1
    cold.in_glacier()  # the restored copies expired
    mark = len(restore_requests(s3_fault_proxy))

    def restored() -> list[str]:
        return cold.restored_since(mark)

    s3_fault_proxy.rewrite_header("x-amz-restore", ONGOING, method="HEAD")
    job_id = facility.scicat.add_job("archive", [pid])
    daemon = Daemon.create(facility.tmp, facility.settings_dict(), template=prefect_db_template, name="cold")
    daemon.start().wait_ready()
    try:
        accepted = httpx.post(f"{daemon.url}/jobs", json={"id": job_id, "type": "archive"}, timeout=30)
        assert accepted.status_code == 201, accepted.text
        wait_for(lambda: ((job_view(daemon, job_id).get("progress") or {}).get("restores") or {})
                 .get("in_progress") == len(still_to_read), 120, 0.1, "the restores to show as in progress")
        assert restored() == still_to_read
    finally:
        daemon.stop(signal.SIGKILL)

    daemon.start().wait_ready()
    try:
        wait_for(lambda: "resuming archive job" in daemon.log(200_000), 60, 0.2, "the job to resume")
        s3_fault_proxy.stop_rewriting("x-amz-restore")
        view = wait_for(lambda: str((v := job_view(daemon, job_id))["status"]).startswith("finished") and v, 180,
                        0.5, "the resumed job")
        assert view["status"] == "finishedSuccessful", view
    finally:
        assert daemon.stop() == 0, daemon.log()
    assert restored() == still_to_read  # nothing requested twice, none of the registered blocks' files
    assert len(facility.scicat.datablocks(pid)) == n_blocks
    assert facility.scicat.lifecycle(pid)["archiveStatusMessage"] == "datasetOnArchiveDisk"
