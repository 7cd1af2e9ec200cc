"""How the daemon reaches Prefect, decided before Prefect is imported.

* ``PREFECT_API_URL`` set (environment or the active Prefect profile): **scale-out**. The daemon
  uses that server, serves the deployments, and any daemon serving them picks jobs up.
* otherwise, **embedded**: one machine. By default the daemon starts a local Prefect server with
  its UI (``server.prefect_ui``), its database under ``<state_dir>/prefect``, and points itself at
  it; with ``prefect_ui = false`` it uses Prefect's ephemeral mode (same speed, no UI). Either way
  it starts Prefect at daemon start, so that the first job does not wait for it.

Prefect reads its settings once, at import: that is why the decision and ``PREFECT_API_URL`` for
the local server are settled here, by the main thread, before anything imports ``prefect``.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import anyio
import httpx

from ..errors import SystemError_

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
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class LocalPrefectServer:
    """A Prefect server (API + UI) for one embedded daemon, in a subprocess of its own.

    Background services are off (``webserver only``): one daemon on one machine needs the API,
    the UI and the database, not the scheduler or the lease reaper of a shared installation.
    """

    def __init__(self, home: Path, host: str = "127.0.0.1", port: int = 4200, timeout: float = 180.0) -> None:
        self.home = home
        self.host = host
        self.port = port
        self.timeout = timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = home / "server.log"

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
        if self.port == 0 or not _port_free(self.host, self.port):
            wanted = self.port
            self.port = free_port(self.host)
            if wanted:
                log.warning("port %d is taken; the local Prefect server uses %d", wanted, self.port)
        db = self.home / "prefect.db"
        env = {
            **os.environ,
            "PREFECT_HOME": str(self.home),
            "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{db}",
            "PREFECT_UI_ENABLED": "1",
            "PREFECT_UI_API_URL": "/api",
            "PREFECT_API_URL": self.api_url,
            "PREFECT__SERVER_WEBSERVER_ONLY": "1",
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
                                         stdin=subprocess.DEVNULL, start_new_session=True)
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
                    raise SystemError_(f"the local Prefect server exited with {code}; see {self.log_path}:\n"
                                       + self._tail())
                try:
                    if (await client.get(f"{self.api_url}/health")).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise SystemError_(f"the local Prefect server did not start within {self.timeout:.0f} s; "
                                       f"see {self.log_path}")
                await anyio.sleep(0.2)

    def _tail(self, n: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
