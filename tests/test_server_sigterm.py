"""SIGTERM to ``moverd serve`` in the middle of a transfer: a clean exit, nothing partial on the
LTS, and the job resumes by itself at the next start. With a long grace period, the running job
finishes first and new jobs are refused meanwhile."""

from __future__ import annotations

import json
import random
import signal
import tarfile
import time
from pathlib import Path
from typing import Any

import httpx

from moverd.models import index_key
from tests.support.daemon import Daemon, wait_for
from tests.support.facility import Facility


def temp_files(lts: Path) -> list[Path]:
    return [p for p in lts.rglob("*") if ".moverd-tmp-" in p.name]


def assert_whole_datablocks(lts: Path) -> int:
    """Every tar has its index beside it and holds exactly the members the index lists."""
    tars = sorted(lts.rglob("*.tar"))
    for tar in tars:
        index_path = tar.parent / Path(index_key(tar.name)).name
        assert index_path.exists(), f"{tar} has no index"
        index = json.loads(index_path.read_text())
        listed = {m["path"]: m["size"] for m in index["members"]}
        with tarfile.open(tar) as tf:
            found = {}
            for m in tf.getmembers():
                data = tf.extractfile(m)
                assert data is not None and len(data.read()) == m.size
                found[m.name] = m.size
        assert found == listed, tar
        assert index["packed_size"] == tar.stat().st_size
    return len(tars)


def big_dataset(seed: int, n: int) -> dict[str, bytes]:
    rnd = random.Random(seed)
    return {f"frames/f{i:03d}.tiff": rnd.randbytes(1_000_000) for i in range(n)}


def post(daemon: Daemon, job_id: str) -> httpx.Response:
    return httpx.post(f"{daemon.url}/jobs", json={"id": job_id, "type": "archive"}, timeout=30)


def job_view(daemon: Daemon, job_id: str) -> dict[str, Any]:
    data: dict[str, Any] = httpx.get(f"{daemon.url}/jobs/{job_id}", timeout=30).json()
    return data


def test_sigterm_mid_transfer_aborts_cleanly_and_the_job_resumes(
    facility: Facility, prefect_db_template: Path
) -> None:
    files = big_dataset(41, 40)
    pid = facility.add_dataset(files)
    job_id = facility.scicat.add_job("archive", [pid])
    settings = facility.settings_dict()
    settings["pipeline"] = {"target_size": "1MiB", "chunk_size": "256KiB", "buffer_budget": "8MiB",
                            "datablock_concurrency": 1}
    settings["server"] = {"shutdown_grace": 0}
    daemon = Daemon.create(facility.tmp, settings, template=prefect_db_template, name="sigterm")
    lts = facility.tmp / "lts"
    daemon.start().wait_ready()
    try:
        accepted = post(daemon, job_id)
        assert accepted.status_code == 201, accepted.text
        first_run = accepted.json()["uuid"]
        wait_for(lambda: temp_files(lts) and len(list(lts.rglob("*.tar"))) >= 3, 120, 0.002,
                 "a datablock being written")
        t0 = time.monotonic()
        rc = daemon.stop(signal.SIGTERM, timeout=60)
        stopped_in = time.monotonic() - t0
    finally:
        daemon.stop(signal.SIGKILL)
    assert rc == 0, daemon.log()
    assert stopped_in < 20, stopped_in
    assert "aborting 1 job(s)" in daemon.log() or "aborted" in daemon.log()
    assert temp_files(lts) == []
    written = assert_whole_datablocks(lts)
    assert 3 <= written < 40
    assert facility.scicat.job(job_id)["statusCode"] == "inProgress"
    assert facility.scicat.lifecycle(pid)["archiveStatusMessage"] == "started"
    assert len(facility.landing_keys(pid)) == len(files)  # nothing deleted before the end

    # The next start picks the interrupted job up by itself, in a new flow run.
    daemon.start().wait_ready()
    try:
        view = wait_for(lambda: str((v := job_view(daemon, job_id))["status"]).startswith("finished") and v, 180, 0.5,
                        "the resumed job")
        assert view["status"] == "finishedSuccessful", view
        assert view["flow_run"]["id"] != first_run
        old = httpx.get(f"{daemon.prefect_api()}/flow_runs/{first_run}", timeout=30).json()
        assert old["state"]["type"] == "CRASHED"
    finally:
        assert daemon.stop() == 0, daemon.log()
    assert facility.scicat.job(job_id)["statusCode"] == "finishedSuccessful"
    blocks = facility.scicat.datablocks(pid)
    assert len({b["archiveId"] for b in blocks}) == len(blocks) == assert_whole_datablocks(lts) == 40
    posts = facility.scicat.requests("POST", "datablocks")
    assert len([c for c in posts if c.status == 201]) == len(blocks)  # none registered twice
    assert temp_files(lts) == [] and facility.landing_keys(pid) == []
    assert "resuming archive job" in daemon.log()


def test_sigterm_with_grace_lets_the_running_job_finish(facility: Facility, prefect_db_template: Path) -> None:
    files = big_dataset(42, 24)
    pid = facility.add_dataset(files)
    job_id = facility.scicat.add_job("archive", [pid])
    other = facility.scicat.add_job("archive", [facility.add_dataset({"x.txt": b"x"})])
    settings = facility.settings_dict()
    settings["pipeline"] = {"target_size": "1MiB", "chunk_size": "256KiB", "buffer_budget": "8MiB",
                            "datablock_concurrency": 1}
    settings["server"] = {"shutdown_grace": 120}
    daemon = Daemon.create(facility.tmp, settings, template=prefect_db_template, name="grace")
    lts = facility.tmp / "lts"
    daemon.start().wait_ready()
    try:
        assert post(daemon, job_id).status_code == 201
        wait_for(lambda: list(lts.rglob("*.tar")), 120, 0.002, "the first datablock")
        assert daemon.proc is not None
        daemon.proc.send_signal(signal.SIGTERM)
        refused = wait_for(lambda: (r := post(daemon, other)).status_code != 201 and r, 10, 0.01, "a refusal")
        assert refused.status_code == 503 and "shutting down" in refused.json()["detail"]
        ready = httpx.get(f"{daemon.url}/health/readyz", timeout=30)
        assert ready.status_code == 503 and "draining" in ready.json()["checks"]["daemon"]
        assert daemon.proc.wait(120) == 0, daemon.log()
    finally:
        daemon.stop(signal.SIGKILL)
    assert facility.scicat.job(job_id)["statusCode"] == "finishedSuccessful"
    assert facility.scicat.job(other)["statusCode"] == "jobSubmitted"
    assert assert_whole_datablocks(lts) == 24 and temp_files(lts) == []
