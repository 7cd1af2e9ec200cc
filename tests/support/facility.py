"""A facility in miniature: SciCat-compatible server, S3 landing zone and retrieval bucket (a
real S3 server), an LTS directory, and moverd configured for them as the deployment would be."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from moverd.app import App
from moverd.config import Settings
from tests.support.s3 import S3Server
from tests.support.scicat.server import ARCHIVER, SciCatServer

LANDING_PREFIX = "openem-network/datasets/{pid}/raw_files"


@dataclass
class Facility:
    scicat: SciCatServer
    s3: S3Server
    tmp: Path
    landing_bucket: str
    retrieval_bucket: str
    job_api: str = "v3"
    overrides: dict[str, Any] = field(default_factory=dict)

    def settings_dict(self) -> dict[str, Any]:
        creds = {"endpoint_url": self.s3.endpoint_url, "access_key_id": self.s3.access_key_id,
                 "secret_access_key": self.s3.secret_access_key, "region": self.s3.region}
        data: dict[str, Any] = {
            "state_dir": str(self.tmp / "state"),
            "pipeline": {"target_size": "1MiB", "chunk_size": "256KiB", "buffer_budget": "8MiB"},
            "archive": {"landing_prefix": LANDING_PREFIX},
            "storages": {
                "landing": {"type": "s3", "bucket": self.landing_bucket, **creds},
                "retrieval": {"type": "s3", "bucket": self.retrieval_bucket, **creds},
                "lts": {"type": "posix", "root": str(self.tmp / "lts"), "create": True},
            },
            "catalog": {
                "type": "scicat", "url": self.scicat.url, "username": ARCHIVER[0], "password": ARCHIVER[1],
                "job_api": self.job_api, "retry_delay": 0.01, "retry_max_delay": 0.05, "max_attempts": 4,
            },
        }
        for key, value in self.overrides.items():
            section, _, name = key.partition(".")
            if name:
                data.setdefault(section, {})[name] = value
            else:
                data[key] = value
        return data

    plugins: list[object] = field(default_factory=list)

    def app(self) -> App:
        """moverd on this facility, with the installed plugins and any test plugins added."""
        from moverd.plugins import load_plugins

        pm, report = load_plugins()
        for plugin in self.plugins:
            pm.register(plugin)
        return App(Settings(**self.settings_dict()), pm, report)

    def write_config(self) -> Path:
        """The same configuration as a TOML file, for the command line."""
        import json

        def toml(d: dict[str, Any], prefix: str = "") -> list[str]:
            lines, tables = [], []
            for k, v in d.items():
                if isinstance(v, dict):
                    tables.append((f"{prefix}{k}", v))
                else:
                    lines.append(f"{k} = {json.dumps(v)}")
            for name, sub in tables:
                lines += ["", f"[{name}]", *toml(sub, f"{name}.")]
            return lines

        path = self.tmp / "moverd.toml"
        path.write_text("\n".join(toml(self.settings_dict())) + "\n")
        return path

    def add_dataset(self, files: dict[str, bytes], *, upload: bool = True, **kw: Any) -> str:
        pid = self.scicat.add_dataset([(p, len(d)) for p, d in files.items()], **kw)
        if upload:
            self.upload(pid, files)
        return pid

    def upload(self, pid: str, files: dict[str, bytes]) -> None:
        client = self.s3.client()
        prefix = LANDING_PREFIX.format(pid=pid)
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda kv: client.put_object(Bucket=self.landing_bucket, Key=f"{prefix}/{kv[0]}",
                                                       Body=kv[1]), files.items()))

    def landing_keys(self, pid: str | None = None) -> list[str]:
        client = self.s3.client()
        prefix = LANDING_PREFIX.format(pid=pid) if pid else ""
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=self.landing_bucket, Prefix=prefix)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]

    def retrieval_keys(self) -> list[str]:
        client = self.s3.client()
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=self.retrieval_bucket)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]


def dataset_files(seed: int, n: int = 12, big: int = 1_500_000) -> dict[str, bytes]:
    rnd = random.Random(seed)
    files = {f"raw/frame_{i:03d}.tiff": rnd.randbytes(rnd.randint(1_000, 300_000)) for i in range(n)}
    files["big/movie.mrc"] = rnd.randbytes(big)
    files["empty.log"] = b""
    files["ünïcode/名前.json"] = b'{"a": 1}'
    return files


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """One temporary Prefect server for the session (entering it costs seconds)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield


@pytest.fixture(params=["v3", "v4"])
def job_api(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def facility(scicat: SciCatServer, s3_server: S3Server, tmp_path: Path) -> Facility:
    return Facility(scicat=scicat, s3=s3_server, tmp=tmp_path, landing_bucket=s3_server.create_bucket("landing"),
                    retrieval_bucket=s3_server.create_bucket("retrieval"))


@pytest.fixture
async def facility_app(facility: Facility) -> AsyncIterator[App]:
    async with facility.app() as app:
        yield app
