"""The SciCat catalog plugin against the SciCat-compatible test server: every Catalog method,
v3 and v4 jobs, the exact request bodies, re-login, retries, errors and secrets from files."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import anyio
import pytest
from moverd_catalog_scicat import SciCatCatalog, SciCatOptions
from moverd_catalog_scicat.auth import usable_lifetime

from moverd import (
    ArchiveStatus,
    CatalogError,
    ConfigError,
    Datablock,
    Download,
    JobType,
    LifecycleUpdate,
    Member,
    RetrieveStatus,
    UnknownDatasetError,
    UnknownJobError,
    UnsafePathError,
    UserError,
)
from moverd.plugins import load_plugins
from moverd.registry import Context, Registry
from tests.support.scicat import ARCHIVER, SciCatServer
from tests.support.scicat.fixtures import scicat  # noqa: F401 - the fixture

pytestmark = pytest.mark.anyio

FILES: list[Any] = [
    {"path": "raw/b.dat", "size": 20, "time": "2024-05-01T12:00:00.000Z", "perm": "-rw-r-----",
     "uid": "1000", "gid": "2000", "chk": "b" * 32},
    {"path": "raw/a.dat", "size": 10, "time": "2024-05-01T14:00:00+02:00", "perm": "0755",
     "uid": "alice", "gid": "users"},
]
T0 = 1714564800.0  # 2024-05-01T12:00:00Z


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


Factory = Callable[..., SciCatCatalog]


@pytest.fixture
async def make_catalog(scicat: SciCatServer) -> AsyncIterator[Factory]:  # noqa: F811
    made: list[SciCatCatalog] = []

    def make(**over: Any) -> SciCatCatalog:
        opts: dict[str, Any] = {
            "url": scicat.url, "username": ARCHIVER[0], "password": ARCHIVER[1],
            "retry_delay": 0.01, "retry_max_delay": 0.05, "max_attempts": 4, "timeout": 5,
        }
        opts.update(over)
        cat = SciCatCatalog(SciCatOptions.model_validate(opts))
        made.append(cat)
        return cat

    yield make
    for cat in made:
        await cat.aclose()


@pytest.fixture
def catalog(make_catalog: Factory) -> SciCatCatalog:
    return make_catalog()


def member(path: str, size: int, **over: Any) -> Member:
    fields: dict[str, Any] = {
        "path": path, "size": size, "offset": 512, "header_offset": 0, "mtime": T0 + 0.25, "mode": 0o640,
        "uid": 1000, "gid": 2000, "checksum": "c" * 32,
    }
    fields.update(over)
    return Member(**fields)


def datablock(pid: str, index: int = 0, members: list[Member] | None = None) -> Datablock:
    members = members if members is not None else [member("raw/a.dat", 10), member("raw/b.dat", 20)]
    safe = quote(pid, safe="-_.~+=,@")
    return Datablock(
        archive_id=f"{safe}/datablocks/{safe}_{index:05d}.tar", index=index,
        size=sum(m.size for m in members), packed_size=4096, checksum_alg="md5",
        datablock_checksum="xxh3_128:0123", members=members,
    )


# --- plugin registration and options -------------------------------------------------------------


def test_plugin_registers_the_scicat_type(tmp_path: Path) -> None:
    pm, report = load_plugins()
    assert "catalog_scicat" not in report.broken
    reg = Registry.from_plugins(pm)
    assert reg.catalogs["scicat"].options is SciCatOptions
    cat = reg.create_catalog(
        "scicat", {"url": "https://scicat.example.org/", "username": "u", "password": "p"}, Context(tmp_path)
    )
    assert isinstance(cat, SciCatCatalog) and cat.type_name == "scicat"
    assert cat.opts.url == "https://scicat.example.org" and cat.opts.effective_jobs_prefix == "/api/v3"
    with pytest.raises(ConfigError, match="without /api"):
        reg.create_catalog("scicat", {"url": "https://x/api/v3", "username": "u", "password": "p"},
                           Context(tmp_path))
    with pytest.raises(ConfigError, match=r"catalog\.bogus: unknown key"):
        reg.create_catalog("scicat", {"url": "https://x", "username": "u", "password": "p", "bogus": 1},
                           Context(tmp_path))


def test_secrets_from_files(tmp_path: Path) -> None:
    (tmp_path / "user").write_text("archiver\n")
    (tmp_path / "password").write_text("  s3cret\n")
    opts = SciCatOptions.model_validate({
        "url": "https://x", "username_file": str(tmp_path / "user"), "password_file": str(tmp_path / "password"),
        "job_api": "v4",
    })
    assert opts.username == "archiver" and opts.password.get_secret_value() == "s3cret"
    assert opts.effective_jobs_prefix == "/api/v4"
    assert "s3cret" not in repr(opts)
    with pytest.raises(ValueError, match="does not exist"):
        SciCatOptions.model_validate({"url": "https://x", "username": "u",
                                      "password_file": str(tmp_path / "missing")})
    with pytest.raises(ValueError, match="either username or username_file"):
        SciCatOptions.model_validate({"url": "https://x", "username": "u", "password": "p",
                                      "username_file": str(tmp_path / "user")})


async def test_secrets_from_files_log_in(scicat: SciCatServer, make_catalog: Factory, tmp_path: Path) -> None:  # noqa: F811
    (tmp_path / "user").write_text(ARCHIVER[0] + "\n")
    (tmp_path / "password").write_text(ARCHIVER[1] + "\n")
    cat = make_catalog(username=None, password=None, username_file=str(tmp_path / "user"),
                       password_file=str(tmp_path / "password"))
    await cat.check()
    assert scicat.requests("POST", "auth/login")[0].body == {"username": ARCHIVER[0], "password": ARCHIVER[1]}


def test_usable_lifetime() -> None:
    assert usable_lifetime(3600, 60) == 3540
    assert usable_lifetime(2, 60) == 1
    assert usable_lifetime(0, 60) == 0


# --- jobs ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("job_api", "jobs_prefix"), [("v3", None), ("v4", None), ("v3", "/api/v4"),
                                                      ("v4", "/api/v3")])
async def test_get_job_reads_both_shapes(
    scicat: SciCatServer, make_catalog: Factory, job_api: str, jobs_prefix: str | None,  # noqa: F811
) -> None:
    a = scicat.add_dataset(FILES)
    b = scicat.add_dataset(FILES)
    job_id = scicat.add_job("retrieve", [a, (b, ["raw/a.dat"])], status_code="inProgress")
    cat = make_catalog(job_api=job_api, jobs_prefix=jobs_prefix)
    job = await cat.get_job(job_id)
    assert job.id == job_id and job.type is JobType.retrieve and job.status == "inProgress"
    assert [(d.pid, d.files) for d in job.datasets] == [(a, []), (b, ["raw/a.dat"])]
    prefix = jobs_prefix or f"/api/{job_api}"
    assert scicat.requests("GET", "jobs")[0].route == f"GET {prefix}/jobs/{{id}}"


async def test_get_job_errors(scicat: SciCatServer, catalog: SciCatCatalog) -> None:  # noqa: F811
    pid = scicat.add_dataset(FILES)
    with pytest.raises(UnknownJobError, match="no-such-job"):
        await catalog.get_job("no-such-job")
    with pytest.raises(UserError, match="type 'public'"):
        await catalog.get_job(scicat.add_job("public", [pid]))
    with pytest.raises(UserError, match=r"datasetList\[1\] has no pid"):
        await catalog.get_job(scicat.add_job("archive", [pid, {"files": []}]))
    with pytest.raises(UserError, match="must be a list of file paths"):
        await catalog.get_job(scicat.add_job("archive", [{"pid": pid, "files": "raw/a.dat"}]))
    with pytest.raises(UserError, match="missing or empty"):
        await catalog.get_job(scicat.add_job("archive", []))


async def test_set_job_status_v3(scicat: SciCatServer, catalog: SciCatCatalog) -> None:  # noqa: F811
    job_id = scicat.add_job("archive", [scicat.add_dataset(FILES)])
    await catalog.set_job_status(job_id, "inProgress", "started archiving")
    downloads = [Download(dataset="x", name="n.tar", size=1, archive_id="a/n.tar", url="https://s3/n.tar?sig")]
    await catalog.set_job_status(job_id, "finishedSuccessful", "done", downloads)
    script = base64.b64encode(
        b"#!/bin/sh\n# Downloads the retrieved data; links expire (see the job result).\nset -eu\nmkdir -p .\n"
        b"curl -fL --retry 3 -o n.tar 'https://s3/n.tar?sig'\ntar xf n.tar && rm n.tar\n").decode()
    result = {"result": [{"datasetId": "x", "name": "n.tar", "size": 1, "archiveId": "a/n.tar",
                          "url": "https://s3/n.tar?sig"}], "downloadScript": script}
    bodies = [c.body for c in scicat.requests("PATCH", "/api/v3/jobs/{id}")]
    assert bodies == [
        {"jobStatusMessage": "inProgress"},
        {"jobStatusMessage": "finishedSuccessful", "jobResultObject": result},
    ]
    job = scicat.job(job_id)
    assert (job["statusCode"], job["statusMessage"], job["jobResultObject"]) == (
        "finishedSuccessful", "finishedSuccessful", result,
    )
    with pytest.raises(UnknownJobError):
        await catalog.set_job_status("no-such-job", "inProgress")


async def test_set_job_status_v4(scicat: SciCatServer, make_catalog: Factory) -> None:  # noqa: F811
    job_id = scicat.add_job("retrieve", [scicat.add_dataset(FILES)])
    cat = make_catalog(job_api="v4")
    await cat.set_job_status(job_id, "inProgress")
    await cat.set_job_status(job_id, "finishedWithDatasetErrors", "1 of 2 datasets failed", [])
    bodies = [c.body for c in scicat.requests("PATCH", "/api/v4/jobs/{id}")]
    assert bodies == [
        {"statusCode": "inProgress", "statusMessage": "inProgress"},
        {"statusCode": "finishedWithDatasetErrors", "statusMessage": "1 of 2 datasets failed",
         "jobResultObject": {"result": []}},
    ]
    job = scicat.job(job_id)
    assert (job["statusCode"], job["statusMessage"]) == ("finishedWithDatasetErrors", "1 of 2 datasets failed")
    with pytest.raises(UnknownJobError):
        await cat.get_job("no-such-job")


# --- datasets and lifecycle ----------------------------------------------------------------------


async def test_get_dataset(scicat: SciCatServer, catalog: SciCatCatalog) -> None:  # noqa: F811
    pid = scicat.add_dataset(FILES, source_folder="/gpfs/p12345/run1", lifecycle={"archivable": True})
    ds = await catalog.get_dataset(pid)
    assert (ds.pid, ds.size, ds.number_of_files, ds.source_folder, ds.owner_group) == (
        pid, 30, 2, "/gpfs/p12345/run1", "p12345",
    )
    assert ds.lifecycle["archiveStatusMessage"] == "datasetCreated" and ds.lifecycle["archivable"] is True
    with pytest.raises(UnknownDatasetError):
        await catalog.get_dataset("20.500.12269/missing")


async def test_get_dataset_v4(scicat: SciCatServer, make_catalog: Factory) -> None:  # noqa: F811
    pid = scicat.add_dataset(FILES)
    ds = await make_catalog(api_prefix="/api/v4").get_dataset(pid)
    assert ds.size == 30
    assert scicat.requests("GET")[0].route == "GET /api/v4/datasets/{pid}"


async def test_update_lifecycle_sends_only_set_fields(scicat: SciCatServer, catalog: SciCatCatalog) -> None:  # noqa: F811
    pid = scicat.add_dataset(FILES, access_groups=["group-a"])
    await catalog.update_lifecycle(pid, LifecycleUpdate(archive_status=ArchiveStatus.started, archivable=False))
    await catalog.update_lifecycle(pid, LifecycleUpdate(retrievable=True))
    await catalog.update_lifecycle(pid, LifecycleUpdate(retrieve_status=RetrieveStatus.retrieved))
    await catalog.update_lifecycle(pid, LifecycleUpdate())  # nothing to send: no call
    calls = scicat.requests("PATCH")
    assert [c.route for c in calls] == ["PATCH /api/v3/datasets/{pid}/datasetlifecycle"] * 3
    assert [c.body for c in calls] == [
        {"archiveStatusMessage": "started", "archivable": False},
        {"retrievable": True},
        {"retrieveStatusMessage": "datasetRetrieved"},
    ]
    lc = scicat.lifecycle(pid)
    assert (lc["archiveStatusMessage"], lc["archivable"], lc["retrievable"], lc["retrieveStatusMessage"]) == (
        "started", False, True, "datasetRetrieved",
    )
    assert scicat.dataset(pid)["accessGroups"] == ["group-a"]  # untouched (SOM's pitfall)
    with pytest.raises(UnknownDatasetError):
        await catalog.update_lifecycle("20.500.12269/missing", LifecycleUpdate(archivable=False))


async def test_update_lifecycle_storage_location(scicat: SciCatServer, make_catalog: Factory) -> None:  # noqa: F811
    pid = scicat.add_dataset(FILES)
    cat = make_catalog(storage_location="PSI-LTS", api_prefix="/api/v4")
    await cat.update_lifecycle(pid, LifecycleUpdate(archive_status=ArchiveStatus.started))
    await cat.update_lifecycle(pid, LifecycleUpdate(
        archive_status=ArchiveStatus.on_archive_disk, archivable=False, retrievable=True,
    ))
    calls = scicat.requests("PATCH")
    assert calls[0].route == "PATCH /api/v4/datasets/{pid}/datasetlifecycle"
    assert calls[0].body == {"archiveStatusMessage": "started"}
    assert calls[1].body == {"archiveStatusMessage": "datasetOnArchiveDisk", "archivable": False,
                             "retrievable": True, "storageLocation": "PSI-LTS"}
    assert scicat.lifecycle(pid)["storageLocation"] == "PSI-LTS"


# --- files ---------------------------------------------------------------------------------------


async def test_list_files_v3(scicat: SciCatServer, catalog: SciCatCatalog) -> None:  # noqa: F811
    pid = scicat.add_dataset(origdatablocks=[FILES, [{"path": "aa/c.dat", "size": 0, "time": "2024-05-01T12:00:00",
                                                     "perm": "100644", "uid": "0", "gid": "0"}]])
    files = await catalog.list_files(pid)
    assert [f.path for f in files] == ["aa/c.dat", "raw/a.dat", "raw/b.dat"]
    c, a, b = files
    assert (b.size, b.mtime, b.mode, b.uid, b.gid, b.checksum) == (20, T0, 0o640, 1000, 2000, "b" * 32)
    assert (a.size, a.mtime, a.mode, a.uid, a.gid, a.checksum) == (10, T0, 0o755, None, None, None)
    assert (c.mtime, c.mode, c.uid, c.gid) == (T0, 0o644, 0, 0)
    assert [c.route for c in scicat.requests("GET")] == ["GET /api/v3/datasets/{pid}/origdatablocks"]
    with pytest.raises(UnknownDatasetError):
        await catalog.list_files("20.500.12269/missing")


async def test_list_files_v4_pages(scicat: SciCatServer, make_catalog: Factory) -> None:  # noqa: F811
    blocks = [[(f"f{i:04d}", i)] for i in range(130)]
    pid = scicat.add_dataset(origdatablocks=blocks)
    scicat.add_dataset([("other", 1)])
    cat = make_catalog(api_prefix="/api/v4")
    files = await cat.list_files(pid)
    assert [f.path for f in files] == [f"f{i:04d}" for i in range(130)]
    assert [c.pid for c in scicat.requests("GET", "/api/v4/origdatablocks")] == [pid, pid]
    with pytest.raises(UnknownDatasetError):
        await cat.list_files("20.500.12269/missing")
    empty = scicat.add_dataset()
    assert await cat.list_files(empty) == []


async def test_list_files_user_errors(scicat: SciCatServer, catalog: SciCatCatalog) -> None:  # noqa: F811
    dup = scicat.add_dataset(origdatablocks=[[("x/a", 1)], [("x//a", 1)]])
    with pytest.raises(UserError, match="listed twice"):
        await catalog.list_files(dup)
    unsafe = scicat.add_dataset([("../etc/passwd", 1)])
    with pytest.raises(UnsafePathError, match=r"'\.\.' is not allowed"):
        await catalog.list_files(unsafe)


# --- datablocks ----------------------------------------------------------------------------------


async def test_register_datablock_exact_body(scicat: SciCatServer, catalog: SciCatCatalog) -> None:  # noqa: F811
    pid = scicat.add_dataset(FILES)
    db = datablock(pid, members=[member("raw/a.dat", 10), member("raw/b.dat", 20, uid=None, gid=None, mode=None)])
    new_id = await catalog.register_datablock(pid, db)
    (call,) = scicat.requests("POST", "datablocks")
    assert call.route == "POST /api/v3/datasets/{pid}/datablocks" and call.pid == pid
    assert call.body == {
        "archiveId": db.archive_id, "size": 30, "packedSize": 4096, "version": "1", "chkAlg": "md5",
        "dataFileList": [
            {"path": "raw/a.dat", "size": 10, "time": "2024-05-01T12:00:00.250Z", "chk": "c" * 32,
             "uid": "1000", "gid": "2000", "perm": "0640"},
            {"path": "raw/b.dat", "size": 20, "time": "2024-05-01T12:00:00.250Z", "chk": "c" * 32},
        ],
    }
    (stored,) = scicat.datablocks(pid)
    assert stored["id"] == new_id
    ds = scicat.dataset(pid)
    assert (ds["packedSize"], ds["numberOfFilesArchived"]) == (4096, 2)


async def test_register_twice_returns_the_existing_id(scicat: SciCatServer, catalog: SciCatCatalog) -> None:  # noqa: F811
    pid = scicat.add_dataset(FILES)
    first = await catalog.register_datablock(pid, datablock(pid))
    again = await catalog.register_datablock(pid, datablock(pid))  # resume after a crash
    assert again == first and len(scicat.datablocks(pid)) == 1
    assert scicat.sequence(logins=False) == [
        "POST /api/v3/datasets/{pid}/datablocks 201",
        "POST /api/v3/datasets/{pid}/datablocks 500",
        "GET /api/v3/datasets/{pid}/datablocks 200",
    ]
    other = datablock(pid, members=[member("raw/a.dat", 10)])
    with pytest.raises(CatalogError, match=r"already registered .* with other sizes"):
        await catalog.register_datablock(pid, other)


async def test_register_survives_a_lost_answer(scicat: SciCatServer, make_catalog: Factory) -> None:  # noqa: F811
    pid = scicat.add_dataset(FILES)
    cat = make_catalog(timeout=0.3)
    await cat.check()
    scicat.slow(1.0, method="POST", path="/datablocks$", count=1, after=True)  # acted, answer late
    new_id = await cat.register_datablock(pid, datablock(pid))
    assert [d["id"] for d in scicat.datablocks(pid)] == [new_id]
    assert scicat.sequence(logins=False)[-2:] == [
        "POST /api/v3/datasets/{pid}/datablocks 500", "GET /api/v3/datasets/{pid}/datablocks 200",
    ]


async def test_register_errors(scicat: SciCatServer, catalog: SciCatCatalog) -> None:  # noqa: F811
    pid = scicat.add_dataset(FILES)
    with pytest.raises(UnknownDatasetError):
        await catalog.register_datablock("20.500.12269/missing", datablock("20.500.12269/missing"))
    with pytest.raises(CatalogError, match="at least one file"):
        await catalog.register_datablock(pid, datablock(pid, members=[]))
    scicat.fail_next(1, 500, method="POST")  # a 500 that is not a duplicate
    with pytest.raises(CatalogError, match=r"POST /api/v3/datasets/.*%2F.*/datablocks failed: 500"):
        await catalog.register_datablock(pid, datablock(pid))
    assert scicat.datablocks(pid) == []


async def test_list_and_delete_datablocks(scicat: SciCatServer, catalog: SciCatCatalog) -> None:  # noqa: F811
    pid = scicat.add_dataset(FILES)
    ids = [await catalog.register_datablock(pid, datablock(pid, i)) for i in (2, 0, 10, 1)]
    blocks = await catalog.list_datablocks(pid)
    assert [b.index for b in blocks] == [0, 1, 2, 10]
    b0 = blocks[0]
    assert b0.catalog_id == ids[1] and b0.archive_id == datablock(pid, 0).archive_id
    assert (b0.size, b0.packed_size, b0.checksum_alg, b0.datablock_checksum, b0.version) == (30, 4096, "md5", "", "1")
    m = b0.members[0]
    assert (m.path, m.size, m.offset, m.header_offset, m.checksum, m.mode, m.uid, m.gid, m.mtime) == (
        "raw/a.dat", 10, -1, -1, "c" * 32, 0o640, 1000, 2000, T0 + 0.25,
    )
    await catalog.delete_datablock(pid, ids[0])
    await catalog.delete_datablock(pid, ids[0])  # already gone: fine
    assert sorted(d["id"] for d in scicat.datablocks(pid)) == sorted(ids[1:])
    deletes = scicat.requests("DELETE")
    assert [c.route for c in deletes] == ["DELETE /api/v3/datasets/{pid}/datablocks/{did}"] * 2
    assert [c.status for c in deletes] == [200, 404]
    with pytest.raises(UnknownDatasetError):
        await catalog.list_datablocks("20.500.12269/missing")


async def test_datablocks_without_index_in_the_archive_id(scicat: SciCatServer, catalog: SciCatCatalog) -> None:  # noqa: F811
    pid = scicat.add_dataset(FILES)
    for name in ("block-b", "block-a"):
        db = datablock(pid).model_copy(update={"archive_id": f"som/{name}.tar"})
        await catalog.register_datablock(pid, db)
    assert [(b.index, b.archive_id) for b in await catalog.list_datablocks(pid)] == [
        (0, "som/block-a.tar"), (1, "som/block-b.tar"),
    ]


async def test_pids_with_slashes_are_one_segment(scicat: SciCatServer, catalog: SciCatCatalog) -> None:  # noqa: F811
    pid = scicat.add_dataset(FILES, pid="10.16907/a/b c?d")
    await catalog.get_dataset(pid)
    await catalog.list_files(pid)
    await catalog.update_lifecycle(pid, LifecycleUpdate(archivable=False))
    did = await catalog.register_datablock(pid, datablock(pid))
    await catalog.list_datablocks(pid)
    await catalog.delete_datablock(pid, did)
    calls = scicat.requests()[1:]
    assert len(calls) == 6 and all(c.pid == pid for c in calls)
    assert all("/10.16907%2Fa%2Fb%20c%3Fd" in c.raw_path for c in calls)


# --- authentication, retries, failures -----------------------------------------------------------


async def test_logs_in_once_and_reuses_the_token(scicat: SciCatServer, catalog: SciCatCatalog) -> None:  # noqa: F811
    pid = scicat.add_dataset(FILES)
    await catalog.check()
    for _ in range(3):
        await catalog.get_dataset(pid)
    assert len(scicat.requests("POST", "auth/login")) == 1
    login = scicat.requests("POST", "auth/login")[0]
    assert login.body == {"username": ARCHIVER[0], "password": ARCHIVER[1]}
    assert login.content_type.startswith("application/json")


async def test_token_refresh_when_expired_mid_sequence(scicat: SciCatServer, catalog: SciCatCatalog) -> None:  # noqa: F811
    pid = scicat.add_dataset(FILES)
    job_id = scicat.add_job("archive", [pid])
    await catalog.get_job(job_id)
    await catalog.set_job_status(job_id, "inProgress")
    scicat.expire_tokens()
    await catalog.update_lifecycle(pid, LifecycleUpdate(archive_status=ArchiveStatus.started, archivable=False))
    await catalog.list_files(pid)
    assert scicat.sequence() == [
        "POST /api/v3/auth/login 201",
        "GET /api/v3/jobs/{id} 200",
        "PATCH /api/v3/jobs/{id} 200",
        "PATCH /api/v3/datasets/{pid}/datasetlifecycle 403",
        "POST /api/v3/auth/login 201",
        "PATCH /api/v3/datasets/{pid}/datasetlifecycle 200",
        "GET /api/v3/datasets/{pid}/origdatablocks 200",
    ]
    assert scicat.lifecycle(pid)["archiveStatusMessage"] == "started"


async def test_short_ttl_logs_in_before_expiry(scicat: SciCatServer, catalog: SciCatCatalog) -> None:  # noqa: F811
    scicat.token_ttl = 0.4  # usable for 0.2 s with the default 60 s margin
    pid = scicat.add_dataset(FILES)
    await catalog.get_dataset(pid)
    await anyio.sleep(0.25)
    await catalog.get_dataset(pid)
    assert scicat.sequence() == [
        "POST /api/v3/auth/login 201", "GET /api/v3/datasets/{pid} 200",
        "POST /api/v3/auth/login 201", "GET /api/v3/datasets/{pid} 200",
    ]


async def test_concurrent_calls_share_one_relogin(scicat: SciCatServer, catalog: SciCatCatalog) -> None:  # noqa: F811
    pid = scicat.add_dataset(FILES)
    await catalog.check()
    scicat.expire_tokens()
    scicat.clear_calls()
    async with anyio.create_task_group() as tg:
        for _ in range(5):
            tg.start_soon(catalog.get_dataset, pid)
    assert len(scicat.requests("POST", "auth/login")) == 1
    assert [c.status for c in scicat.requests("GET")].count(200) == 5


async def test_503_bursts_are_survived(scicat: SciCatServer, catalog: SciCatCatalog) -> None:  # noqa: F811
    pid = scicat.add_dataset(FILES)
    scicat.fail_next(2)  # even the login
    await catalog.check()
    scicat.fail_next(3, 503, method="PATCH")
    scicat.fail_next(1, 502, method="GET")
    scicat.fail_next(1, 504, method="POST", path="/datablocks$")
    await catalog.update_lifecycle(pid, LifecycleUpdate(archivable=False))
    await catalog.list_files(pid)
    await catalog.register_datablock(pid, datablock(pid))
    assert scicat.sequence() == [
        "POST /api/v3/auth/login 503",
        "POST /api/v3/auth/login 503",
        "POST /api/v3/auth/login 201",
        *["PATCH /api/v3/datasets/{pid}/datasetlifecycle 503"] * 3,
        "PATCH /api/v3/datasets/{pid}/datasetlifecycle 200",
        "GET /api/v3/datasets/{pid}/origdatablocks 502",
        "GET /api/v3/datasets/{pid}/origdatablocks 200",
        "POST /api/v3/datasets/{pid}/datablocks 504",
        "POST /api/v3/datasets/{pid}/datablocks 201",
    ]
    assert len(scicat.datablocks(pid)) == 1


async def test_down_for_good_is_a_catalog_error(
    scicat: SciCatServer, catalog: SciCatCatalog, make_catalog: Factory,  # noqa: F811
) -> None:
    pid = scicat.add_dataset(FILES)
    await catalog.check()
    scicat.down()
    with pytest.raises(CatalogError, match=r"PATCH /api/v3/datasets/.*/datasetlifecycle failed after 4 attempts: 503"):
        await catalog.update_lifecycle(pid, LifecycleUpdate(archivable=False))
    assert len(scicat.requests("PATCH", faults=True)) == 4
    with pytest.raises(CatalogError, match="auth/login failed after 4 attempts"):
        await make_catalog(username="u", password="p").check()
    scicat.up()
    await catalog.update_lifecycle(pid, LifecycleUpdate(archivable=False))


async def test_unreachable_server(make_catalog: Factory) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cat = make_catalog(url=f"http://127.0.0.1:{port}", max_attempts=2)
    with pytest.raises(CatalogError, match="failed after 2 attempts: ConnectError"):
        await cat.get_job("x")


async def test_slow_server_times_out(scicat: SciCatServer, make_catalog: Factory) -> None:  # noqa: F811
    pid = scicat.add_dataset(FILES)
    cat = make_catalog(timeout=0.2, max_attempts=2)
    await cat.check()
    scicat.slow(1.0, method="GET")
    said = r"^SciCat http://\S+: no answer to GET /api/v3/\S+ within 0.2 s \(2 attempts\)$"
    with pytest.raises(CatalogError, match=said):
        await cat.get_dataset(pid)


async def test_bad_credentials(scicat: SciCatServer, make_catalog: Factory) -> None:  # noqa: F811
    cat = make_catalog(password="wrong")
    with pytest.raises(CatalogError, match="login as 'archiver' was refused"):
        await cat.check()
    with pytest.raises(CatalogError, match="refused"):
        await cat.get_job("x")


async def test_missing_permission_is_a_catalog_error(scicat: SciCatServer, make_catalog: Factory) -> None:  # noqa: F811
    scicat.add_user("ingest-only", "pw", ["ingestor"])  # may create datablocks, not delete them
    pid = scicat.add_dataset(FILES)
    cat = make_catalog(username="ingest-only", password="pw")
    did = await cat.register_datablock(pid, datablock(pid))
    with pytest.raises(CatalogError, match=r"403 Forbidden resource .*lacks a permission"):
        await cat.delete_datablock(pid, did)
    # one re-login in case the token was the problem, then the refusal is final
    assert scicat.sequence(logins=True)[-3:] == [
        "DELETE /api/v3/datasets/{pid}/datablocks/{did} 403",
        "POST /api/v3/auth/login 201",
        "DELETE /api/v3/datasets/{pid}/datablocks/{did} 403",
    ]


async def test_wrong_prefix_is_not_an_unknown_id(scicat: SciCatServer, make_catalog: Factory) -> None:  # noqa: F811
    pid = scicat.add_dataset(FILES)
    job_id = scicat.add_job("archive", [pid])
    with pytest.raises(CatalogError, match="no such route: check url and the"):
        await make_catalog(api_prefix="/api/v9").get_dataset(pid)
    with pytest.raises(CatalogError, match="no such route"):
        await make_catalog(jobs_prefix="/api/v9").get_job(job_id)
    with pytest.raises(CatalogError, match="no such route"):
        await make_catalog(datablocks_prefix="/api/v4").delete_datablock(pid, "some-id")
