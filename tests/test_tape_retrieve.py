"""Retrieval from a tape-class S3 LTS (GLACIER): every datablock read is restored first, once,
with a bounded wait that shows its state; only then are files copied and links handed out.

The fault proxy in front of the S3 server makes restores take time: while it rewrites
``x-amz-restore`` to ``ongoing-request="true"`` a restored object still looks in progress.
"""

from __future__ import annotations

import threading
from typing import Any

import anyio
import httpx
import pytest

from moverd import hookimpl
from moverd.app import App
from moverd.events import Transfer
from moverd.planner import DatablockPlan
from moverd.services.jobs import JobOutcome, run_job
from tests.support.facility import Facility, dataset_files
from tests.support.faultproxy import FaultProxy
from tests.test_tape_archive import tape_lts

pytestmark = pytest.mark.anyio

ONGOING = 'ongoing-request="true"'
FAST = {"restore_poll": 0.05, "restore_poll_max": 0.2, "restore_timeout": 20}


class Restores:
    """An observer plugin that records every restore state change."""

    def __init__(self, on_in_progress: Any = None) -> None:
        self.events: list[tuple[str, str]] = []
        self.on_in_progress = on_in_progress

    @hookimpl
    def restore_changed(self, transfer: Any, storage: str, key: str, state: str) -> None:
        self.events.append((key, state))
        if state == "in_progress" and self.on_in_progress is not None:
            self.on_in_progress()

    def states(self) -> set[str]:
        return {s for _, s in self.events}


def restore_requests(proxy: FaultProxy) -> list[str]:
    return [target for method, target, _ in proxy.seen if method == "POST" and target.endswith("?restore")]


async def archived_on_tape(
    facility: Facility, proxy: FaultProxy, seed: int, **lts: Any
) -> tuple[str, dict[str, bytes]]:
    files = dataset_files(seed, n=8)
    pid = facility.add_dataset(files)
    tape_lts(facility, endpoint_url=proxy.url, **{**FAST, **lts})
    job_id = facility.scicat.add_job("archive", [pid])
    async with facility.app() as app:
        res = await run_job(app, job_id)
    assert res.status.value == "finishedSuccessful", res.datasets
    return pid, files


async def retrieve(facility: Facility, job_id: str, app: App | None = None) -> tuple[JobOutcome, list[Transfer]]:
    transfers: list[Transfer] = []
    if app is not None:
        return await run_job(app, job_id, on_transfer=transfers.append), transfers
    async with facility.app() as own:
        return await run_job(own, job_id, on_transfer=transfers.append), transfers


def later(seconds: float, action: Any) -> threading.Timer:
    timer = threading.Timer(seconds, action)
    timer.start()
    return timer


async def test_slow_restore_then_working_links(facility: Facility, s3_fault_proxy: FaultProxy) -> None:
    pid, files = await archived_on_tape(facility, s3_fault_proxy, 41)
    blocks = facility.scicat.datablocks(pid)
    # the restores stay "ongoing" until the job has seen one in progress (a fixed delay was too
    # short on a loaded host: the first look already found them available)
    seen = Restores(on_in_progress=lambda: later(0.3, lambda: s3_fault_proxy.stop_rewriting("x-amz-restore")))
    facility.plugins.append(seen)
    s3_fault_proxy.rewrite_header("x-amz-restore", ONGOING, method="HEAD")
    timer = later(15.0, lambda: s3_fault_proxy.stop_rewriting("x-amz-restore"))
    job_id = facility.scicat.add_job("retrieve", [pid])
    try:
        res, transfers = await retrieve(facility, job_id)
    finally:
        timer.cancel()
    assert res.status.value == "finishedSuccessful", res.datasets
    assert len(restore_requests(s3_fault_proxy)) == len(blocks)  # one request per datablock
    assert {"requested", "in_progress", "available"} <= seen.states()
    assert transfers[0].restores == {"requested": 0, "in_progress": 0, "available": len(blocks)}
    lifecycle = facility.scicat.lifecycle(pid)
    assert lifecycle["retrieveStatusMessage"] == "datasetRetrieved"
    assert lifecycle["retrieveReturnMessage"] == {"restores": transfers[0].restores}
    got = {}
    import io
    import tarfile

    for entry in facility.scicat.job(job_id)["jobResultObject"]["result"]:
        with tarfile.open(fileobj=io.BytesIO(httpx.get(entry["url"]).raise_for_status().content)) as tf:
            for m in tf.getmembers():
                got[m.name] = tf.extractfile(m).read()  # type: ignore[union-attr]
    assert got == files


