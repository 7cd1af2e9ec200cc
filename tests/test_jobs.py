"""Archive and retrieve jobs end to end: SciCat-compatible server, S3 server, LTS directory,
real Prefect flow runs."""

from __future__ import annotations

import base64
import hashlib
import io
import tarfile
from pathlib import Path
from typing import Any

import httpx
import pytest
from moverd_flows import job_flow

from moverd import hookimpl
from moverd.app import App
from tests.support.facility import Facility, dataset_files

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("prefect_harness")]


async def run(facility: Facility, job_id: str, app: App | None = None) -> dict[str, Any]:
    if app is not None:
        return await job_flow(job_id, app=app)
    async with facility.app() as own:
        return await job_flow(job_id, app=own)


async def test_archive_job_success(facility: Facility, job_api: str) -> None:
    facility.job_api = job_api
    files = dataset_files(1)
    pid = facility.add_dataset(files)
    job_id = facility.scicat.add_job("archive", [pid])
    facility.scicat.clear_calls()
    res = await run(facility, job_id)
    assert res["status"] == "finishedSuccessful", res
    seq = facility.scicat.sequence(logins=False)
    print("\n".join(seq))
    blocks = facility.scicat.datablocks(pid)
    jobs = "/api/v3/jobs/{id}" if job_api == "v3" else "/api/v4/jobs/{id}"
    expected = [
        f"GET {jobs} 200",
        f"PATCH {jobs} 200",
        "GET /api/v3/datasets/{pid} 200",
        "PATCH /api/v3/datasets/{pid}/datasetlifecycle 200",
        "GET /api/v3/datasets/{pid}/origdatablocks 200",
        "GET /api/v3/datasets/{pid}/datablocks 200",
        *["POST /api/v3/datasets/{pid}/datablocks 201"] * len(blocks),
        "PATCH /api/v3/datasets/{pid}/datasetlifecycle 200",
        f"PATCH {jobs} 200",
    ]
    assert seq == expected
    lifecycle_bodies = [c.body for c in facility.scicat.requests("PATCH", "datasetlifecycle")]
    assert lifecycle_bodies[0] == {"archiveStatusMessage": "started", "archivable": False}
    assert lifecycle_bodies[1]["archiveStatusMessage"] == "datasetOnArchiveDisk"
    assert lifecycle_bodies[1]["retrievable"] is True and lifecycle_bodies[1]["archivable"] is False
    assert all("accessGroups" not in b for b in lifecycle_bodies)
    status_bodies = [c.body for c in facility.scicat.requests("PATCH", "jobs")]
    if job_api == "v3":
        assert [b["jobStatusMessage"] for b in status_bodies] == ["inProgress", "finishedSuccessful"]
    else:
        assert [b["statusCode"] for b in status_bodies] == ["inProgress", "finishedSuccessful"]
    # the catalog's datablocks match the tars on the LTS member by member
    assert len(blocks) >= 2
    seen = {}
    for block in blocks:
        tar = facility.tmp / "lts" / block["archiveId"]
        with tarfile.open(tar) as tf:
            members = {m.name: hashlib.md5(tf.extractfile(m).read()).hexdigest() for m in tf.getmembers()}
        assert {f["path"]: f["chk"] for f in block["dataFileList"]} == members
        assert {f["path"]: f["size"] for f in block["dataFileList"]} == {p: len(files[p]) for p in members}
        assert block["packedSize"] == tar.stat().st_size and block["chkAlg"] == "md5"
        seen.update(members)
    assert seen == {p: hashlib.md5(d).hexdigest() for p, d in files.items()}
    assert facility.landing_keys(pid) == []
    assert facility.scicat.lifecycle(pid)["archiveStatusMessage"] == "datasetOnArchiveDisk"


