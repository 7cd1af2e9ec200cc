"""Datablocks as Prefect task runs on a shared Prefect server (scale-out).

A ``moverd serve`` daemon with ``PREFECT_API_URL`` pointing at ``prefect server start`` on
PostgreSQL (the scale-out test's server fixture) runs an archive job of two datasets from its
deployment; each dataset's subflow run then has one task run per datablock, named
``datablock <n>/<total> <archive id>``, COMPLETED, as the Prefect API returns them. The embedded
mode's counterpart is ``tests/test_server.py::test_datablocks_are_task_runs_prefect_shows``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from moverd.planner import archive_id
from tests.support.daemon import Daemon, daemon_env, dataset_task_runs, wait_for
from tests.support.facility import Facility, dataset_files
from tests.support.prefectpg import PrefectServer


def test_datablock_task_runs_on_a_shared_server(
    facility: Facility, prefect_on_postgres: PrefectServer, tmp_path: Path
) -> None:
    settings = facility.settings_dict()
    settings["prefect"] = {"archival_work_pool": "tasks-archival", "retrieval_work_pool": "tasks-retrieval"}
    settings["server"] = {"poll_interval": 0.5, "shutdown_grace": 10}
    daemon = Daemon.create(tmp_path, settings, env=daemon_env(PREFECT_API_URL=prefect_on_postgres.api))
    pids = [facility.add_dataset(dataset_files(seed, n=6)) for seed in (51, 52)]
    job_id = facility.scicat.add_job("archive", pids)
    daemon.start()
    try:
        daemon.wait_ready(180)
        r = httpx.post(f"{daemon.url}/jobs", json={"id": job_id, "type": "archive"}, timeout=60)
        assert r.status_code == 201, r.text

        def done() -> dict[str, Any] | None:
            v: dict[str, Any] = httpx.get(f"{daemon.url}/jobs/{job_id}", timeout=30).json()
            return v if v["status"] == "finishedSuccessful" else None

        view = wait_for(done, 120, 0.25, f"job {job_id}")
        totals = {d["pid"]: d["datablocks_total"] for d in view["progress"]["datasets"]}
        runs = dataset_task_runs(prefect_on_postgres.api, job_id, datasets=2, blocks=sum(totals.values()))
        for pid in pids:
            name = f"archive {pid} (job {job_id})"
            names = [t["name"] for t in runs[name]]
            print("task runs of", name, names)
            total = totals[pid]
            assert total >= 2
            assert sorted(names) == [f"datablock {i + 1}/{total} {archive_id(pid, i)}" for i in range(total)]
            assert {t["state_type"] for t in runs[name]} == {"COMPLETED"}
    finally:
        assert daemon.stop(timeout=60) == 0, daemon.log()
    # no 'moverd prefect setup' here: jobs run all the same, and the daemon says that there is
    # no takeover for them
    assert "no takeover automation on the Prefect server" in daemon.log(200_000)
