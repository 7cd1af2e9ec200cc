"""``moverd serve`` as a real subprocess, and an identity provider's JWKS, for the daemon tests.

Fixtures (this module is a pytest plugin listed in ``tests/conftest.py``):

``prefect_db_template`` (session)
    A migrated SQLite database of the local Prefect server the embedded daemon starts. Creating
    one costs ~15 s (migrations); each daemon under test gets a copy in ``<state_dir>/prefect``
    and starts in a few seconds instead.
``jwks`` (function)
    A :class:`JWKSServer`: Keycloak's certs endpoint on 127.0.0.1 with RSA keys generated here,
    and :meth:`JWKSServer.mint` to sign tokens with them (or with a key it does not publish).

Helpers: :class:`Daemon` (start with a configuration dict, wait until ready, stop with a signal),
:func:`write_toml`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.support.jsonhttp import JsonServer
from tests.support.s3 import free_port

REPO = Path(__file__).resolve().parents[2]
REALM = "facility"
AUDIENCE = "moverd-api"
BASIC = ("scicat-trigger", "s3cr3t-trigger-password")


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, Path):
        v = str(v)
    if isinstance(v, str):
        return json.dumps(v)
    raise TypeError(f"cannot write {v!r} as TOML")


def toml_lines(d: dict[str, Any], prefix: str = "") -> list[str]:
    lines, tables = [], []
    for k, v in d.items():
        if isinstance(v, dict):
            tables.append((f"{prefix}{k}", v))
        elif v is not None:
            lines.append(f"{k} = {toml_value(v)}")
    for name, sub in tables:
        lines += ["", f"[{name}]", *toml_lines(sub, f"{name}.")]
    return lines


def write_toml(path: Path, data: dict[str, Any]) -> Path:
    path.write_text("\n".join(toml_lines(data)) + "\n")
    return path


def daemon_env(**extra: str) -> dict[str, str]:
    """The environment of a daemon under test: no MOVERD_*/PREFECT_API_URL leaking in from the
    test process, no telemetry, and the repository importable (for config-loaded test plugins)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MOVERD_", "PREFECT_")) and k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")}
    env.update({
        "DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p),
        "PREFECT_LOGGING_LEVEL": "WARNING",
    })
    env.update(extra)
    return env


@dataclass
class Daemon:
    """One ``moverd serve`` process."""

    config: Path
    state_dir: Path
    port: int
    root_path: str = "/archiver/api/v1"
    env: dict[str, str] = field(default_factory=daemon_env)
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    starts: int = 0

    @classmethod
    def create(cls, tmp: Path, settings: dict[str, Any], *, template: Path | None = None,
               env: dict[str, str] | None = None, name: str = "daemon") -> Daemon:
        """Write the configuration (``server.port`` chosen here unless given) and return the daemon,
        not started. ``template``: a migrated Prefect database for the local Prefect server."""
        settings = json.loads(json.dumps(settings, default=str))
        server = settings.setdefault("server", {})
        server.setdefault("port", free_port())
        server.setdefault("prefect_port", 0)
        state_dir = Path(settings.setdefault("state_dir", str(tmp / f"{name}-state")))
        if template is not None:
            (state_dir / "prefect").mkdir(parents=True, exist_ok=True)
            for f in template.parent.glob(template.name + "*"):
                shutil.copy2(f, state_dir / "prefect" / f.name)
        config = write_toml(tmp / f"{name}.toml", settings)
        env = dict(env or daemon_env())
        # Prefect's own home (profiles) of the test, not the user's: no PREFECT_API_URL sneaks in.
        env.setdefault("PREFECT_HOME", str(tmp / f"{name}-prefect-home"))
        return cls(config=config, state_dir=state_dir, port=int(server["port"]),
                   root_path=server.get("root_path", "/archiver/api/v1"), env=env, log_path=tmp / f"{name}.log")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.root_path}"

    def client(self, auth: Any = None, timeout: float = 30) -> httpx.Client:
        return httpx.Client(base_url=self.url, auth=auth, timeout=timeout)

    def start(self, *, own_group: bool = False) -> Daemon:
        """Start ``moverd serve``; ``own_group``: in a process group of its own, which
        :meth:`kill_group` kills as a whole, as a lost host would."""
        assert self.log_path is not None
        self.starts += 1
        log = self.log_path.open("ab")
        log.write(f"\n===== start {self.starts} =====\n".encode())
        log.flush()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moverd", "serve", "--config", str(self.config)],
            env=self.env, cwd=str(REPO), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            process_group=0 if own_group else None,
        )
        log.close()
        return self

    def log(self, tail: int = 6000) -> str:
        return self.log_path.read_text(errors="replace")[-tail:] if self.log_path and self.log_path.exists() else ""

    def wait_ready(self, timeout: float = 150) -> Daemon:
        """Until ``/health/readyz`` answers 200 (or the process dies: then fail with its log)."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moverd serve exited with {self.proc.returncode}:\n{self.log()}")
            try:
                r = httpx.get(f"{self.url}/health/readyz", timeout=10)
                if r.status_code == 200:
                    return self
                last = r.text
            except httpx.HTTPError as exc:
                last = str(exc)
            time.sleep(0.2)
        raise RuntimeError(f"moverd serve not ready after {timeout:.0f} s ({last}):\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        """Send ``sig`` and wait; returns the exit code (the process is killed after ``timeout``)."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise RuntimeError(f"moverd serve did not stop within {timeout:.0f} s:\n{self.log()}") from None

    def kill_group(self) -> None:
        """SIGKILL to the daemon's process group (started with ``own_group``), and reap it."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)

    def prefect_api(self) -> str:
        """The Prefect API the daemon printed at start (its local server, or the shared one)."""
        for line in reversed(self.log(200_000).splitlines()):
            if "Prefect UI:" in line and "http" in line:
                return line.split("Prefect UI:", 1)[1].strip().rstrip("/") + "/api"
        raise AssertionError(f"the daemon did not print its Prefect UI:\n{self.log()}")

    def metrics(self, auth: Any = None) -> dict[str, float]:
        """``/metrics`` as ``{'name{labels}': value}``."""
        r = httpx.get(f"{self.url}/metrics", auth=auth, timeout=30)
        r.raise_for_status()
        out: dict[str, float] = {}
        for line in r.text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                out[key] = float(value)
        return out


def wait_for(predicate: Any, timeout: float = 120, interval: float = 0.25, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


# -- the identity provider's keys ----------------------------------------------------------------


@dataclass
class Key:
    kid: str
    private: rsa.RSAPrivateKey

    def jwk(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.private.public_key()))
        return {**data, "kid": self.kid, "use": "sig", "alg": "RS256"}


def new_key(kid: str | None = None) -> Key:
    return Key(kid or uuid.uuid4().hex[:12], rsa.generate_private_key(public_exponent=65537, key_size=2048))


class JWKSServer:
    """Keycloak's ``/realms/<realm>/protocol/openid-connect/certs`` on 127.0.0.1, keys rotatable."""

    def __init__(self, realm: str = REALM) -> None:
        self.realm = realm
        self.keys: list[Key] = [new_key()]
        self.requests = 0
        self.server = JsonServer(self._answer)

    def _answer(self, method: str, path: str, body: bytes) -> tuple[int, Any] | None:
        if method != "GET" or path != f"/realms/{self.realm}/protocol/openid-connect/certs":
            return None
        self.requests += 1
        return 200, {"keys": [k.jwk() for k in self.keys]}

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def issuer(self) -> str:
        return f"{self.url}/realms/{self.realm}"

    def auth_settings(self, **extra: Any) -> dict[str, Any]:
        """The ``[server.auth]`` keys for this IdP (as the seed's IDP_URL/IDP_REALM/IDP_AUDIENCE)."""
        return {"idp_url": self.url, "idp_realm": self.realm, "idp_audience": AUDIENCE, **extra}

    def rotate(self) -> Key:
        """Publish a new key (the old one stays published, as Keycloak does during a rotation)."""
        key = new_key()
        self.keys.insert(0, key)
        return key

    def mint(self, *, key: Key | None = None, kid: str | None = None, expires_in: float = 300,
             **claims: Any) -> str:
        """A token as Keycloak issues it, signed by ``key`` (default: the current published key)."""
        key = key or self.keys[0]
        now = int(time.time())
        body: dict[str, Any] = {
            "iss": self.issuer, "aud": AUDIENCE, "sub": "f:scicat", "azp": "scicat-backend",
            "preferred_username": "scicat-backend", "iat": now, "exp": now + int(expires_in),
            "realm_access": {"roles": ["archiver"]}, "groups": ["/facility-ops"],
        }
        body.update(claims)
        body = {k: v for k, v in body.items() if v is not None}
        return jwt.encode(body, key.private, algorithm="RS256", headers={"kid": kid or key.kid})

    def close(self) -> None:
        self.server.close()