class OnEvent:
    """An observer plugin that does something to the world when a hook fires (once)."""

    def __init__(self, hook: str, action: Any, after: int = 1) -> None:
        self.hook, self.action, self.after, self.count = hook, action, after, 0

    def _fire(self, name: str) -> None:
        if name == self.hook:
            self.count += 1
            if self.count == self.after:
                self.action()

    @hookimpl
    def datablock_committed(self, transfer: Any, datablock: Any) -> None:
        self._fire("datablock_committed")

    @hookimpl
    def datablock_verified(self, transfer: Any, datablock: Any) -> None:
        self._fire("datablock_verified")


def lts_tars(facility: Facility) -> list[Path]:
    return sorted((facility.tmp / "lts").rglob("*.tar"))


def no_temp_files(facility: Facility) -> bool:
    return not [p for p in (facility.tmp / "lts").rglob("*") if ".moverd-tmp-" in p.name]


async def test_datablock_file_times_keep_their_milliseconds(facility: Facility) -> None:
    files = dataset_files(5, n=2)
    pid = facility.add_dataset(files, file_time="2024-05-01T12:00:26.074Z")
    res = await run(facility, facility.scicat.add_job("archive", [pid]))
    assert res["status"] == "finishedSuccessful", res
    times = {f["time"] for b in facility.scicat.datablocks(pid) for f in b["dataFileList"]}
    assert times == {"2024-05-01T12:00:26.074Z"}


async def test_one_bad_dataset_does_not_stop_the_others(facility: Facility) -> None:
    good1, good2 = dataset_files(2, n=3), dataset_files(3, n=3)
    bad = dataset_files(4, n=3)
    p1 = facility.add_dataset(good1)
    p_bad = facility.add_dataset(bad, upload=False)
    facility.upload(p_bad, {k: v for k, v in bad.items() if k != "raw/frame_001.tiff"})
    p2 = facility.add_dataset(good2)
    job_id = facility.scicat.add_job("archive", [p1, p_bad, p2])
    res = await run(facility, job_id)
    assert res["status"] == "finishedWithDatasetErrors"
    assert [d["outcome"] for d in res["datasets"]] == ["ok", "user_error", "ok"]
    assert "'raw/frame_001.tiff' is missing" in res["datasets"][1]["message"]
    lc = facility.scicat.lifecycle(p_bad)
    assert (lc["archiveStatusMessage"], lc["archivable"], lc["retrievable"]) == ("missingFilesError", False, False)
    assert facility.scicat.datablocks(p_bad) == []
    assert not (facility.tmp / "lts" / p_bad.replace("/", "%2F")).exists()  # nothing written for it
    assert len(facility.landing_keys(p_bad)) == len(bad) - 1  # landing zone kept
    for pid in (p1, p2):
        assert facility.scicat.lifecycle(pid)["archiveStatusMessage"] == "datasetOnArchiveDisk"
        assert facility.landing_keys(pid) == []
    assert facility.scicat.job(job_id)["statusCode"] == "finishedWithDatasetErrors"


async def test_lts_write_failure_is_a_system_error_and_rolls_back(facility: Facility) -> None:
    from tests.support.mounts import tmpfs

    # 1.5 MB fits on a 2 MB LTS, the frames after it do not: blocks are registered, then the
    # wait for space times out (a datablock bigger than the whole LTS would fail before any).
    files = dataset_files(5, n=8, big=1_500_000)
    pid = facility.add_dataset(files)
    job_id = facility.scicat.add_job("archive", [pid])
    with tmpfs(facility.tmp / "lts", "2m"):
        # One datablock at a time: the first is registered before the next fills the LTS.
        facility.overrides["pipeline"] = {**facility.settings_dict()["pipeline"], "datablock_concurrency": 1}
        facility.overrides["storages"] = {
            **facility.settings_dict()["storages"],
            "lts": {"type": "posix", "root": str(facility.tmp / "lts"), "free_space_timeout": 0.2,
                    "free_space_poll": 0.1},
        }
        res = await run(facility, job_id)
        assert no_temp_files(facility)
    assert res["status"] == "finishedUnsuccessful"
    assert res["datasets"][0]["outcome"] == "system_error" and "space" in res["datasets"][0]["message"]
    lc = facility.scicat.lifecycle(pid)
    assert (lc["archiveStatusMessage"], lc["archivable"], lc["retrievable"]) == (
        "scheduleArchiveJobFailed", False, False)
    assert facility.scicat.datablocks(pid) == []  # what this attempt registered was deleted
    assert len(facility.scicat.requests("DELETE", "datablocks")) >= 1
    assert len(facility.landing_keys(pid)) == len(files)


