"""moto's S3 server in a subprocess on a free port of 127.0.0.1, spooling objects to disk."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from tests.support.s3 import free_port, moto_command, stop_process, wait_ready

ACCESS_KEY = "bench"
SECRET_KEY = "bench-secret"
REGION = "us-east-1"
KEY_BUFFER_SIZE = 64 * 1024
"""Objects up to this size stay in the server's RAM, bigger ones spill to its TMPDIR."""


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
                moto_command(self.port), env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        assert self.proc is not None
        wait_ready(self.proc, "127.0.0.1", self.port, self.log_path)
        return self

    def __exit__(self, *exc: object) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        stop_process(proc)
        shutil.rmtree(self.spool, ignore_errors=True)


def session() -> Any:
    """An aioboto3 session with the server's credentials."""
    import aioboto3

    return aioboto3.Session(aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY, region_name=REGION)
