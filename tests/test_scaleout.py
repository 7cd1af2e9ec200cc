"""Scale-out: two ``moverd serve`` daemons share one Prefect server on PostgreSQL.

``moverd prefect setup`` creates the work pools, deployments and the global limit ``lts-write=2``;
eight archive jobs are posted to one daemon; both daemons take work from the pools; every job
finishes ``finishedSuccessful``; and the LTS writers open at once, across both processes, never
exceed 2 although each process alone would allow 4 (observed for real: a config-loaded storage
plugin logs every writer's open and end, and the test samples the LTS for temporary files).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx

from moverd.planner import dataset_folder
from tests.support.daemon import Daemon, daemon_env, wait_for
from tests.support.facility import Facility
from tests.support.ltswatch import max_concurrent
from tests.support.prefectpg import PrefectServer, TempSampler, pool_settings, prefect_setup


def test_two_daemons_share_the_work_and_the_lts_limit(
    facility: Facility, prefect_on_postgres: PrefectServer, tmp_path: Path
) -> None:
    import random

    lts = tmp_path / "lts"
    watch = tmp_path / "lts-writers.log"
    settings = pool_settings(facility, tmp_path, datablock_concurrency=2, max_jobs=3)
    # A job streams one datablock at a time: slow commits make the jobs' writers overlap, so that
    # the limit is reached, not only respected.
    settings["storages"]["lts"]["commit_delay"] = 0.2
    env = daemon_env(PREFECT_API_URL=prefect_on_postgres.api)

    # moverd prefect setup (the seed's prefect-config step), with the LTS write limit at 2
    cfg = Daemon.create(tmp_path, settings, env=env, name="setup").config
    report = prefect_setup(cfg, env, tmp_path / "ph", "lts-write=2")
    assert report["limits"]["lts-write"] == 2 and report["limits"]["lts-read"] == 4
    assert sorted(report["work_pools_created"]) == ["test-archival", "test-retrieval"]
    assert sorted(report["deployments"]) == ["moverd-archive-job/archival", "moverd-retrieve-job/retrieval"]
    assert report["takeover_after"] == 90

    daemons = [Daemon.create(tmp_path, {**settings, "state_dir": str(tmp_path / f"state{i}")}, env=dict(env),
                             name=f"daemon{i}") for i in (1, 2)]
    for d in daemons:
        d.start()
    sampler = TempSampler(lts) if lts.exists() else None
    try:
        for d in daemons:
            d.wait_ready(180)
        rnd = random.Random(77)
        jobs = []
        for i in range(8):
            files = {f"run{i}/frame_{k:02d}.tiff": rnd.randbytes(700_000) for k in range(6)}
            pid = facility.add_dataset(files)
            jobs.append(facility.scicat.add_job("archive", [pid]))
        sampler = sampler or TempSampler(lts)
        runs = {}
        for job_id in jobs:  # all to the first daemon: the second one takes its share from the pool
            r = httpx.post(f"{daemons[0].url}/jobs", json={"id": job_id, "type": "archive"}, timeout=60)
            assert r.status_code == 201, r.text
            runs[job_id] = r.json()["uuid"]

        def all_final() -> bool:
            return all(facility.scicat.job(j)["statusCode"] not in ("jobSubmitted", "inProgress") for j in jobs)

        wait_for(all_final, 240, 0.5, "eight archive jobs")
        statuses = {j: facility.scicat.job(j)["statusCode"] for j in jobs}
        assert set(statuses.values()) == {"finishedSuccessful"}, statuses

        # both daemons took work (Prefect's flow-run label says which one ran it)
        names = set()
        with httpx.Client(base_url=prefect_on_postgres.api, timeout=30) as prefect:
            for job_id, run_id in runs.items():
                fr = wait_for(lambda rid=run_id: (x := prefect.get(f"/flow_runs/{rid}").json())["state"]["type"]
                              == "COMPLETED" and x, 30, 0.2, f"flow run of {job_id}")
                names.add(fr["labels"]["moverd.daemon"])
            limit = prefect.get("/v2/concurrency_limits/lts-write").json()
        assert names == {f"{os.uname().nodename}:{d.port}" for d in daemons}, names
        assert limit["limit"] == 2 and limit["active_slots"] == 0

        # A daemon stopped in the middle of a job (SIGTERM twice: no grace) hands it to the pool
        # (Orphaned): the other daemon takes the same flow run over at once, and resumes it; the
        # stopped one, started again, does not run it.
        big = {f"big/f{k:02d}.bin": rnd.randbytes(1_000_000) for k in range(30)}
        big_pid = facility.add_dataset(big)
        big_job = facility.scicat.add_job("archive", [big_pid])
        r = httpx.post(f"{daemons[1].url}/jobs", json={"id": big_job, "type": "archive"}, timeout=60)
        assert r.status_code == 201, r.text
        first_run = r.json()["uuid"]
        with httpx.Client(base_url=prefect_on_postgres.api, timeout=30) as prefect:
            taken = wait_for(lambda: (x := prefect.get(f"/flow_runs/{first_run}").json())["state"]["type"]
                             == "RUNNING" and x, 60, 0.05, "the big job running")
            victim = next(d for d in daemons if f"{os.uname().nodename}:{d.port}" == taken["labels"]["moverd.daemon"])
            wait_for(lambda: list((lts / dataset_folder(big_pid)).rglob("*.tar")), 60, 0.02,
                     "a datablock of the big job")
            assert victim.proc is not None
            victim.proc.send_signal(signal.SIGTERM)
            time.sleep(0.2)
            assert victim.stop(signal.SIGTERM, timeout=60) == 0, victim.log()
            heir = next(d for d in daemons if d is not victim)
            wait_for(lambda: facility.scicat.job(big_job)["statusCode"] == "finishedSuccessful", 180, 0.5,
                     "the big job, taken over")
            # SciCat hears of the end before Prefect does: the flow run's final state comes after.
            done = wait_for(lambda: (x := prefect.get(f"/flow_runs/{first_run}").json())["state"]["type"]
                            == "COMPLETED" and x, 30, 0.2, "the taken-over flow run completed")
            assert done["labels"]["moverd.daemon"] == f"{os.uname().nodename}:{heir.port}"
            history = prefect.get("/flow_run_states/", params={"flow_run_id": first_run}).json()
            assert "Orphaned" in [s["name"] for s in history]
            victim.start().wait_ready(180)
            wait_for(lambda: "not run again" in victim.log(), 60, 0.2, "the stopped daemon reading its journal")
        assert "took over archive job" in heir.log(200_000)
        assert "resuming archive job" not in victim.log(200_000)
        assert not [p for p in lts.rglob("*") if ".moverd-tmp-" in p.name]
        sampler.stop()

        peak, pids = max_concurrent(watch)
        assert len(pids) >= 2, "writers of both daemons are in the log"
        assert peak == 2, f"at most 2 LTS writers at once across both daemons, saw {peak}"
        assert sampler.peak <= 2, f"the LTS had {sampler.peak} temporary files at once"
        for d in daemons:
            m = d.metrics()
            assert m['moverd_storage_slot_limit{kind="write",storage="lts"}'] == 4  # per process
        print(f"\npeak writers {peak} (sampler {sampler.peak} in {sampler.samples} samples); "
              f"jobs per daemon: {sorted(names)}")
    finally:
        if sampler is not None:
            sampler.stop()
        codes = [d.stop(signal.SIGTERM, timeout=60) for d in daemons]
    assert codes == [0, 0], "\n".join(d.log() for d in daemons)
