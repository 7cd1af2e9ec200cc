"""A job whose daemon died is taken over by another daemon of the pool, within the bound.

A real ``prefect server`` on PostgreSQL, ``moverd prefect setup`` (work pools, deployments, the
global limit ``lts-write=2`` and the takeover automation, here with a 12 s window), and two
``moverd serve`` daemons, each in a process group of its own. The daemon running an archive job is
killed with SIGKILL (its whole group, as a lost host) while it writes a datablock. The other one
must take the job over and finish it within the bound; no datablock may be committed twice (the
watched LTS storage logs every commit, of both processes); the LTS writers open at once never
exceed the limit (the dead daemon's writer counts as open to the end: its slot is held until its
lease runs out); and the killed daemon, restarted with its journal while the job runs elsewhere,
does not run it again. Last, eight claims of one Orphaned run at once: Prefect grants one.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from moverd.planner import dataset_folder
from tests.support.daemon import Daemon, daemon_env, wait_for
from tests.support.facility import Facility
from tests.support.ltswatch import commits, max_concurrent
from tests.support.prefectpg import PrefectServer, TempSampler, pool_settings, prefect_setup

WINDOW = 12.0
BOUND = WINDOW + 8.0
"""Kill to takeover: the window after the last heartbeat (which was at most a third of it before
the kill), the server's evaluation of proactive triggers (every 5 s), a poll of the pools (0.5 s),
and a margin for a loaded machine."""


def test_a_job_of_a_killed_daemon_is_taken_over_and_not_run_again(
    facility: Facility, prefect_on_postgres: PrefectServer, tmp_path: Path
) -> None:
    import random

    lts = tmp_path / "lts"
    watch = tmp_path / "lts-writers.log"
    settings = pool_settings(facility, tmp_path, datablock_concurrency=1, max_jobs=2, takeover_after=f"{WINDOW:g}s")
    env = daemon_env(PREFECT_API_URL=prefect_on_postgres.api)
    # setup made the automation with the default window; run again, it moves it to this one
    first_cfg = Daemon.create(tmp_path, {**settings, "server": {**settings["server"], "takeover_after": "90s"}},
                              env=env, name="setup-default").config
    assert prefect_setup(first_cfg, env, tmp_path / "ph", "lts-write=2")["takeover_after"] == 90
    cfg = Daemon.create(tmp_path, settings, env=env, name="setup").config
    assert prefect_setup(cfg, env, tmp_path / "ph", "lts-write=2")["takeover_after"] == WINDOW
    automations = httpx.post(f"{prefect_on_postgres.api}/automations/filter", json={}, timeout=30).json()
    assert [(a["name"], a["trigger"]["within"], a["trigger"]["posture"]) for a in automations] == [
        ("moverd-takeover", WINDOW, "Proactive")]

    daemons = [Daemon.create(tmp_path, {**settings, "state_dir": str(tmp_path / f"state{i}")}, env=dict(env),
                             name=f"daemon{i}") for i in (1, 2)]
    names = {f"{os.uname().nodename}:{d.port}": d for d in daemons}
    for d in daemons:
        d.start(own_group=True)
    sampler = None
    try:
        for d in daemons:
            d.wait_ready(180)
        rnd = random.Random(15)
        pid = facility.add_dataset({f"big/f{k:02d}.bin": rnd.randbytes(1_000_000) for k in range(30)})
        job = facility.scicat.add_job("archive", [pid])
        sampler = TempSampler(lts)
        r = httpx.post(f"{daemons[0].url}/jobs", json={"id": job, "type": "archive"}, timeout=60)
        assert r.status_code == 201, r.text
        run_id = r.json()["uuid"]
        prefect = httpx.Client(base_url=prefect_on_postgres.api, timeout=30)

        def flow_run() -> dict[str, Any]:
            fr: dict[str, Any] = prefect.get(f"/flow_runs/{run_id}").json()
            return fr

        first = wait_for(lambda: (x := flow_run())["state"]["type"] == "RUNNING" and x, 60, 0.05, "the job running")
        victim = names[first["labels"]["moverd.daemon"]]
        heir = next(d for d in daemons if d is not victim)
        heir_name = next(n for n, d in names.items() if d is heir)
        folder = dataset_folder(pid)

        def mid_write() -> bool:  # three datablocks committed, the next one being written
            lines = watch.read_text().splitlines() if watch.exists() else []
            done = sum(1 for line in lines if " commit " in line and folder in line)
            opened = [line.split(" ", 3)[3] for line in lines if " open " in line and line.endswith(".tar")]
            ended = [line.split(" ", 3)[3] for line in lines if " end " in line]
            return done >= 3 and len(opened) > len([k for k in ended if k.endswith(".tar")])

        wait_for(mid_write, 60, 0.01, "three datablocks committed and a fourth being written")
        victim.kill_group()
        killed = time.time()

        taken = wait_for(lambda: (x := flow_run())["labels"].get("moverd.daemon") == heir_name
                         and x["state"]["type"] in ("PENDING", "RUNNING") and x, BOUND + 20, 0.1, "the takeover")
        took = time.time() - killed
        victim.start(own_group=True)  # comes back with its journal while the job runs elsewhere
        wait_for(lambda: facility.scicat.job(job)["statusCode"] == "finishedSuccessful", 120, 0.2,
                 "the job finished by the other daemon")
        finished = time.time() - killed
        victim.wait_ready(180)
        wait_for(lambda: "not resumed here" in (x := victim.log()) or "not run again" in x, 60, 0.2,
                 "the restarted daemon looking at its journal")
        time.sleep(3 * 0.5 + 1)  # a few polls of the pools: it must not claim anything of the job
        taken_over = heir.metrics()["moverd_jobs_taken_over_total"]

        states = prefect.get(f"/flow_runs/{run_id}").json()
        history = prefect.get("/flow_run_states/", params={"flow_run_id": run_id}).json()
        tagged = prefect.post("/flow_runs/filter", json={"flow_runs": {"tags": {"all_": [f"moverd-job:{job}"]}}}
                              ).json()
        prefect.close()
    finally:
        if sampler is not None:
            sampler.stop()
        codes = [d.stop(timeout=60) for d in daemons]
    assert codes == [0, 0], "\n".join(d.log() for d in daemons)

    # Taken over within the bound, the same flow run, marked Orphaned on the way; run once.
    assert took <= BOUND, f"taken over {took:.1f} s after the kill (bound {BOUND:g} s)"
    assert taken["id"] == run_id and states["state"]["type"] == "COMPLETED"
    assert states["labels"]["moverd.daemon"] == heir_name
    assert "Orphaned" in [s["name"] for s in history]
    assert len(tagged) == 1, "no second flow run for the job"
    assert taken_over == 1
    restarted = victim.log(200_000).split("===== start 2 =====", 1)[1]
    assert f"not resumed here: taken over by {heir_name}" in restarted or "not run again" in restarted, restarted
    assert "took over" not in restarted and "resuming archive job" not in restarted, restarted
    assert "took over archive job" in heir.log(200_000)

    # Every datablock committed once, all registered; no temporary file left.
    blocks = facility.scicat.datablocks(pid)
    committed = {k: p for k, p in commits(watch).items() if k.endswith(".tar")}
    twice = {k: p for k, p in committed.items() if len(p) > 1}
    assert not twice, f"datablocks committed twice: {twice}"
    assert sorted(committed) == sorted(b["archiveId"] for b in blocks) and len(blocks) == 30
    assert len({p[0] for p in committed.values()}) == 2, "both daemons committed some"
    assert not [p for p in lts.rglob("*") if ".moverd-tmp-" in p.name]
    peak, _ = max_concurrent(watch)
    assert peak <= 2, f"at most 2 LTS writers at once (the dead one's counted to the end), saw {peak}"
    assert sampler.peak <= 2, f"the LTS had {sampler.peak} temporary files at once"
    assert one_claim_wins(prefect_on_postgres) == 1
    print(f"\ntakeover {took:.1f} s after SIGKILL (window {WINDOW:g} s), job finished {finished:.1f} s after it; "
          f"peak writers {peak}")


def one_claim_wins(server: PrefectServer, claimants: int = 8) -> int:
    """Proposals of Pending from the Orphaned state, all at once (as daemons claim): how many
    Prefect accepted. Run once no daemon serves the pool, so that none of them takes it."""
    with httpx.Client(base_url=server.api, timeout=30) as prefect:
        deployment = prefect.get("/deployments/name/moverd-archive-job/archival").json()
        fr = prefect.post(f"/deployments/{deployment['id']}/create_flow_run",
                          json={"parameters": {"job_id": "race"}, "name": "race"}).json()
        orphaned = {"state": {"type": "CRASHED", "name": "Orphaned"}, "force": True}
        assert prefect.post(f"/flow_runs/{fr['id']}/set_state", json=orphaned).json()["status"] == "ACCEPT"

    def claim(_: int) -> str:
        with httpx.Client(base_url=server.api, timeout=30) as client:
            r = client.post(f"/flow_runs/{fr['id']}/set_state", json={"state": {"type": "PENDING"}, "force": False})
            return str(r.json()["status"])

    with ThreadPoolExecutor(claimants) as pool:
        answers = list(pool.map(claim, range(claimants)))
    assert len(answers) == claimants
    return answers.count("ACCEPT")