@pytest.mark.parametrize("medium", ["badmedia", "badreads"],
                         ids=["read-back-while-writing", "read-back-after-commit"])
async def test_verification_mismatch_is_a_system_error(facility: Facility, medium: str) -> None:
    from tests.support.badmedia import BadMediaPlugin

    facility.plugins.append(BadMediaPlugin())
    files = dataset_files(6, n=4)
    pid = facility.add_dataset(files)
    job_id = facility.scicat.add_job("archive", [pid])
    facility.overrides["storages"] = {
        **facility.settings_dict()["storages"],
        "lts": {"type": medium, "root": str(facility.tmp / "lts"), "create": True},
    }
    res = await run(facility, job_id)
    assert res["status"] == "finishedUnsuccessful"
    assert "corrupt in member" in res["datasets"][0]["message"]
    assert facility.scicat.datablocks(pid) == []
    assert facility.scicat.lifecycle(pid)["archiveStatusMessage"] == "scheduleArchiveJobFailed"
    assert len(facility.landing_keys(pid)) == len(files)


async def test_scicat_503_bursts_are_survived(facility: Facility) -> None:
    files = dataset_files(7, n=4)
    pid = facility.add_dataset(files)
    job_id = facility.scicat.add_job("archive", [pid])
    facility.plugins.append(OnEvent("datablock_verified", lambda: facility.scicat.fail_next(3, 503)))
    facility.scicat.fail_next(2, 503)
    res = await run(facility, job_id)
    assert res["status"] == "finishedSuccessful", res
    assert len(facility.scicat.requests(faults=True)) - len(facility.scicat.requests()) == 5
    assert facility.scicat.lifecycle(pid)["archiveStatusMessage"] == "datasetOnArchiveDisk"


async def test_token_expiry_mid_job(facility: Facility) -> None:
    files = dataset_files(8, n=6)
    pid = facility.add_dataset(files)
    job_id = facility.scicat.add_job("archive", [pid])
    facility.plugins.append(OnEvent("datablock_committed", facility.scicat.expire_tokens))
    res = await run(facility, job_id)
    assert res["status"] == "finishedSuccessful", res
    assert len(facility.scicat.requests("POST", "auth/login")) == 2


async def test_registration_refused_for_good_rolls_back(facility: Facility) -> None:
    files = dataset_files(9, n=8)
    pid = facility.add_dataset(files)
    job_id = facility.scicat.add_job("archive", [pid])
    # after the first datablock is registered, SciCat refuses every further registration
    facility.plugins.append(OnEvent("datablock_verified", lambda: facility.scicat.fail_next(
        1000, 503, method="POST", path=r"/datablocks$"), after=2))
    res = await run(facility, job_id)
    assert res["status"] == "finishedUnsuccessful"
    assert facility.scicat.datablocks(pid) == []
    assert len(facility.landing_keys(pid)) == len(files)
    assert facility.scicat.lifecycle(pid)["archiveStatusMessage"] == "scheduleArchiveJobFailed"
    facility.scicat.clear_faults()
    # run again: committed datablocks are reused, each registered once
    facility.plugins.clear()
    before = {p: p.stat().st_mtime_ns for p in lts_tars(facility)}
    res = await run(facility, job_id)
    assert res["status"] == "finishedSuccessful"
    blocks = facility.scicat.datablocks(pid)
    assert len({b["archiveId"] for b in blocks}) == len(blocks) == len(lts_tars(facility))
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())
    assert facility.landing_keys(pid) == []