async def test_restore_timeout_then_a_later_run_waits_without_asking_again(
    facility: Facility, s3_fault_proxy: FaultProxy,
) -> None:
    pid, _ = await archived_on_tape(facility, s3_fault_proxy, 42, restore_timeout=0.5)
    n_blocks = len(facility.scicat.datablocks(pid))
    seen = Restores()
    facility.plugins.append(seen)
    s3_fault_proxy.rewrite_header("x-amz-restore", ONGOING, method="HEAD")
    job_id = facility.scicat.add_job("retrieve", [pid])
    res, _ = await retrieve(facility, job_id)
    assert res.status.value == "finishedUnsuccessful"
    outcome = res.datasets[0]
    assert outcome.outcome == "system_error"
    assert f"{n_blocks} of {n_blocks} datablock(s)" in outcome.message
    assert "were not restored within 0.5 s (restore_timeout)" in outcome.message
    assert "timed_out" in seen.states()
    assert facility.scicat.lifecycle(pid)["retrieveStatusMessage"] == "datasetRetrievalFailed"
    assert facility.retrieval_keys() == []
    assert len(restore_requests(s3_fault_proxy)) == n_blocks

    s3_fault_proxy.stop_rewriting("x-amz-restore")
    again = facility.scicat.add_job("retrieve", [pid])
    res, transfers = await retrieve(facility, again)
    assert res.status.value == "finishedSuccessful", res.datasets
    assert len(restore_requests(s3_fault_proxy)) == n_blocks  # nothing requested twice
    assert transfers[0].restores["available"] == n_blocks


async def test_two_concurrent_jobs_request_each_restore_once(facility: Facility, s3_fault_proxy: FaultProxy) -> None:
    pid, _ = await archived_on_tape(facility, s3_fault_proxy, 43)
    n_blocks = len(facility.scicat.datablocks(pid))
    s3_fault_proxy.rewrite_header("x-amz-restore", ONGOING, method="HEAD")
    timer = later(1.0, lambda: s3_fault_proxy.stop_rewriting("x-amz-restore"))
    jobs = [facility.scicat.add_job("retrieve", [pid]) for _ in range(2)]
    results: list[JobOutcome] = []
    try:
        async with facility.app() as app:
            async def one(job_id: str) -> None:
                results.append((await retrieve(facility, job_id, app))[0])

            async with anyio.create_task_group() as tg:
                for job_id in jobs:
                    tg.start_soon(one, job_id)
    finally:
        timer.cancel()
    assert [r.status.value for r in results] == ["finishedSuccessful"] * 2
    requests = restore_requests(s3_fault_proxy)
    assert len(requests) == n_blocks and len(set(requests)) == n_blocks


async def test_partial_retrieval_of_two_files_restores_and_reads_only_them(
    facility: Facility, s3_fault_proxy: FaultProxy,
) -> None:
    pid, files = await archived_on_tape(facility, s3_fault_proxy, 44)
    wanted = ["raw/frame_001.tiff", "raw/frame_006.tiff"]
    holding = {b["archiveId"] for b in facility.scicat.datablocks(pid)
               if any(f["path"] in wanted for f in b["dataFileList"])}
    s3_fault_proxy.seen.clear()
    job_id = facility.scicat.add_job("retrieve", [(pid, wanted)])
    res, _ = await retrieve(facility, job_id)
    assert res.status.value == "finishedSuccessful", res.datasets
    restored = restore_requests(s3_fault_proxy)
    assert len(restored) == len(holding)  # only the datablocks that hold the two files
    tar_gets = [(t, r) for m, t, r in s3_fault_proxy.seen if m == "GET" and t.split("?")[0].endswith(".tar")]
    assert tar_gets and all(r is not None for _, r in tar_gets)  # ranged reads only, never whole tars
    read = sum(int(r.split("-")[1]) - int(r.split("=")[1].split("-")[0]) + 1 for _, r in tar_gets if r)
    assert read < sum(len(files[w]) for w in wanted) + 2 * 64 * 1024
    entries = facility.scicat.job(job_id)["jobResultObject"]["result"]
    assert sorted(e["name"] for e in entries) == sorted(wanted)
    for e in entries:
        assert httpx.get(e["url"]).raise_for_status().content == files[e["name"]]


async def test_retrieve_to_a_folder_waits_for_the_restores(
    facility: Facility, s3_fault_proxy: FaultProxy, tmp_path: Any,
) -> None:
    """``moverd retrieve`` (the service, without a job) restores and waits the same way."""
    from moverd.services import retrieve_dataset
    from tests.support.trees import read_tree

    pid, files = await archived_on_tape(facility, s3_fault_proxy, 45)
    s3_fault_proxy.rewrite_header("x-amz-restore", ONGOING, method="HEAD")
    timer = later(0.5, lambda: s3_fault_proxy.stop_rewriting("x-amz-restore"))
    wanted = ["raw/frame_003.tiff", "empty.log"]
    try:
        async with facility.app() as app:
            transfer = Transfer(kind="retrieve", dataset=pid)
            out = app.local_folder(tmp_path / "out", "out", create=True)
            result = await retrieve_dataset(app, pid, out, files=wanted, transfer=transfer)
    finally:
        timer.cancel()
    assert sorted(m.path for m in result.files) == sorted(wanted)
    assert read_tree(tmp_path / "out") == {w: files[w] for w in wanted}
    assert transfer.restores["available"] == len(restore_requests(s3_fault_proxy)) >= 1


