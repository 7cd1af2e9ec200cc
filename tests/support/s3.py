"""A real S3 server for tests: moto's server over HTTP, one per test session.

Fixtures (this module is a pytest plugin listed in ``tests/conftest.py``):

``s3_server`` (session)
    moto's S3 server in a subprocess on a free port of 127.0.0.1. Large objects spill to a
    session temp dir (``MOTO_S3_DEFAULT_KEY_BUFFER_SIZE=1``, ``TMPDIR``) instead of RAM. Gives
    ``endpoint_url``, ``region``, the (fake) credentials and ``client()``, a plain boto3 client
    for setting up and checking state from tests.
``s3_options`` (function)
    A fresh, uniquely named bucket and the options of an ``s3`` storage for it (a dict, as it
    would appear under ``[storages.NAME]`` in the configuration minus ``type``).
``s3_fault_proxy`` (function)
    A :class:`tests.support.faultproxy.FaultProxy` in front of the server; point a storage at
    ``proxy.url`` (``{**s3_options, "endpoint_url": proxy.url}``) to inject 503s and resets.

moto reads the whole object for every ranged GET and keeps up to a few MiB per object in RAM:
keep test data to megabytes.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.support.faultproxy import FaultProxy

ACCESS_KEY = "testing"
SECRET_KEY = "testing"
REGION = "us-east-1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class S3Server:
    """A running moto S3 server."""

    host: str
    port: int
    log_path: Path
    region: str = REGION
    access_key_id: str = ACCESS_KEY
    secret_access_key: str = SECRET_KEY
    _clients: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def client(self, endpoint_url: str | None = None) -> Any:
        """A boto3 S3 client (sync) for test setup and assertions; one per endpoint, shared
        (boto3 clients are thread-safe and cost ~0.1 s to make). It never takes a proxy of the
        environment: botocore fixes a client's proxies when it is made, and one first made in a
        test that sets HTTP_PROXY would send every later test's setup through that proxy."""
        import boto3
        from botocore.config import Config

        url = endpoint_url or self.endpoint_url
        if url in self._clients:
            return self._clients[url]
        self._clients[url] = boto3.client(
            "s3", endpoint_url=endpoint_url or self.endpoint_url, region_name=self.region,
            aws_access_key_id=self.access_key_id, aws_secret_access_key=self.secret_access_key,
            config=Config(retries={"max_attempts": 3, "mode": "standard"}, max_pool_connections=32, proxies={}),
        )
        return self._clients[url]

    def create_bucket(self, prefix: str = "t") -> str:
        """Create a uniquely named bucket and return its name."""
        name = f"{prefix}-{uuid.uuid4().hex[:16]}"
        self.client().create_bucket(Bucket=name)
        return name


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 10) -> None:
    """SIGTERM, and SIGKILL if the process is still there after ``timeout`` seconds."""
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def moto_command(port: int) -> list[str]:
    exe = Path(sys.executable).with_name("moto_server")
    if not exe.exists():
        found = shutil.which("moto_server")
        exe = Path(found) if found else exe
    base = [str(exe)] if exe.exists() else [sys.executable, "-m", "moto.server"]
    return [*base, "-H", "127.0.0.1", "-p", str(port)]


def wait_ready(
    proc: subprocess.Popen[bytes], host: str, port: int, log_path: Path, timeout: float = 30
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"moto_server exited with {proc.returncode}:\n{log_path.read_text(errors='replace')[-2000:]}"
            )
        try:
            with socket.create_connection((host, port), timeout=0.5) as s:
                s.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                if s.recv(12).startswith(b"HTTP/1."):
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"moto_server did not answer on {host}:{port} within {timeout:.0f}s")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """moto's S3 server for the whole session; stopped at its end."""
    base = tmp_path_factory.mktemp("moto")
    spool = base / "tmp"
    spool.mkdir()
    log_path = base / "moto_server.log"
    host, port = "127.0.0.1", free_port()
    env = {
        **os.environ,
        "MOTO_S3_DEFAULT_KEY_BUFFER_SIZE": "1",
        "TMPDIR": str(spool),
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_DEFAULT_REGION": REGION,
    }
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            moto_command(port), env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        try:
            wait_ready(proc, host, port, log_path)
            yield S3Server(host=host, port=port, log_path=log_path)
        finally:
            stop_process(proc)


def s3_landing_toml(options: dict[str, Any], **top: str) -> str:
    """A configuration file's text: top-level keys (``state_dir=...``) and a ``landing`` storage
    of type ``s3`` with ``options`` (as :func:`s3_options` gives them)."""
    import tomli_w

    return tomli_w.dumps({**top, "storages": {"landing": {"type": "s3", **options}}})


@pytest.fixture
def s3_options(s3_server: S3Server) -> dict[str, Any]:
    """Options of an ``s3`` storage on a fresh bucket of its own."""
    return {
        "endpoint_url": s3_server.endpoint_url,
        "bucket": s3_server.create_bucket(),
        "access_key_id": ACCESS_KEY,
        "secret_access_key": SECRET_KEY,
        "region": s3_server.region,
    }


@pytest.fixture
def s3_fault_proxy(s3_server: S3Server) -> Iterator[FaultProxy]:
    """A fault-injecting proxy in front of the S3 server, for this test only."""
    with FaultProxy(s3_server.host, s3_server.port) as proxy:
        yield proxy
