"""Scale-out: two ``moverd serve`` daemons share one Prefect server on PostgreSQL.

``moverd prefect setup`` creates the work pools, deployments and the global limit ``lts-write=2``;
eight archive jobs are posted to one daemon; both daemons take work from the pools; every job
finishes ``finishedSuccessful``; and the LTS writers open at once, across both processes, never
exceed 2 although each process alone would allow 4 (observed for real: a config-loaded storage
plugin logs every writer's open and end, and the test samples the LTS for temporary files).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from moverd.planner import dataset_folder
from tests.support.daemon import REPO, Daemon, daemon_env, wait_for
from tests.support.facility import Facility
from tests.support.ltswatch import max_concurrent
from tests.support.s3 import free_port, stop_process

PG = ("127.0.0.1", 5432, "postgres")


def psql(sql: str, db: str = "postgres") -> subprocess.CompletedProcess[str]:
    exe = shutil.which("psql")
    if exe is None:
        raise FileNotFoundError("psql")
    return subprocess.run([exe, "-h", PG[0], "-p", str(PG[1]), "-U", PG[2], "-d", db, "-v", "ON_ERROR_STOP=1",
                           "-c", sql], capture_output=True, text=True, timeout=60)


@dataclass
class PrefectServer:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def api(self) -> str:
        return f"{self.url}/api"


@pytest.fixture
def prefect_on_postgres(tmp_path: Path) -> Iterator[PrefectServer]:
    """``prefect server start`` on a database of its own (created here, dropped at the end)."""
    try:
        probe = psql("SELECT 1")
    except (FileNotFoundError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"PostgreSQL is not reachable on {PG[0]}:{PG[1]} ({exc})")
    if probe.returncode != 0:
        pytest.skip(f"PostgreSQL is not reachable on {PG[0]}:{PG[1]} as {PG[2]}: {probe.stderr.strip()}")
    db = f"moverd_scaleout_{uuid.uuid4().hex[:10]}"
    created = psql(f"CREATE DATABASE {db}")
    assert created.returncode == 0, created.stderr
    port = free_port()
    log = tmp_path / "prefect-server.log"
    env = daemon_env(
        PREFECT_HOME=str(tmp_path / "prefect-server-home"),
        PREFECT_SERVER_DATABASE_CONNECTION_URL=f"postgresql+asyncpg://{PG[2]}@{PG[0]}:{PG[1]}/{db}",
        PREFECT_UI_ENABLED="false",
        PREFECT_LOGGING_LEVEL="WARNING",
        # Waiting for a global concurrency slot: retry after at most 1 s (30 s by default), to keep
        # the test short; the bound itself does not depend on it.
        PREFECT_SERVER_CONCURRENCY_MAXIMUM_CONCURRENCY_SLOT_WAIT_SECONDS="1",
        # Expired slot leases are taken back every second (15 s by default): the bound a test of
        # a dead holder waits for is then the lease itself.
        PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS="1",
    )
    prefect = Path(sys.executable).with_name("prefect")
    with log.open("wb") as out:
        proc = subprocess.Popen([str(prefect), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    server = PrefectServer(f"http://127.0.0.1:{port}", proc, log)
    try:
        def healthy() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"prefect server exited:\n{log.read_text(errors='replace')[-3000:]}")
            try:
                return httpx.get(f"{server.api}/health", timeout=5).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(healthy, 180, 0.2, "prefect server on PostgreSQL")
        yield server
    finally:
        stop_process(proc, 30)
        psql(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")


class TempSampler:
    """Counts ``.moverd-tmp-`` files on the LTS every few milliseconds (the second witness)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            n = 0
            for _dirpath, _dirs, files in os.walk(self.root):
                n += sum(1 for f in files if ".moverd-tmp-" in f)
            self.peak = max(self.peak, n)
            self.samples += 1
            time.sleep(0.003)

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(5)


def test_two_daemons_share_the_work_and_the_lts_limit(
    facility: Facility, prefect_on_postgres: PrefectServer, tmp_path: Path
) -> None:
    import random

    lts = tmp_path / "lts"
    watch = tmp_path / "lts-writers.log"
    settings = facility.settings_dict()
    settings["pipeline"] = {"target_size": "1MiB", "chunk_size": "256KiB", "buffer_budget": "16MiB",
                            "datablock_concurrency": 2}
    settings["storages"]["lts"] = {"type": "watched-posix", "root": str(lts), "create": True,
                                   "write_limit": 4, "watch_log": str(watch)}
    settings["prefect"] = {"global_limits": True, "archival_work_pool": "test-archival",
                           "retrieval_work_pool": "test-retrieval"}
    settings["server"] = {"max_jobs": 3, "poll_interval": 0.5, "plugins": ["tests.support.ltswatch"],
                          "shutdown_grace": 30}
    env = daemon_env(PREFECT_API_URL=prefect_on_postgres.api)

    # moverd prefect setup (the seed's prefect-config step), with the LTS write limit at 2
    cfg = Daemon.create(tmp_path, settings, env=env, name="setup").config
    setup = subprocess.run([sys.executable, "-m", "moverd", "prefect", "setup", "--config", str(cfg),
                            "--limit", "lts-write=2", "--json"], env={**env, "PREFECT_HOME": str(tmp_path / "ph")},
                           cwd=REPO, capture_output=True, text=True, timeout=180)
    assert setup.returncode == 0, setup.stderr[-3000:]
    report = json.loads(setup.stdout)
    assert report["limits"]["lts-write"] == 2 and report["limits"]["lts-read"] == 4
    assert sorted(report["work_pools_created"]) == ["test-archival", "test-retrieval"]
    assert sorted(report["deployments"]) == ["moverd-archive-job/archival", "moverd-retrieve-job/retrieval"]

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

        # A daemon stopped in the middle of a job (SIGTERM twice: no grace) resumes it at its next
        # start, as a new deployment run that either daemon may take.
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
            assert prefect.get(f"/flow_runs/{first_run}").json()["state"]["type"] == "CRASHED"
            victim.start().wait_ready(180)
            wait_for(lambda: facility.scicat.job(big_job)["statusCode"] == "finishedSuccessful", 180, 0.5,
                     "the resumed big job")
        assert "resuming archive job" in victim.log()
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
