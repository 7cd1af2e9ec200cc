"""``moverd upload`` through a running daemon's upload API against ``s5cmd cp`` of the same local
files to the same S3 server: the bytes go from the client straight to S3 on presigned URLs, so
the ratio is the client's, and the daemon's CPU per uploaded GiB (which should stay near zero)
is measured beside it.

The daemon is ``moverd serve`` on the embedded default (local catalog, its own Prefect server)
with the upload API on and no credentials (loopback). Its local catalog lists each upload set as
a dataset; between two rounds the upload is aborted through the API (objects deleted, the
reservation released), so that every round sends every part.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

from tests.support.s3 import free_port, stop_process

from .data import MTIME, create_bucket, empty, moverd_env
from .procs import run_measured
from .tools import Ctx, Result, s5cmd_exe

PY = sys.executable
LANDING_BUCKET = "moverd-bench-landing"


class UploadSet:
    """Local files of one shape (``count`` files of ``size`` bytes) under ``root/name``."""

    def __init__(self, root: Path, name: str, count: int, size: int) -> None:
        self.name, self.count, self.size = name, count, size
        self.folder = root / name
        self.total = count * size

    def make(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        for i in range(self.count):
            path = self.folder / f"f{i:04d}.bin"
            with open(path, "wb") as f:
                for start in range(0, self.size, 4 * 1024**2):
                    f.write(os.urandom(min(4 * 1024**2, self.size - start)))
            os.utime(path, (MTIME, MTIME))

    def describe(self) -> str:
        each = f"{self.size / 1024**2:g} MiB" if self.size < 1024**3 else f"{self.size / 1024**3:g} GiB"
        return f"{self.count:,} x {each} ({self.total / 1024**3:g} GiB)"


class UploadDaemon:
    """``moverd serve`` with the upload API, its catalog listing the sets as datasets."""

    def __init__(self, ctx: Ctx, sets: list[UploadSet]) -> None:
        self.ctx, self.sets = ctx, sets
        self.state = ctx.workdir / "state-upload"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/archiver/api/v1"
        self.proc: subprocess.Popen[bytes] | None = None
        create_bucket(ctx.endpoint, LANDING_BUCKET)
        self.env = moverd_env(self.state, ctx.endpoint, LANDING_BUCKET, {
            "MOVERD_INGEST__ENABLED": "true", "MOVERD_INGEST__LANDING_SPACE": "64GiB",
            "MOVERD_SERVER__PORT": str(self.port), "MOVERD_SERVER__HOST": "127.0.0.1",
        })

    def __enter__(self) -> UploadDaemon:
        asyncio.run(self._register())
        self.ctx.logdir.mkdir(parents=True, exist_ok=True)
        log = (self.ctx.logdir / "upload-daemon.log").open("wb")
        self.proc = subprocess.Popen([PY, "-m", "moverd", "serve"], env=self.env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moverd serve exited {self.proc.returncode}: see {log.name}")
            try:
                if httpx.get(f"{self.url}/health/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"moverd serve was not ready within 120 s: see {log.name}")

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            stop_process(self.proc)

    async def _register(self) -> None:
        from moverd.app import App
        from moverd.config import Settings
        from moverd.models import FileEntry

        async with App(Settings(state_dir=self.state)) as app:
            catalog: Any = app.catalog
            for s in self.sets:
                files = sorted(s.folder.iterdir())
                entries = [FileEntry(path=p.name, size=p.stat().st_size, mtime=MTIME) for p in files]
                await catalog.create_dataset(entries, pid=s.name)

    def cpu(self) -> float:
        assert self.proc is not None
        t = psutil.Process(self.proc.pid).cpu_times()
        return float(t.user + t.system)

    def abort(self, pid: str) -> None:
        r = httpx.post(f"{self.url}/s3/abortDatasetUpload", json={"dataset_id": pid}, timeout=120)
        if r.status_code not in (201, 404):
            raise RuntimeError(f"abortDatasetUpload {pid}: {r.status_code} {r.text}")


class MoverdUpload:
    name = "moverd upload"

    def __init__(self, ctx: Ctx, daemon: UploadDaemon, s: UploadSet, part_size: str, parallel: int) -> None:
        self.ctx, self.daemon, self.set, self.part_size, self.parallel = ctx, daemon, s, part_size, parallel
        self.runs = 0

    def run(self) -> Result:
        self.daemon.abort(self.set.name)
        empty(self.ctx.endpoint, LANDING_BUCKET)  # the reference's copy too: moto keeps objects in memory
        self.runs += 1
        cpu0 = self.daemon.cpu()
        cmd = [PY, "-m", "moverd", "upload", str(self.set.folder), "--dataset", self.set.name, "--url", self.daemon.url,
               "--part-size", self.part_size, "--parallel", str(self.parallel), "--no-finalize", "--json"]
        m = run_measured(cmd, env=self.daemon.env, logdir=self.ctx.logdir,
                         name=f"moverd-upload-{self.set.name}-{self.runs}")
        return Result(self.name, m, {"daemon_cpu": round(self.daemon.cpu() - cpu0, 3)})


class S5cmdPut:
    name = "s5cmd cp (put)"

    def __init__(self, ctx: Ctx, s: UploadSet, workers: int) -> None:
        self.ctx, self.set, self.workers = ctx, s, workers
        self.runs = 0

    def run(self) -> Result:
        empty(self.ctx.endpoint, LANDING_BUCKET)
        self.runs += 1
        cmd = [s5cmd_exe(), "--endpoint-url", self.ctx.endpoint, "--numworkers", str(self.workers),
               "cp", f"{self.set.folder}/*", f"s3://{LANDING_BUCKET}/s5cmd-{self.set.name}/"]
        m = run_measured(cmd, env=self.ctx.s3_env(), logdir=self.ctx.logdir,
                         name=f"s5cmd-put-{self.set.name}-{self.runs}")
        return Result(self.name, m, {})