async def test_scicat_down_mid_job_then_rerun(facility: Facility) -> None:
    files = dataset_files(10, n=8)
    pid = facility.add_dataset(files)
    job_id = facility.scicat.add_job("archive", [pid])
    facility.plugins.append(OnEvent("datablock_verified", facility.scicat.down, after=2))
    with pytest.raises(Exception, match="503|CatalogError|SciCat"):
        await run(facility, job_id)
    facility.scicat.up()
    assert len(facility.landing_keys(pid)) == len(files)
    facility.plugins.clear()
    res = await run(facility, job_id)
    assert res["status"] == "finishedSuccessful"
    blocks = facility.scicat.datablocks(pid)
    assert len({b["archiveId"] for b in blocks}) == len(blocks) == len(lts_tars(facility))
    assert no_temp_files(facility)


async def archived(facility: Facility, seed: int, n: int = 6) -> tuple[str, dict[str, bytes]]:
    files = dataset_files(seed, n=n)
    pid = facility.add_dataset(files)
    res = await run(facility, facility.scicat.add_job("archive", [pid]))
    assert res["status"] == "finishedSuccessful"
    return pid, files


def download(url: str) -> bytes:
    r = httpx.get(url, timeout=30)
    assert r.status_code == 200, (url, r.status_code, r.text[:200])
    return r.content


async def test_retrieve_job_gives_links_that_download_the_data(facility: Facility, job_api: str) -> None:
    facility.job_api = job_api
    pid, files = await archived(facility, 11)
    job_id = facility.scicat.add_job("retrieve", [pid])
    res = await run(facility, job_id)
    assert res["status"] == "finishedSuccessful", res
    stored = facility.scicat.job(job_id)
    assert stored["statusCode"] == "finishedSuccessful"
    result = stored["jobResultObject"]
    entries = result["result"]
    blocks = facility.scicat.datablocks(pid)
    assert sorted(e["archiveId"] for e in entries) == sorted(b["archiveId"] for b in blocks)
    got: dict[str, bytes] = {}
    for e in entries:
        assert set(e) == {"datasetId", "name", "size", "archiveId", "url"} and e["datasetId"] == pid
        assert e["url"].startswith(facility.s3.endpoint_url)  # plain HTTP from the S3 server
        with tarfile.open(fileobj=io.BytesIO(download(e["url"]))) as tf:
            for m in tf.getmembers():
                got[m.name] = tf.extractfile(m).read()
    assert got == files
    script = base64.b64decode(result["downloadScript"]).decode()
    assert script.startswith("#!/bin/sh") and all(e["url"] in script for e in entries)
    lc = facility.scicat.lifecycle(pid)
    assert (lc["retrieveStatusMessage"], lc["retrievable"]) == ("datasetRetrieved", True)


async def test_partial_retrieve_job_gives_only_the_selected_files(facility: Facility) -> None:
    pid, files = await archived(facility, 12)
    wanted = ["raw/frame_002.tiff", "ünïcode/名前.json", "big/movie.mrc"]
    job_id = facility.scicat.add_job("retrieve", [(pid, wanted)])
    res = await run(facility, job_id)
    assert res["status"] == "finishedSuccessful", res
    entries = facility.scicat.job(job_id)["jobResultObject"]["result"]
    assert sorted(e["name"] for e in entries) == sorted(wanted)
    for e in entries:
        assert download(e["url"]) == files[e["name"]]
        assert e["size"] == len(files[e["name"]])
    assert len(facility.retrieval_keys()) == 3


