"""Two processes retrieving one dataset from a tape-class S3 LTS at the same moment: each
datablock's restore is requested once, across processes.

A real ``prefect server`` on PostgreSQL holds the cross-host locks (``prefect.global_limits``);
two ``moverd job run`` processes, each with a retrieve job for the same dataset, start together
while the fault proxy makes the restores take a few seconds. The proxy, which sees every request,
is the witness.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import httpx

from tests.support.daemon import daemon_env
from tests.support.facility import Facility, dataset_files
from tests.support.faultproxy import FaultProxy
from tests.test_scaleout import PrefectServer, prefect_on_postgres  # noqa: F401  (the fixture)
from tests.test_tape_archive import tape_lts
from tests.test_tape_retrieve import FAST, ONGOING, restore_requests


def test_two_processes_request_each_restore_once(
    facility: Facility, s3_fault_proxy: FaultProxy, prefect_on_postgres: PrefectServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    server = prefect_on_postgres
    for name in ("lts-write", "lts-read"):
        r = httpx.post(f"{server.api}/v2/concurrency_limits/", json={"name": name, "limit": 4}, timeout=30)
        assert r.status_code in (200, 201), r.text
    tape_lts(facility, endpoint_url=s3_fault_proxy.url, read_limit=4, write_limit=4, **FAST)
    facility.overrides["prefect"] = {"global_limits": True}
    config = facility.write_config()
    env = daemon_env(PREFECT_API_URL=server.api, PREFECT_HOME=str(tmp_path / "prefect-client"))

    def job_run(job_id: str) -> subprocess.Popen[str]:
        return subprocess.Popen([sys.executable, "-m", "moverd", "job", "run", job_id, "-c", str(config), "--json"],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    pid = facility.add_dataset(dataset_files(71, n=8))
    archive = job_run(facility.scicat.add_job("archive", [pid]))
    _, err = archive.communicate(timeout=300)
    assert archive.returncode == 0, err[-3000:]
    n_blocks = len(facility.scicat.datablocks(pid))
    assert n_blocks >= 2

    s3_fault_proxy.rewrite_header("x-amz-restore", ONGOING, method="HEAD")
    jobs = [facility.scicat.add_job("retrieve", [pid]) for _ in range(2)]
    procs = [job_run(j) for j in jobs]
    # Restores that take a while: both processes are waiting for them when they finish.
    timer = threading.Timer(8.0, lambda: s3_fault_proxy.stop_rewriting("x-amz-restore"))
    timer.start()
    try:
        for p in procs:
            _, err = p.communicate(timeout=300)
            assert p.returncode == 0, err[-3000:]
    finally:
        timer.cancel()
    requests = restore_requests(s3_fault_proxy)
    assert len(requests) == len(set(requests)) == n_blocks  # one per datablock, not one per process
    for j in jobs:
        assert facility.scicat.job(j)["statusCode"] == "finishedSuccessful"
        assert len(facility.scicat.job(j)["jobResultObject"]["result"]) == n_blocks
