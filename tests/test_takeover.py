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
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
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


@dataclass
class Pool:
    """Two daemons of one pool on the Prefect server, each in a process group of its own, and an
    archive job of 30 datablocks running on one of them (the victim) mid-write."""

    facility: Facility
    server: PrefectServer
    tmp: Path
    daemons: list[Daemon] = field(default_factory=list)
    names: dict[str, Daemon] = field(default_factory=dict)
    job: str = ""
    pid: str = ""
    run_id: str = ""

    @property
    def lts(self) -> Path:
        return self.tmp / "lts"

    @property
    def watch(self) -> Path:
        return self.tmp / "lts-writers.log"

    def setup(self) -> None:
        """``moverd prefect setup`` twice: the automation with the default window, then moved to
        this test's one."""
        settings = pool_settings(self.facility, self.tmp, datablock_concurrency=1, max_jobs=2,
                                 takeover_after=f"{WINDOW:g}s")
        env = daemon_env(PREFECT_API_URL=self.server.api)
        first = Daemon.create(self.tmp, {**settings, "server": {**settings["server"], "takeover_after": "90s"}},
                              env=env, name="setup-default").config
        assert prefect_setup(first, env, self.tmp / "ph", "lts-write=2")["takeover_after"] == 90
        cfg = Daemon.create(self.tmp, settings, env=env, name="setup").config
        assert prefect_setup(cfg, env, self.tmp / "ph", "lts-write=2")["takeover_after"] == WINDOW
        automations = httpx.post(f"{self.server.api}/automations/filter", json={}, timeout=30).json()
        assert [(a["name"], a["trigger"]["within"], a["trigger"]["posture"]) for a in automations] == [
            ("moverd-takeover", WINDOW, "Proactive")]
        self.daemons = [Daemon.create(self.tmp, {**settings, "state_dir": str(self.tmp / f"state{i}")},
                                      env=dict(env), name=f"daemon{i}") for i in (1, 2)]
        self.names = {f"{os.uname().nodename}:{d.port}": d for d in self.daemons}

    def flow_run(self) -> dict[str, Any]:
        fr: dict[str, Any] = httpx.get(f"{self.server.api}/flow_runs/{self.run_id}", timeout=30).json()
        return fr

    def archive_mid_write(self) -> tuple[Daemon, Daemon, str]:
        """Start the daemons, post the job, and wait until three datablocks are committed and the
        fourth is being written; (victim, heir, heir's name)."""
        import random

        for d in self.daemons:
            d.start(own_group=True)
        for d in self.daemons:
            d.wait_ready(180)
        rnd = random.Random(15)
        self.pid = self.facility.add_dataset({f"big/f{k:02d}.bin": rnd.randbytes(1_000_000) for k in range(30)})
        self.job = self.facility.scicat.add_job("archive", [self.pid])
        r = httpx.post(f"{self.daemons[0].url}/jobs", json={"id": self.job, "type": "archive"}, timeout=60)
        assert r.status_code == 201, r.text
        self.run_id = r.json()["uuid"]
        first = wait_for(lambda: (x := self.flow_run())["state"]["type"] == "RUNNING" and x, 60, 0.05,
                         "the job running")
        victim = self.names[first["labels"]["moverd.daemon"]]
        heir_name, heir = next((n, d) for n, d in self.names.items() if d is not victim)
        folder = dataset_folder(self.pid)

        def mid_write() -> bool:
            lines = self.watch.read_text().splitlines() if self.watch.exists() else []
            done = sum(1 for line in lines if " commit " in line and folder in line)
            opened = [line for line in lines if " open " in line and line.endswith(".tar")]
            ended = [line for line in lines if " end " in line and line.endswith(".tar")]
            return done >= 3 and len(opened) > len(ended)

        wait_for(mid_write, 60, 0.01, "three datablocks committed and a fourth being written")
        return victim, heir, heir_name

    def taken_over(self, heir_name: str) -> dict[str, Any]:
        found: dict[str, Any] = wait_for(
            lambda: (x := self.flow_run())["labels"].get("moverd.daemon") == heir_name
            and x["state"]["type"] in ("PENDING", "RUNNING") and x, BOUND + 20, 0.1, "the takeover")
        return found

    def finished(self) -> None:
        wait_for(lambda: self.facility.scicat.job(self.job)["statusCode"] == "finishedSuccessful", 120, 0.2,
                 "the job finished by the other daemon")

    def stop(self) -> None:
        codes = [d.stop(timeout=60) for d in self.daemons]
        assert codes == [0, 0], "\n".join(d.log() for d in self.daemons)

    def check_ran_once(self, heir_name: str | None) -> None:
        """The same flow run, Orphaned on the way, completed by the heir (None: by either); every datablock
        committed once and registered; no temporary file left; at most 2 writers at once."""
        with httpx.Client(base_url=self.server.api, timeout=30) as prefect:
            fr = prefect.get(f"/flow_runs/{self.run_id}").json()
            history = prefect.get("/flow_run_states/", params={"flow_run_id": self.run_id}).json()
            tagged = prefect.post("/flow_runs/filter",
                                  json={"flow_runs": {"tags": {"all_": [f"moverd-job:{self.job}"]}}}).json()
        assert fr["state"]["type"] == "COMPLETED" and fr["labels"]["moverd.daemon"] in (
            [heir_name] if heir_name else self.names)
        assert "Orphaned" in [s["name"] for s in history]
        assert len(tagged) == 1, "no second flow run for the job"
        blocks = self.facility.scicat.datablocks(self.pid)
        committed = {k: p for k, p in commits(self.watch).items() if k.endswith(".tar")}
        twice = {k: p for k, p in committed.items() if len(p) > 1}
        assert not twice, f"datablocks committed twice: {twice}"
        assert sorted(committed) == sorted(b["archiveId"] for b in blocks) and len(blocks) == 30
        assert len({p[0] for p in committed.values()}) == 2, "both daemons committed some"
        assert not [p for p in self.lts.rglob("*") if ".moverd-tmp-" in p.name]
        peak, _ = max_concurrent(self.watch)
        assert peak <= 2, f"at most 2 LTS writers at once (a dead one's counted to the end), saw {peak}"


