"""A global LTS slot held by a process that died is freed within a bound, never above the limit.

A real ``prefect server`` on PostgreSQL; a real process takes the only ``lts-write`` slot through
moverd's Prefect layer and is killed with SIGKILL while it holds it. Another process must get the
slot within the lease (``prefect.slot_lease``) plus the server's sweep of expired leases, and while
the dead holder's lease runs, nobody gets in: the limit holds.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx

from tests.support.daemon import REPO, Daemon, daemon_env, wait_for
from tests.support.facility import Facility, dataset_files
from tests.support.prefectpg import PrefectServer

LEASE = 60.0  # the shortest lease Prefect grants

HOLDER = textwrap.dedent("""
    import sys, time, anyio
    from moverd_flows.limits import global_slots
    from moverd_flows.settings import FlowSettings

    async def main():
        settings = FlowSettings(state_dir=sys.argv[1], prefect={"global_limits": True, "slot_lease": sys.argv[2]})
        slot = global_slots(settings)
        t0 = time.monotonic()
        async with slot("lts-write"):
            print(f"held {time.monotonic() - t0:.3f}", flush=True)
            if sys.argv[3] == "hold":
                await anyio.sleep(3600)

    anyio.run(main)
""")


def holder(server: PrefectServer, tmp_path: Path, mode: str) -> subprocess.Popen[str]:
    env = daemon_env(PREFECT_API_URL=server.api, PREFECT_HOME=str(tmp_path / "prefect-client"))
    return subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / "state"), f"{LEASE}s", mode], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def active_slots(server: PrefectServer) -> int:
    r = httpx.get(f"{server.api}/v2/concurrency_limits/lts-write", timeout=30)
    r.raise_for_status()
    return int(r.json()["active_slots"])


def test_a_slot_of_a_killed_holder_comes_back_within_the_bound(
    prefect_on_postgres: PrefectServer, tmp_path: Path
) -> None:
    server = prefect_on_postgres
    r = httpx.post(f"{server.api}/v2/concurrency_limits/", json={"name": "lts-write", "limit": 1}, timeout=30)
    assert r.status_code in (200, 201), r.text
    first = holder(server, tmp_path, "hold")
    assert first.stdout is not None
    line = first.stdout.readline()
    assert line.startswith("held"), first.stderr.read() if first.stderr else ""
    assert active_slots(server) == 1
    env = daemon_env(PREFECT_API_URL=server.api, PREFECT_HOME=str(tmp_path / "prefect-client"),
                     MOVERD_STATE_DIR=str(tmp_path / "state"))
    shown = subprocess.run([sys.executable, "-m", "moverd", "prefect", "limits", "--json"], env=env,
                           capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout) == [
        {"name": "lts-write", "limit": 1, "active_slots": 1, "active": True, "slot_lease": 60.0}]
    first.kill()
    first.wait(30)
    killed = time.monotonic()
    second = holder(server, tmp_path, "once")
    # While the dead holder's lease runs the slot stays taken: the second waits.
    time.sleep(10)
    assert second.poll() is None and active_slots(server) == 1
    out, err = second.communicate(timeout=120)
    freed_after = time.monotonic() - killed
    assert second.returncode == 0 and out.startswith("held"), err
    print(f"slot of the killed holder freed after {freed_after:.1f} s (lease {LEASE:g} s)")
    # The lease, the server's sweep of expired leases (every second on this test server) and a
    # slot retry (at most a second here).
    assert LEASE - 5 < freed_after < LEASE + 1 + 10
    wait_for(lambda: active_slots(server) == 0, 30, 0.2, "the second holder's slot released")


def test_sigterm_while_waiting_for_a_slot_exits_within_the_grace(
    facility: Facility, prefect_on_postgres: PrefectServer, tmp_path: Path
) -> None:
    """The only ``lts-write`` slot is held elsewhere; a scale-out daemon's archive job waits for
    it; SIGTERM with a short grace ends the daemon within the grace, and it leaves no slot taken."""
    server = prefect_on_postgres
    settings = facility.settings_dict()
    settings["prefect"] = {"global_limits": True, "archival_work_pool": "t-archival",
                           "retrieval_work_pool": "t-retrieval"}
    settings["server"] = {"poll_interval": 0.5, "shutdown_grace": 2}
    env = daemon_env(PREFECT_API_URL=server.api)
    daemon = Daemon.create(tmp_path, settings, env=env, name="waiting")
    setup = subprocess.run([sys.executable, "-m", "moverd", "prefect", "setup", "--config", str(daemon.config),
                            "--limit", "lts-write=1", "--json"], env={**env, "PREFECT_HOME": str(tmp_path / "ph")},
                           cwd=REPO, capture_output=True, text=True, timeout=180)
    assert setup.returncode == 0, setup.stderr[-3000:]
    other = holder(server, tmp_path, "hold")
    try:
        assert other.stdout is not None and other.stdout.readline().startswith("held")
        daemon.start().wait_ready(180)
        job = facility.scicat.add_job("archive", [facility.add_dataset(dataset_files(31, n=3))])
        r = httpx.post(f"{daemon.url}/jobs", json={"id": job, "type": "archive"}, timeout=60)
        assert r.status_code == 201, r.text
        wait_for(lambda: facility.scicat.job(job)["statusCode"] == "inProgress", 120, 0.2, "the job to start")
        time.sleep(2)  # it is waiting for the slot now
        assert active_slots(server) == 1
        t0 = time.monotonic()
        rc = daemon.stop(signal.SIGTERM, timeout=60)
        stopped_in = time.monotonic() - t0
        print(f"SIGTERM while waiting for a slot: exit {rc} after {stopped_in:.1f} s (grace 2 s)")
        assert rc == 0, daemon.log()
        assert stopped_in < 2 + 15, daemon.log()
        assert active_slots(server) == 1  # the other holder's, nothing the daemon took
    finally:
        other.kill()
        daemon.stop(signal.SIGKILL)
