"""Two processes retrieving one dataset at the same moment make one copy, across processes.

A real ``prefect server`` on PostgreSQL holds the lock (``prefect.global_limits``): two
``moverd job run`` processes, each with a retrieve job for the same archived dataset, start
together. The S3 server's own log is the witness: each datablock is uploaded to the retrieval
bucket once, and both jobs hand out links to those copies.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx

from tests.support.daemon import daemon_env
from tests.support.facility import Facility, dataset_files
from tests.support.prefectpg import PrefectServer

JobRun = Callable[[str], "subprocess.Popen[str]"]


def job_runner(facility: Facility, server: PrefectServer, tmp_path: Path) -> JobRun:
    """``moverd job run <id>`` as a process on the facility, with global limits on ``server``
    (the LTS limits created first)."""
    for name in ("lts-write", "lts-read"):
        r = httpx.post(f"{server.api}/v2/concurrency_limits/", json={"name": name, "limit": 4}, timeout=30)
        assert r.status_code in (200, 201), r.text
    facility.overrides["prefect"] = {"global_limits": True}
    config = facility.write_config()
    env = daemon_env(PREFECT_API_URL=server.api, PREFECT_HOME=str(tmp_path / "prefect-client"))

    def job_run(job_id: str) -> subprocess.Popen[str]:
        return subprocess.Popen([sys.executable, "-m", "moverd", "job", "run", job_id, "-c", str(config), "--json"],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    return job_run


def archived(facility: Facility, job_run: JobRun, seed: int) -> tuple[str, int]:
    """A dataset archived by a job run process, and its number of datablocks (at least 2)."""
    pid = facility.add_dataset(dataset_files(seed, n=8))
    archive = job_run(facility.scicat.add_job("archive", [pid]))
    _, err = archive.communicate(timeout=300)
    assert archive.returncode == 0, err[-3000:]
    n_blocks = len(facility.scicat.datablocks(pid))
    assert n_blocks >= 2
    return pid, n_blocks


def test_two_processes_retrieving_one_dataset_copy_it_once(
    facility: Facility, prefect_on_postgres: PrefectServer, tmp_path: Path
) -> None:
    job_run = job_runner(facility, prefect_on_postgres, tmp_path)
    server = prefect_on_postgres
    pid, n_blocks = archived(facility, job_run, 21)

    jobs = [facility.scicat.add_job("retrieve", [pid]) for _ in range(2)]
    procs = [job_run(j) for j in jobs]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    log = facility.s3.log_path.read_text(errors="replace")
    puts = [line for line in log.splitlines() if f'"PUT /{facility.retrieval_bucket}/' in line
            and "partNumber" not in line]
    assert len(puts) == n_blocks, puts  # one upload per datablock, not one per process
    # Both jobs link the same copies (each link signed on its own).
    objects = [sorted(e["url"].split("?")[0] for e in facility.scicat.job(j)["jobResultObject"]["result"])
               for j in jobs]
    assert objects[0] == objects[1] and len(objects[0]) == n_blocks
    # The lock is one slot of a lock limit, given back when the retrieval ended.
    limits = httpx.post(f"{server.api}/v2/concurrency_limits/filter", json={}, timeout=30).json()
    locks = [g for g in limits if g["name"].startswith("moverd-lock-")]
    assert len(locks) == 1 and locks[0]["limit"] == 1 and locks[0]["active_slots"] == 0
