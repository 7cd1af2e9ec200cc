"""Archive from an S3 landing zone (a real S3 server over HTTP) to the LTS, and back."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from moverd import FileEntry, MissingFileError
from moverd.app import App
from moverd.services import archive_dataset, retrieve_dataset
from tests.support.apps import make_settings
from tests.support.faultproxy import only_proxy
from tests.support.trees import awkward_tree, read_tree, small_files_tree

pytestmark = pytest.mark.anyio


def upload(s3_server: Any, bucket: str, prefix: str, files: dict[str, bytes]) -> None:
    client = s3_server.client()
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda kv: client.put_object(Bucket=bucket, Key=f"{prefix}/{kv[0]}", Body=kv[1]), files.items()))


async def archive_from_s3(app: App, files: dict[str, bytes], pid: str = "20.500.11935/abc") -> str:
    catalog: Any = app.catalog
    entries = [FileEntry(path=p, size=len(d), mtime=1_600_000_000) for p, d in files.items()]
    await catalog.create_dataset(entries, pid=pid)
    landing = app.storage("landing")
    await archive_dataset(app, pid, source=landing, prefix=app.settings.archive.landing_prefix.format(pid=pid))
    return pid


@pytest.fixture
async def s3_app(tmp_path: Path, s3_options: dict[str, Any]):
    settings = make_settings(tmp_path, storages={"landing": {"type": "s3", **s3_options}},
                             archive={"landing_prefix": "openem-network/datasets/{pid}/raw_files"})
    async with App(settings) as app:
        yield app


async def test_s3_landing_round_trip(s3_app: App, s3_server: Any, s3_options: dict[str, Any], tmp_path: Path) -> None:
    files = awkward_tree(tmp_path / "src")
    pid = "20.500.11935/abc"
    upload(s3_server, s3_options["bucket"], f"openem-network/datasets/{pid}/raw_files", files)
    await archive_from_s3(s3_app, files, pid)
    await retrieve_dataset(s3_app, pid, s3_app.local_folder(tmp_path / "out", "out", create=True))
    assert read_tree(tmp_path / "out") == files


async def test_many_small_objects_from_s3(s3_app: App, s3_server: Any, s3_options: dict[str, Any],
                                          tmp_path: Path) -> None:
    files = small_files_tree(tmp_path / "src", 5000, size=512)
    upload(s3_server, s3_options["bucket"], "openem-network/datasets/p/raw_files", files)
    await archive_from_s3(s3_app, files, "p")
    blocks = await s3_app.catalog.list_datablocks("p")
    assert sum(len(b.members) for b in blocks) == 5000
    await retrieve_dataset(s3_app, "p", s3_app.local_folder(tmp_path / "out", "out", create=True))
    assert read_tree(tmp_path / "out") == files


async def test_object_missing_from_the_landing_zone_is_named(s3_app: App, s3_server: Any,
                                                             s3_options: dict[str, Any], tmp_path: Path) -> None:
    files = awkward_tree(tmp_path / "src")
    upload(s3_server, s3_options["bucket"], "openem-network/datasets/p/raw_files",
           {k: v for k, v in files.items() if k != "exec.sh"})
    with pytest.raises(MissingFileError, match="'exec.sh' is missing"):
        await archive_from_s3(s3_app, files, "p")
    assert not list((tmp_path / "state" / "lts").rglob("*.tar"))


async def test_a_proxy_of_the_environment_carries_every_request(
    tmp_path: Path, s3_server: Any, s3_options: dict[str, Any], s3_fault_proxy: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With HTTP_PROXY set (as botocore reads it, here with a user and password), reads, listings
    and HEADs go through the proxy too, not straight to the endpoint, each with the proxy's
    credentials; NO_PROXY naming the endpoint's host bypasses it."""
    files = small_files_tree(tmp_path / "src", 30, size=3000)
    upload(s3_server, s3_options["bucket"], "openem-network/datasets/px/raw_files", files)
    only_proxy(monkeypatch, "HTTP_PROXY", f"http://archiver:pw@127.0.0.1:{s3_fault_proxy.port}")
    settings = make_settings(tmp_path / "a", storages={"landing": {"type": "s3", **s3_options}},
                             archive={"landing_prefix": "openem-network/datasets/{pid}/raw_files"})
    async with App(settings) as app:
        await archive_from_s3(app, files, "px")
        await retrieve_dataset(app, "px", app.local_folder(tmp_path / "out", "out", create=True))
    assert read_tree(tmp_path / "out") == files
    gets = [target for method, target, _ in s3_fault_proxy.seen if method == "GET"]
    # Proxied requests carry the whole URL: one GET per file at least, and the listing.
    assert sum(f"/{s3_options['bucket']}/openem-network/datasets/px/raw_files/" in t for t in gets) >= len(files)
    assert all(t.startswith(s3_server.endpoint_url) for t in gets), gets[:3]
    assert s3_fault_proxy.proxy_authorizations == ["Basic YXJjaGl2ZXI6cHc="] * len(s3_fault_proxy.seen)

    seen = len(s3_fault_proxy.seen)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    settings = make_settings(tmp_path / "b", storages={"landing": {"type": "s3", **s3_options}},
                             archive={"landing_prefix": "openem-network/datasets/{pid}/raw_files"})
    async with App(settings) as app:
        await archive_from_s3(app, files, "px")
    assert len(s3_fault_proxy.seen) == seen
