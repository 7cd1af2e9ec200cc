"""``kill -9`` of ``moverd serve`` on the embedded default does not leave its local Prefect server
behind (each orphan held ~220 MiB and the database), and the next daemon stops one that a daemon
before it left, but never a process that merely got the recorded pid."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from moverd_daemon.prefect_server import process_start, write_pid_file
from tests.support.daemon import Daemon, wait_for


def gone(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


def sleeper(*marks: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)", *marks],
                            stdin=subprocess.DEVNULL, start_new_session=True)


@pytest.fixture
def embedded(tmp_path: Path, prefect_db_template: Path) -> Iterator[Daemon]:
    d = Daemon.create(tmp_path, {"state_dir": str(tmp_path / "state"), "scheduler": {"enabled": False}},
                      template=prefect_db_template, name="embedded")
    yield d
    d.stop()


def local_server(d: Daemon) -> psutil.Process:
    assert d.proc is not None
    servers = [p for p in psutil.Process(d.proc.pid).children()
               if "prefect.server.api.server:create_app" in p.cmdline()]
    assert len(servers) == 1, servers
    return servers[0]


def test_kill_9_takes_the_local_prefect_server_along(embedded: Daemon) -> None:
    pid_file = embedded.state_dir / "prefect" / "server.pid"
    # A pid file naming a live process that is not a Prefect server (the pid was reused): untouched.
    unrelated = sleeper("unrelated")
    try:
        wait_for(lambda: process_start(unrelated.pid), 10, 0.05, "the unrelated process")
        start = process_start(unrelated.pid)
        assert start is not None
        pid_file.write_text(json.dumps({"pid": unrelated.pid, "start": start - 1000, "cmdline": [
            sys.executable, "-m", "uvicorn", "--factory", "prefect.server.api.server:create_app"]}))
        embedded.start().wait_ready()
        assert unrelated.poll() is None, "the daemon killed a process that only had the recorded pid"
    finally:
        unrelated.kill()
        unrelated.wait()
    child = local_server(embedded)
    assert embedded.proc is not None
    embedded.proc.send_signal(signal.SIGKILL)
    embedded.proc.wait()
    t0 = time.monotonic()
    wait_for(lambda: gone(child.pid), 10, 0.02, "the local Prefect server to end with its daemon")
    print(f"the local Prefect server ended {time.monotonic() - t0:.2f} s after its daemon was killed")
    record = json.loads(pid_file.read_text())  # what the next daemon would check
    assert record["pid"] == child.pid and "prefect.server.api.server:create_app" in record["cmdline"]


def test_next_start_stops_a_server_a_previous_daemon_left(embedded: Daemon) -> None:
    pid_file = embedded.state_dir / "prefect" / "server.pid"
    stale = sleeper("a-stale-local-prefect-server")
    try:
        wait_for(lambda: process_start(stale.pid), 10, 0.05, "the stale process")
        time.sleep(0.2)  # past its exec: the command line is the one it runs
        write_pid_file(pid_file, stale.pid, psutil.Process(stale.pid).cmdline())
        embedded.start().wait_ready()
        assert stale.wait(5) == -signal.SIGTERM
        assert "a previous daemon left running" in embedded.log(200_000)
        record = json.loads(pid_file.read_text())
        assert record["pid"] != stale.pid  # the new server's
    finally:
        if stale.poll() is None:
            stale.kill()
            stale.wait()
        assert embedded.stop() == 0, embedded.log()
    assert not pid_file.exists()  # a clean stop leaves no record behind
