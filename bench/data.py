"""The data sets: objects put into the bench's S3 server, and their datasets in a local catalog."""

from __future__ import annotations

import asyncio
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiobotocore.config import AioConfig

from .s3server import session

KIB, MIB, GIB = 1024, 1024**2, 1024**3
MTIME = 1_700_000_000


@dataclass(frozen=True)
class DataSet:
    name: str
    """Also the dataset id (pid) and the landing prefix of its objects."""
    count: int
    size: int
    """Bytes per file."""

    @property
    def total(self) -> int:
        return self.count * self.size

    def path(self, i: int) -> str:
        # A few folders, as real datasets have: 1,000 files per folder.
        return f"d{i // 1000:03d}/f{i:06d}.bin"

    def describe(self) -> str:
        return f"{self.count:,} x {_size(self.size)} ({_size(self.total)})"


def _size(n: int) -> str:
    for unit, f in (("GiB", GIB), ("MiB", MIB), ("KiB", KIB)):
        if n >= f and n % (f // 1024 or 1) == 0:
            v = n / f
            return f"{v:g} {unit}"
    return f"{n} B"


def content(ds: DataSet, i: int, base: bytes) -> bytes:
    """Incompressible bytes, different for every file (so every md5 differs), cheap to make."""
    stamp = f"{ds.name}:{i}:".encode()
    return stamp + base[len(stamp) : ds.size]


async def _put_all(endpoint: str, bucket: str, ds: DataSet, concurrency: int) -> None:
    base = os.urandom(ds.size)
    config = AioConfig(max_pool_connections=concurrency, retries={"total_max_attempts": 8, "mode": "standard"})
    async with session().client("s3", endpoint_url=endpoint, config=config) as client:
        todo = iter(range(ds.count))

        async def worker() -> None:
            for i in todo:
                await client.put_object(Bucket=bucket, Key=f"{ds.name}/{ds.path(i)}", Body=content(ds, i, base))

        await asyncio.gather(*(worker() for _ in range(concurrency)))


async def _create_bucket(endpoint: str, bucket: str) -> None:
    async with session().client("s3", endpoint_url=endpoint) as client:
        await client.create_bucket(Bucket=bucket)


async def _delete_prefix(endpoint: str, bucket: str, prefix: str) -> None:
    """Delete the objects under the folder ``prefix`` ("": the whole bucket)."""
    async with session().client("s3", endpoint_url=endpoint) as client:
        folder = f"{prefix}/" if prefix else ""
        async for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=folder):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:
                await client.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})


def create_bucket(endpoint: str, bucket: str) -> None:
    asyncio.run(_create_bucket(endpoint, bucket))


def upload(endpoint: str, bucket: str, ds: DataSet, concurrency: int = 16) -> None:
    asyncio.run(_put_all(endpoint, bucket, ds, concurrency))


def delete(endpoint: str, bucket: str, ds: DataSet) -> None:
    asyncio.run(_delete_prefix(endpoint, bucket, ds.name))


def empty(endpoint: str, bucket: str) -> None:
    asyncio.run(_delete_prefix(endpoint, bucket, ""))


def moverd_env(state_dir: Path, endpoint: str, bucket: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The configuration of the archiving process, all from the environment: S3 landing zone,
    LTS and local catalog under ``state_dir``, every other setting at its default."""
    from .s3server import ACCESS_KEY, REGION, SECRET_KEY, credentials_env

    env = {k: v for k, v in os.environ.items() if not k.startswith("MOVERD_") and k != "PYTHONDONTWRITEBYTECODE"}
    env.update(credentials_env())
    env.update({
        "DO_NOT_TRACK": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "MOVERD_STATE_DIR": str(state_dir),
        "MOVERD_STORAGES__LANDING__TYPE": "s3",
        "MOVERD_STORAGES__LANDING__ENDPOINT_URL": endpoint,
        "MOVERD_STORAGES__LANDING__BUCKET": bucket,
        "MOVERD_STORAGES__LANDING__REGION": REGION,
        "MOVERD_STORAGES__LANDING__ACCESS_KEY_ID": ACCESS_KEY,
        "MOVERD_STORAGES__LANDING__SECRET_ACCESS_KEY": SECRET_KEY,
        "MOVERD_ARCHIVE__LANDING_PREFIX": "{pid}",
        # Every round archives the same objects again: keep them (a job would delete them).
        "MOVERD_ARCHIVE__DELETE_LANDING": "false",
    })
    env.update(extra or {})
    return env


def make_catalog_template(template_dir: Path, ds: DataSet) -> Path:
    """A state dir whose local catalog has ``ds`` registered (its files, sizes, mtimes); copied
    into a fresh state dir before every archive run. Returns the catalog file."""
    from moverd.app import App
    from moverd.config import Settings
    from moverd.models import FileEntry

    if template_dir.exists():
        shutil.rmtree(template_dir)
    settings = Settings(state_dir=template_dir)
    entries = [FileEntry(path=ds.path(i), size=ds.size, mtime=MTIME) for i in range(ds.count)]

    async def go() -> None:
        async with App(settings) as app:
            catalog: Any = app.catalog
            await catalog.create_dataset(entries, pid=ds.name)

    asyncio.run(go())
    return template_dir / "catalog.sqlite"


def fresh_state(state_dir: Path, catalog_file: Path) -> None:
    if state_dir.exists():
        shutil.rmtree(state_dir)
    state_dir.mkdir(parents=True)
    shutil.copy2(catalog_file, state_dir / catalog_file.name)
