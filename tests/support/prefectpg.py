"""A real ``prefect server`` on PostgreSQL for the scale-out tests, the setup step of a shared
installation (``moverd prefect setup``), and a sampler of the LTS's temporary files.

The server gets a database of its own on 127.0.0.1:5432 (trust authentication), created for the
test and dropped at the end; without PostgreSQL the tests that need it are skipped.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.daemon import REPO, daemon_env, wait_for
from tests.support.facility import Facility
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


def pool_settings(facility: Facility, tmp: Path, *, datablock_concurrency: int, **server: Any) -> dict[str, Any]:
    """A scale-out daemon's settings: small datablocks, global limits, the test's work pools, and
    an LTS (``<tmp>/lts``) that logs every writer to ``<tmp>/lts-writers.log``
    (:mod:`tests.support.ltswatch`), allowing 4 writers per process."""
    settings = facility.settings_dict()
    settings["pipeline"] = {"target_size": "1MiB", "chunk_size": "256KiB", "buffer_budget": "16MiB",
                            "datablock_concurrency": datablock_concurrency}
    settings["storages"]["lts"] = {"type": "watched-posix", "root": str(tmp / "lts"), "create": True,
                                   "write_limit": 4, "watch_log": str(tmp / "lts-writers.log")}
    settings["prefect"] = {"global_limits": True, "archival_work_pool": "test-archival",
                           "retrieval_work_pool": "test-retrieval"}
    settings["plugins"] = ["tests.support.ltswatch"]
    settings["server"] = {"poll_interval": 0.5, "shutdown_grace": 30, **server}
    return settings


def prefect_setup(config: Path, env: dict[str, str], home: Path, *limits: str) -> dict[str, Any]:
    """``moverd prefect setup --json`` (the installation's prefect-config step); its report."""
    args = [a for limit in limits for a in ("--limit", limit)]
    setup = subprocess.run([sys.executable, "-m", "moverd", "prefect", "setup", "--config", str(config), *args,
                            "--json"], env={**env, "PREFECT_HOME": str(home)}, cwd=REPO, capture_output=True,
                           text=True, timeout=180)
    assert setup.returncode == 0, setup.stderr[-3000:]
    report: dict[str, Any] = json.loads(setup.stdout)
    return report
