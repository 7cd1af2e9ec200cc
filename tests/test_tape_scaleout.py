"""Two processes retrieving one dataset from a tape-class S3 LTS at the same moment: each
datablock's restore is requested once, across processes.

A real ``prefect server`` on PostgreSQL holds the cross-host locks (``prefect.global_limits``);
two ``moverd job run`` processes, each with a retrieve job for the same dataset, start together
while the fault proxy makes the restores take a few seconds. The proxy, which sees every request,
is the witness.
"""

from __future__ import annotations

import threading
from pathlib import Path

from tests.support.facility import Facility
from tests.support.faultproxy import FaultProxy
from tests.support.prefectpg import PrefectServer
from tests.test_scaleout_retrieval import archived, job_runner
from tests.test_tape_archive import tape_lts
from tests.test_tape_retrieve import FAST, ONGOING, restore_requests


def test_two_processes_request_each_restore_once(
    facility: Facility, s3_fault_proxy: FaultProxy, prefect_on_postgres: PrefectServer,
    tmp_path: Path,
) -> None:
    tape_lts(facility, endpoint_url=s3_fault_proxy.url, read_limit=4, write_limit=4, **FAST)
    job_run = job_runner(facility, prefect_on_postgres, tmp_path)
    pid, n_blocks = archived(facility, job_run, 71)

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
