"""How the daemon reaches Prefect, decided before Prefect is imported.

* ``PREFECT_API_URL`` set (environment or the active Prefect profile): **scale-out**. The daemon
  uses that server, serves the deployments, and any daemon serving them picks jobs up.
* otherwise, **embedded**: one machine. By default the daemon starts a local Prefect server with
  its UI (``server.prefect_ui``), its database under ``<state_dir>/prefect``, and points itself at
  it; with ``prefect_ui = false`` it uses Prefect's ephemeral mode (same speed, no UI). Either way
  it starts Prefect at daemon start, so that the first job does not wait for it.

Prefect reads its settings once, at import: that is why the decision and ``PREFECT_API_URL`` for
the local server are settled here, by the main thread, before anything imports ``prefect``.

The local server must not outlive its daemon: a daemon killed with SIGKILL cannot stop it, and
each orphan holds ~220 MiB and the database. So the server is started with the kernel's parent
death signal (Linux ``PR_SET_PDEATHSIG``: SIGTERM when the thread that started it ends, which is
the daemon's main thread), and its pid, start time and command line are kept in
``<state_dir>/prefect/server.pid``: the next daemon stops a server that is still there, and only
when all three match, so a recycled pid of another process is never signalled.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable
from pathlib import Path

import anyio
import httpx

from moverd.errors import ServiceError

log = logging.getLogger(__name__)


def configured_api_url() -> str | None:
    """``PREFECT_API_URL`` from the environment, else from the active Prefect profile."""
    url = os.environ.get("PREFECT_API_URL", "").strip()
    if url:
        return url
    home = Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect").expanduser()
    path = Path(os.environ.get("PREFECT_PROFILES_PATH") or home / "profiles.toml").expanduser()
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return None
    active = os.environ.get("PREFECT_PROFILE") or data.get("active")
    profile = data.get("profiles", {}).get(active, {}) if isinstance(active, str) else {}
    value = profile.get("PREFECT_API_URL") if isinstance(profile, dict) else None
    return str(value).strip() or None if value else None


def _port_free(host: str, port: int) -> bool:
    """Whether the server can listen on ``port``. The probe binds as uvicorn does, with
    SO_REUSEADDR: connections of the previous server that are still in TIME-WAIT (a restart
    within a minute or two) do not keep uvicorn from listening there, so they must not move the
    UI to another port either; a socket that listens does."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


PR_SET_PDEATHSIG = 1
STALE_GRACE = 10.0
"""How long a stale server gets to stop on SIGTERM before it is killed."""


def die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that has the child get SIGTERM when this process's calling thread ends
    (``None`` where the kernel has no such thing). libc is looked up here, before the fork: the
    child then only makes two system calls before it execs."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # the parent died between the fork and the prctl
            os._exit(1)

    return preexec


def process_start(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot, ``/proc/<pid>/stat`` field 22), or ``None``
    when there is no such process. A pid and its start time name one process for ever."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after the command name, which may hold spaces
    return int(fields[19]) if len(fields) > 19 and fields[0] != "Z" else None


def process_cmdline(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [a.decode(errors="surrogateescape") for a in raw.split(b"\0")[:-1]]


def write_pid_file(path: Path, pid: int, cmd: list[str]) -> None:
    """Record the server: its pid, start time and command line (the one it was started with: read
    back right after the fork it would still be the daemon's)."""
    start = process_start(pid)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"pid": pid, "start": start, "cmdline": cmd}))
    tmp.replace(path)