async def test_landing_zone_in_glacier_is_restored_before_it_is_read(facility: Facility) -> None:
    """The ingestor's uploads in GLACIER (as the facility's do): an archive with ``restore_reads``
    on the landing zone restores each file, waits, then reads it."""
    from tests.support.facility import LANDING_PREFIX

    files = dataset_files(46, n=4)
    pid = facility.add_dataset(files, upload=False)
    client = facility.s3.client()
    for path, data in files.items():
        client.put_object(Bucket=facility.landing_bucket, Key=f"{LANDING_PREFIX.format(pid=pid)}/{path}", Body=data,
                          StorageClass="GLACIER")
    storages = facility.settings_dict()["storages"]
    facility.overrides["storages"] = {**storages, "landing": {**storages["landing"], "restore_reads": True,
                                                               "restore_poll": 0.05, "restore_timeout": 20}}
    seen = Restores()
    facility.plugins.append(seen)
    async with facility.app() as app:
        res = await run_job(app, facility.scicat.add_job("archive", [pid]))
    assert res.status.value == "finishedSuccessful", res.datasets
    log = facility.s3.log_path.read_text(errors="replace")
    restores = [line for line in log.splitlines() if f'"POST /{facility.landing_bucket}/' in line and "restore" in line]
    assert len(restores) == len(files)
    assert {s for k, s in seen.events} == {"requested", "available"}
    assert facility.scicat.lifecycle(pid)["archiveStatusMessage"] == "datasetOnArchiveDisk"


class ColdLanding:
    """A dataset's files in a landing zone in GLACIER, read through the fault proxy with
    ``restore_reads``: the setting of a facility whose ingestor uploads in GLACIER."""

    def __init__(self, facility: Facility, proxy: FaultProxy, seed: int, **restore: Any) -> None:
        from tests.support.facility import LANDING_PREFIX

        self.facility, self.proxy = facility, proxy
        self.files = dataset_files(seed, n=4)
        self.pid = facility.add_dataset(self.files, upload=False)
        self.prefix = LANDING_PREFIX.format(pid=self.pid)
        self.in_glacier()
        storages = facility.settings_dict()["storages"]
        facility.overrides["storages"] = {**storages, "landing": {
            **storages["landing"], "endpoint_url": proxy.url, "restore_reads": True, **{**FAST, **restore}}}

    def in_glacier(self) -> None:
        """(Again) every file as a new object in GLACIER: as if its restored copy expired."""
        client = self.facility.s3.client()
        for path, data in self.files.items():
            client.put_object(Bucket=self.facility.landing_bucket, Key=f"{self.prefix}/{path}", Body=data,
                              StorageClass="GLACIER")

    def restored_since(self, mark: int) -> list[str]:
        """The files whose restore was requested after the ``mark``-th request, by path."""
        from urllib.parse import unquote

        folder = f"/{self.facility.landing_bucket}/{self.prefix}/"
        return sorted(unquote(t.split("?")[0]).removeprefix(folder) for t in restore_requests(self.proxy)[mark:])

    async def archive_all_but_the_last_datablock(self, app: App) -> list[DatablockPlan]:
        """An earlier attempt that registered every datablock but the last; the plans."""
        from moverd.planner import plan_datablocks
        from moverd.services.archive import archive_dataset

        plans = plan_datablocks(self.pid, await app.catalog.list_files(self.pid), app.settings.pipeline.target_size)
        assert len(plans) >= 2
        await archive_dataset(app, self.pid, source=app.storage("landing"), prefix=self.prefix,
                              files=[f for plan in plans[:-1] for f in plan.files])
        return plans


async def test_a_resumed_archive_restores_only_the_files_it_still_reads(
    facility: Facility, s3_fault_proxy: FaultProxy,
) -> None:
    """A cold landing zone (``restore_reads``) whose restored copies expired before a resume (a
    retry days later): the resume restores the files of the datablock it still writes, none of
    those of the datablocks an earlier attempt registered."""
    from moverd.services.archive import archive_dataset

    cold = ColdLanding(facility, s3_fault_proxy, 48)
    async with facility.app() as app:
        plans = await cold.archive_all_but_the_last_datablock(app)
        assert cold.restored_since(0) == sorted(f.path for plan in plans[:-1] for f in plan.files)
        assert len(facility.scicat.datablocks(cold.pid)) == len(plans) - 1
        cold.in_glacier()  # the restored copies expired
        mark = len(restore_requests(s3_fault_proxy))
        res = await archive_dataset(app, cold.pid, source=app.storage("landing"), prefix=cold.prefix)
    assert cold.restored_since(mark) == sorted(f.path for f in plans[-1].files)
    assert (res.reused, res.written) == (len(plans) - 1, 1)
    assert len(facility.scicat.datablocks(cold.pid)) == len(plans)
