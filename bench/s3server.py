"""moto's S3 server in a subprocess on a free port of 127.0.0.1, spooling objects to disk."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ACCESS_KEY = "bench"
SECRET_KEY = "bench-secret"
REGION = "us-east-1"
KEY_BUFFER_SIZE = 64 * 1024
"""Objects up to this size stay in the server's RAM, bigger ones spill to its TMPDIR."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _command(port: int) -> list[str]:
    exe = Path(sys.executable).with_name("moto_server")
    if not exe.exists():
        found = shutil.which("moto_server")
        if found:
            exe = Path(found)
    base = [str(exe)] if exe.exists() else [sys.executable, "-m", "moto.server"]
    return [*base, "-H", "127.0.0.1", "-p", str(port)]


def credentials_env() -> dict[str, str]:
    return {
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_REGION": REGION,
    }


class MotoServer:
    """``with MotoServer(workdir) as s3: s3.endpoint_url``; the server's RSS is not the client's."""

    def __init__(self, workdir: Path, key_buffer_size: int = KEY_BUFFER_SIZE) -> None:
        self.workdir = workdir
        self.key_buffer_size = key_buffer_size
        self.spool = workdir / "moto-spool"
        self.log_path = workdir / "moto_server.log"
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> MotoServer:
        self.spool.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            **credentials_env(),
            # Objects above this size go to spooled temp files on disk, not RAM (moto holds ~2 GB
            # RSS per GiB otherwise). Not 1 as for the tests: every spooled object keeps a file
            # descriptor open, and 20,000 small objects would pass the descriptor limit.
            "MOTO_S3_DEFAULT_KEY_BUFFER_SIZE": str(self.key_buffer_size),
            "TMPDIR": str(self.spool),
        }
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                _command(self.port), env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        self._wait_ready()
        return self

    def _wait_ready(self, timeout: float = 30) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"moto_server exited with {self.proc.returncode}:\n{tail}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    s.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                    if s.recv(12).startswith(b"HTTP/1."):
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"moto_server did not answer on port {self.port} within {timeout:.0f} s")

    def __exit__(self, *exc: object) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(self.spool, ignore_errors=True)


def session() -> Any:
    """An aioboto3 session with the server's credentials."""
    import aioboto3

    return aioboto3.Session(aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY, region_name=REGION)