def stop_stale(path: Path) -> bool:
    """Stop the server ``path`` records if it still runs (a daemon before this one died without
    stopping it); returns whether one was stopped. A live process that is not the one recorded
    (another start time or command line: the pid was reused) is left alone."""
    try:
        record = json.loads(path.read_text())
        pid, start, cmd = int(record["pid"]), record["start"], list(record["cmdline"])
    except FileNotFoundError:
        return False
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("ignoring %s: %s", path, exc)
        path.unlink(missing_ok=True)
        return False
    alive = process_start(pid)
    if alive is None:
        path.unlink(missing_ok=True)
        return False
    if start is None or alive != start or process_cmdline(pid) != cmd:
        log.info("%s names pid %d, now another process: left alone", path, pid)
        path.unlink(missing_ok=True)
        return False
    log.warning("stopping the local Prefect server (pid %d) a previous daemon left running", pid)
    for sig, wait in ((signal.SIGTERM, STALE_GRACE), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if process_start(pid) != start:
                path.unlink(missing_ok=True)
                return True
            time.sleep(0.05)
    raise ServiceError(f"the local Prefect server a previous daemon left running (pid {pid}) does not stop")


IDLE_SERVICES_OFF = {
    "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_LATE_RUNS_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_FOREMAN_ENABLED": "false",
}
"""Services of ``prefect server start`` that have nothing to do for one embedded daemon."""


class LocalPrefectServer:
    """A Prefect server (API + UI) for one embedded daemon, in a subprocess of its own.

    It runs the background services ``prefect server start`` runs, because Prefect 3 records
    task runs and events through them: a client reports a task run's states as events, and only
    the task-run recorder writes them into the database, the event persister keeps the event
    feed. A webserver-only server answers "Task not found" for every datablock. Three services
    have nothing to do for one embedded daemon and stay off: the deployment scheduler (no
    deployments), the foreman (no workers) and the late-runs marker (the daemon's own queue
    decides when a queued run starts).
    """

    def __init__(self, home: Path, host: str = "127.0.0.1", port: int = 4200, timeout: float = 180.0) -> None:
        self.home = home
        self.host = host
        self.port = port
        self.timeout = timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = home / "server.log"
        self.pid_path = home / "server.pid"

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return f"http://{host}:{self.port}"

    @property
    def api_url(self) -> str:
        return f"{self.url}/api"

    def start(self, *, export: bool = True) -> str:
        """Start the server and (``export``) point this process's Prefect at it; returns the API URL."""
        self.home.mkdir(parents=True, exist_ok=True)
        stop_stale(self.pid_path)  # before the port is chosen: it may hold the one configured
        if self.port == 0 or not _port_free(self.host, self.port):
            wanted = self.port
            self.port = free_port(self.host)
            if wanted:
                log.warning("port %d is taken; the local Prefect server uses %d", wanted, self.port)
        db = self.home / "prefect.db"
        env = {
            **IDLE_SERVICES_OFF,  # an operator's environment may switch them on again
            **os.environ,
            "PREFECT_HOME": str(self.home),
            "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{db}",
            "PREFECT_UI_ENABLED": "1",
            "PREFECT_UI_API_URL": "/api",
            "PREFECT_API_URL": self.api_url,
            "PREFECT__SERVER_FINAL": "1",
            "DO_NOT_TRACK": os.environ.get("DO_NOT_TRACK", "1"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        }
        cmd = [sys.executable, "-m", "uvicorn", "--factory", "prefect.server.api.server:create_app",
               "--host", self.host, "--port", str(self.port), "--log-level", "warning", "--lifespan", "on"]
        with self.log_path.open("ab") as out:
            # Its own session: a Ctrl-C in the terminal reaches the daemon, which still needs Prefect
            # while it drains, and stops this server last.
            self.proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True,
                                         preexec_fn=die_with_parent())
        write_pid_file(self.pid_path, self.proc.pid, cmd)
        if export:
            os.environ["PREFECT_API_URL"] = self.api_url
        log.info("starting the local Prefect server on %s (database %s)", self.url, db)
        return self.api_url

    async def wait_ready(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + self.timeout
        async with httpx.AsyncClient(timeout=5) as client:
            while True:
                code = self.proc.poll()
                if code is not None:
                    raise ServiceError(f"the local Prefect server exited with {code}; see {self.log_path}:\n"
                                       + self._tail())
                try:
                    if (await client.get(f"{self.api_url}/health")).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise ServiceError(f"the local Prefect server did not start within {self.timeout:.0f} s; "
                                       f"see {self.log_path}")
                await anyio.sleep(0.2)

    def _tail(self, n: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.pid_path.unlink(missing_ok=True)