def test_a_job_of_a_killed_daemon_is_taken_over_and_not_run_again(
    facility: Facility, prefect_on_postgres: PrefectServer, tmp_path: Path
) -> None:
    pool = Pool(facility, prefect_on_postgres, tmp_path)
    pool.setup()
    sampler = TempSampler(pool.lts)
    try:
        victim, heir, heir_name = pool.archive_mid_write()
        victim.kill_group()
        killed = time.time()
        taken = pool.taken_over(heir_name)
        took = time.time() - killed
        victim.start(own_group=True)  # comes back with its journal while the job runs elsewhere
        pool.finished()
        finished = time.time() - killed
        victim.wait_ready(180)
        wait_for(lambda: "not resumed here" in (x := victim.log()) or "not run again" in x, 60, 0.2,
                 "the restarted daemon looking at its journal")
        time.sleep(3 * 0.5 + 1)  # a few polls of the pools: it must not claim anything of the job
        taken_over = heir.metrics()["moverd_jobs_taken_over_total"]
    finally:
        sampler.stop()
        pool.stop()

    assert took <= BOUND, f"taken over {took:.1f} s after the kill (bound {BOUND:g} s)"
    assert taken["id"] == pool.run_id and taken_over == 1
    pool.check_ran_once(heir_name)
    restarted = victim.log(200_000).split("===== start 2 =====", 1)[1]
    assert f"not resumed here: taken over by {heir_name}" in restarted or "not run again" in restarted, restarted
    assert "took over" not in restarted and "resuming archive job" not in restarted, restarted
    assert "took over archive job" in heir.log(200_000)
    assert sampler.peak <= 2, f"the LTS had {sampler.peak} temporary files at once"
    assert one_claim_wins(prefect_on_postgres) == 1
    print(f"\ntakeover {took:.1f} s after SIGKILL (window {WINDOW:g} s), job finished {finished:.1f} s after it")


def test_a_frozen_daemon_stops_the_job_it_lost_when_it_thaws(
    facility: Facility, prefect_on_postgres: PrefectServer, tmp_path: Path
) -> None:
    """A host frozen (SIGSTOP) past the window and thawed: its job went to the other daemon
    meanwhile, and the thawed daemon stops its own copy of it at once, touching nothing of the
    flow run, instead of writing on beside the heir."""
    pool = Pool(facility, prefect_on_postgres, tmp_path)
    pool.setup()
    try:
        victim, heir, heir_name = pool.archive_mid_write()
        assert victim.proc is not None
        os.killpg(victim.proc.pid, signal.SIGSTOP)
        frozen = time.time()
        pool.taken_over(heir_name)
        took = time.time() - frozen
        os.killpg(victim.proc.pid, signal.SIGCONT)
        wait_for(lambda: "stopped here: no heartbeat" in victim.log(), 30, 0.1, "the thawed daemon stopping the job")
        pool.finished()
        time.sleep(3 * 0.5 + 1)
    finally:
        pool.stop()
    pool.check_ran_once(heir_name)
    assert "took over" not in victim.log(200_000) and "took over archive job" in heir.log(200_000)
    print(f"\nfrozen daemon's job taken over {took:.1f} s after the freeze")


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


def test_a_killed_daemon_back_within_the_window_leaves_its_job_to_the_claim(
    facility: Facility, prefect_on_postgres: PrefectServer, tmp_path: Path
) -> None:
    """Killed and started again at once, before its run is orphaned: the daemon does not resume
    the run it finds Running under its own name (the other daemon may take it at any moment); it
    leaves it to the claim, which either daemon may win, and the job runs once."""
    pool = Pool(facility, prefect_on_postgres, tmp_path)
    pool.setup()
    try:
        victim, _heir, _ = pool.archive_mid_write()
        victim.kill_group()
        victim.start(own_group=True).wait_ready(180)
        pool.finished()
        time.sleep(3 * 0.5 + 1)
    finally:
        pool.stop()
    pool.check_ran_once(None)
    restarted = victim.log(200_000).split("===== start 2 =====", 1)[1]
    assert "its heartbeats stopped with the previous process" in restarted, restarted
    assert "resuming archive job" not in restarted
    took = [d for d in pool.daemons if "took over archive job" in d.log(200_000)]
    assert len(took) == 1, "one daemon took the job over"