@pytest.fixture
def jwks() -> Iterator[JWKSServer]:
    server = JWKSServer()
    yield server
    server.close()


@pytest.fixture(scope="session")
def prefect_db_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Prefect database that already went through migrations, copied into each daemon's state."""
    import anyio

    from moverd_daemon.prefect_server import LocalPrefectServer

    home = tmp_path_factory.mktemp("prefect-template")
    server = LocalPrefectServer(home, "127.0.0.1", 0, timeout=300)
    old = {k: os.environ.get(k) for k in ("DO_NOT_TRACK", "PREFECT_SERVER_ANALYTICS_ENABLED")}
    os.environ.update({"DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})
    try:
        server.start(export=False)
        anyio.run(server.wait_ready)
    finally:
        server.stop()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    db = home / "prefect.db"
    assert db.exists(), server.log_path.read_text(errors="replace")[-3000:]
    return db


# -- what the Prefect API shows of a job ------------------------------------------------------------


def dataset_task_runs(
    prefect_api: str, job_id: str, datasets: int, blocks: int, timeout: float = 60
) -> dict[str, list[dict[str, Any]]]:
    """``{dataset flow run name: [its task runs, as the Prefect API returns them]}`` for job
    ``job_id``, once its ``datasets`` subflow runs have ``blocks`` task runs in all, every one
    final (the server records task runs from events, a moment after the flow run ended)."""
    with httpx.Client(base_url=prefect_api, timeout=30) as prefect:
        def read() -> dict[str, list[dict[str, Any]]] | None:
            subflows = prefect.post("/flow_runs/filter", json={
                "flow_runs": {"name": {"like_": f"(job {job_id})"}}}).json()
            if len(subflows) < datasets:
                return None
            out: dict[str, list[dict[str, Any]]] = {}
            for fr in subflows:
                runs = prefect.post("/task_runs/filter", json={
                    "task_runs": {"flow_run_id": {"any_": [fr["id"]]}}, "sort": "EXPECTED_START_TIME_ASC"}).json()
                if not runs or any(r["state_type"] not in ("COMPLETED", "FAILED", "CRASHED") for r in runs):
                    return None
                out[fr["name"]] = runs
            return out if sum(len(r) for r in out.values()) >= blocks else None

        result: dict[str, list[dict[str, Any]]] = wait_for(read, timeout, 0.5, f"the task runs of job {job_id}")
        return result
