"""Archive and retrieve jobs end to end: SciCat-compatible server, S3 server, LTS directory,
real Prefect flow runs."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path
from typing import Any

import httpx
import pytest

from flows import job_flow
from moverd.app import App
from tests.support.facility import Facility, dataset_files

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("prefect_harness")]


async def run(facility: Facility, job_id: str, app: App | None = None) -> dict[str, Any]:
    if app is not None:
        return await job_flow(job_id, app=app)
    async with facility.app() as own:
        return await job_flow(job_id, app=own)


async def test_archive_job_success(facility: Facility, job_api: str) -> None:
    facility.job_api = job_api
    files = dataset_files(1)
    pid = facility.add_dataset(files)
    job_id = facility.scicat.add_job("archive", [pid])
    facility.scicat.clear_calls()
    res = await run(facility, job_id)
    assert res["status"] == "finishedSuccessful", res
    seq = facility.scicat.sequence(logins=False)
    print("\n".join(seq))
    blocks = facility.scicat.datablocks(pid)
    jobs = "/api/v3/jobs/{id}" if job_api == "v3" else "/api/v4/jobs/{id}"
    expected = [
        f"GET {jobs} 200",
        f"PATCH {jobs} 200",
        "GET /api/v3/datasets/{pid} 200",
        "PATCH /api/v3/datasets/{pid}/datasetlifecycle 200",
        "GET /api/v3/datasets/{pid}/origdatablocks 200",
        "GET /api/v3/datasets/{pid}/datablocks 200",
        *["POST /api/v3/datasets/{pid}/datablocks 201"] * len(blocks),
        "PATCH /api/v3/datasets/{pid}/datasetlifecycle 200",
        f"PATCH {jobs} 200",
    ]
    assert seq == expected
    lifecycle_bodies = [c.body for c in facility.scicat.requests("PATCH", "datasetlifecycle")]
    assert lifecycle_bodies[0] == {"archiveStatusMessage": "started", "archivable": False}
    assert lifecycle_bodies[1]["archiveStatusMessage"] == "datasetOnArchiveDisk"
    assert lifecycle_bodies[1]["retrievable"] is True and lifecycle_bodies[1]["archivable"] is False
    assert all("accessGroups" not in b for b in lifecycle_bodies)
    status_bodies = [c.body for c in facility.scicat.requests("PATCH", "jobs")]
    if job_api == "v3":
        assert [b["jobStatusMessage"] for b in status_bodies] == ["inProgress", "finishedSuccessful"]
    else:
        assert [b["statusCode"] for b in status_bodies] == ["inProgress", "finishedSuccessful"]
    # the catalog's datablocks match the tars on the LTS member by member
    assert len(blocks) >= 2
    seen = {}
    for block in blocks:
        tar = facility.tmp / "lts" / block["archiveId"]
        with tarfile.open(tar) as tf:
            members = {m.name: hashlib.md5(tf.extractfile(m).read()).hexdigest() for m in tf.getmembers()}
        assert {f["path"]: f["chk"] for f in block["dataFileList"]} == members
        assert {f["path"]: f["size"] for f in block["dataFileList"]} == {p: len(files[p]) for p in members}
        assert block["packedSize"] == tar.stat().st_size and block["chkAlg"] == "md5"
        seen.update(members)
    assert seen == {p: hashlib.md5(d).hexdigest() for p, d in files.items()}
    assert facility.landing_keys(pid) == []
    assert facility.scicat.lifecycle(pid)["archiveStatusMessage"] == "datasetOnArchiveDisk"