async def test_two_concurrent_retrievals_of_one_dataset_copy_it_once(facility: Facility) -> None:
    import anyio

    pid, _files = await archived(facility, 13)
    jobs = [facility.scicat.add_job("retrieve", [pid]) for _ in range(2)]
    results: list[dict[str, Any]] = []
    async with facility.app() as app:
        async def one(job_id: str) -> None:
            results.append(await run(facility, job_id, app))

        async with anyio.create_task_group() as tg:
            for job_id in jobs:
                tg.start_soon(one, job_id)
    assert [r["status"] for r in results] == ["finishedSuccessful"] * 2
    n_blocks = len(facility.scicat.datablocks(pid))
    log = facility.s3.log_path.read_text(errors="replace")
    puts = [line for line in log.splitlines() if f'"PUT /{facility.retrieval_bucket}/' in line
            and "partNumber" not in line]
    assert len(puts) == n_blocks, puts  # one upload per datablock, not two
    urls = [sorted(e["url"] for e in facility.scicat.job(j)["jobResultObject"]["result"]) for j in jobs]
    assert len(urls[0]) == len(urls[1]) == n_blocks


async def test_failed_retrievals_set_the_job_status(facility: Facility) -> None:
    pid, _ = await archived(facility, 14, n=2)
    other, _ = await archived(facility, 15, n=2)
    job_id = facility.scicat.add_job("retrieve", [(pid, ["no/such/file"])])
    res = await run(facility, job_id)
    assert res["status"] == "finishedUnsuccessful"  # every dataset failed
    assert facility.scicat.lifecycle(pid)["retrieveStatusMessage"] == "datasetRetrievalFailed"
    assert facility.retrieval_keys() == []
    job_id = facility.scicat.add_job("retrieve", [(pid, ["no/such/file"]), other])
    res = await run(facility, job_id)
    assert res["status"] == "finishedWithDatasetErrors"  # only some did
    assert facility.scicat.lifecycle(other)["retrieveStatusMessage"] == "datasetRetrieved"


def test_sigkill_during_an_archive_job_then_job_run_again(facility: Facility, prefect_harness: None) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    from prefect.settings import PREFECT_API_URL

    rnd = __import__("random").Random(16)
    files = {f"frames/f{i:03d}.tiff": rnd.randbytes(1_000_000) for i in range(24)}
    pid = facility.add_dataset(files)
    job_id = facility.scicat.add_job("archive", [pid])
    facility.overrides["pipeline"] = {"target_size": "1MiB", "datablock_concurrency": 1}
    config = facility.write_config()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MOVERD_")},
           "PREFECT_API_URL": str(PREFECT_API_URL.value())}
    cmd = [sys.executable, "-m", "moverd", "job", "run", job_id, "--config", str(config), "--json"]
    lts = facility.tmp / "lts"
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, killed = time.monotonic() + 120, False
    while time.monotonic() < deadline and proc.poll() is None:
        if [p for p in lts.rglob("*") if ".moverd-tmp-" in p.name] and len(list(lts.rglob("*.tar"))) >= 3:
            proc.send_signal(signal.SIGKILL)
            killed = True
            break
        time.sleep(0.002)
    proc.wait()
    assert killed, "the job finished before it could be killed"
    assert facility.scicat.lifecycle(pid)["archiveStatusMessage"] == "started"
    registered_before = len(facility.scicat.datablocks(pid))
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert '"finishedSuccessful"' in done.stdout
    blocks = facility.scicat.datablocks(pid)
    posts = facility.scicat.requests("POST", "datablocks")
    assert len({b["archiveId"] for b in blocks}) == len(blocks) == len(list(lts.rglob("*.tar")))
    assert len([c for c in posts if c.status == 201]) == len(blocks)  # never registered twice
    assert registered_before >= 1
    assert not [p for p in lts.rglob("*") if ".moverd-tmp-" in p.name]
    assert facility.landing_keys(pid) == []
    assert facility.scicat.job(job_id)["statusCode"] == "finishedSuccessful"
