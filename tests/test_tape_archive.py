"""Archive to a tape-class S3 store (the LTS an S3 bucket in the GLACIER class): every part and
the whole object carry a CRC32, the datablock is verified against the checksum the server
reports (no read-back: GLACIER objects cannot be read unrestored), and a server that reports
another checksum fails the dataset with nothing registered and the landing zone kept."""

from __future__ import annotations

import base64
import json
import zlib
from typing import Any

import pytest
from botocore.exceptions import ClientError

from moverd import VERIFY_SERVER_CHECKSUM
from moverd.services import verify_dataset
from moverd.services.jobs import run_job
from tests.support.facility import Facility, dataset_files
from tests.support.faultproxy import FaultProxy
from tests.support.s3 import S3Server

pytestmark = pytest.mark.anyio


def tape_lts(facility: Facility, endpoint_url: str | None = None, **extra: Any) -> str:
    """Make the facility's LTS a GLACIER bucket (through ``endpoint_url`` if given); its name."""
    bucket = facility.s3.create_bucket("tape")
    facility.overrides["storages"] = {
        **facility.settings_dict()["storages"],
        "lts": {
            "type": "s3", "bucket": bucket, "endpoint_url": endpoint_url or facility.s3.endpoint_url,
            "access_key_id": facility.s3.access_key_id, "secret_access_key": facility.s3.secret_access_key,
            "region": facility.s3.region, "storage_class": "GLACIER", "part_size": "5MiB", **extra,
        },
    }
    return bucket


def objects(s3: S3Server, bucket: str) -> dict[str, dict[str, Any]]:
    client = s3.client()
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            out[obj["Key"]] = client.head_object(Bucket=bucket, Key=obj["Key"], ChecksumMode="ENABLED")
    return out


async def test_archive_to_glacier_is_verified_by_server_checksum(facility: Facility) -> None:
    files = dataset_files(31, n=6, big=6_000_000)  # the big file's datablock is a multipart upload
    pid = facility.add_dataset(files)
    bucket = tape_lts(facility, write_limit=1, read_limit=2)
    job_id = facility.scicat.add_job("archive", [pid])
    async with facility.app() as app:
        res = await run_job(app, job_id)
        assert res.status.value == "finishedSuccessful", res.datasets
        registered = facility.scicat.datablocks(pid)
        assert registered
        stored = objects(facility.s3, bucket)
        tars = {k: v for k, v in stored.items() if k.endswith(".tar")}
        indexes = {k: v for k, v in stored.items() if k.endswith(".index.json")}
        assert len(tars) == len(indexes) == len(registered)
        assert {h["StorageClass"] for h in tars.values()} == {"GLACIER"}
        assert all(h.get("StorageClass", "STANDARD") == "STANDARD" for h in indexes.values())
        client = facility.s3.client()
        for key, head in tars.items():
            with pytest.raises(ClientError, match="InvalidObjectState"):
                client.get_object(Bucket=bucket, Key=key)  # unreadable: nothing was read back
            index = json.loads(client.get_object(Bucket=bucket, Key=key + ".index.json")["Body"].read())
            assert index["verified_by"] == VERIFY_SERVER_CHECKSUM
            assert index["object_checksum"] == f"crc32:{head['ChecksumCRC32']}"
            if head["ETag"].strip('"').endswith(tuple(f"-{n}" for n in range(2, 10))):
                assert head["ChecksumType"] == "FULL_OBJECT"
        # The full-object value is the CRC32 of the tar's bytes: restore one and compare.
        big = max(tars, key=lambda k: tars[k]["ContentLength"])
        assert tars[big]["ContentLength"] > 5 * 1024**2 and tars[big]["ETag"].endswith('-2"')
        client.restore_object(Bucket=bucket, Key=big, RestoreRequest={"Days": 1})
        data = client.get_object(Bucket=bucket, Key=big)["Body"].read()
        index = json.loads(client.get_object(Bucket=bucket, Key=big + ".index.json")["Body"].read())
        assert index["object_checksum"] == "crc32:" + base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()
        checked = await verify_dataset(app, pid)
        assert not checked.failed and set(checked.verified_by.values()) == {VERIFY_SERVER_CHECKSUM}
        lts = app.storage("lts")
        assert lts.write_slots is not None and lts.write_slots.peak_holders == 1  # the LTS write limit
        assert lts.read_slots is not None and lts.read_slots.limit == 2
    assert facility.scicat.lifecycle(pid)["archiveStatusMessage"] == "datasetOnArchiveDisk"


async def test_server_reporting_another_checksum_registers_nothing(
    facility: Facility, s3_fault_proxy: FaultProxy,
) -> None:
    files = dataset_files(32, n=4)
    pid = facility.add_dataset(files)
    tape_lts(facility, endpoint_url=s3_fault_proxy.url)
    s3_fault_proxy.rewrite_header("x-amz-checksum-crc32", "AAAAAA==", method="HEAD")
    job_id = facility.scicat.add_job("archive", [pid])
    async with facility.app() as app:
        res = await run_job(app, job_id)
    assert res.status.value == "finishedUnsuccessful"
    outcome = res.datasets[0]
    assert outcome.outcome == "system_error"
    assert "does not match the checksum computed while it was written" in outcome.message
    assert "crc32:AAAAAA==" in outcome.message
    assert facility.scicat.datablocks(pid) == []
    assert facility.scicat.lifecycle(pid)["archiveStatusMessage"] == "scheduleArchiveJobFailed"
    assert len(facility.landing_keys(pid)) == len(files)


async def test_readable_class_keeps_the_read_back(facility: Facility) -> None:
    files = dataset_files(33, n=3)
    pid = facility.add_dataset(files)
    bucket = tape_lts(facility, storage_class="GLACIER_IR")
    job_id = facility.scicat.add_job("archive", [pid])
    async with facility.app() as app:
        assert (await run_job(app, job_id)).status.value == "finishedSuccessful"
        checked = await verify_dataset(app, pid)
    assert not checked.failed and set(checked.verified_by.values()) == {"read-back"}
    client = facility.s3.client()
    for key, head in objects(facility.s3, bucket).items():
        if key.endswith(".tar"):
            assert head["StorageClass"] == "GLACIER_IR"
            index = json.loads(client.get_object(Bucket=bucket, Key=key + ".index.json")["Body"].read())
            assert index["verified_by"] == "read-back" and index["object_checksum"].startswith("crc32:")


@pytest.mark.parametrize("sizes", [[0], [1], [5 * 1024**2, 17], [3, 0, 1024, 65536 + 1]])
def test_full_object_crc32_is_combined_from_the_parts(sizes: list[int]) -> None:
    from moverd_storage_s3 import crc

    parts = [bytes((i * 7 + j) % 251 for j in range(n)) for i, n in enumerate(sizes)]
    assert crc.full_object([(zlib.crc32(p), len(p)) for p in parts]) == zlib.crc32(b"".join(parts))
    digests = b"".join(zlib.crc32(p).to_bytes(4, "big") for p in parts)
    assert crc.composite([(zlib.crc32(p), len(p)) for p in parts]) == f"{crc.encode(zlib.crc32(digests))}-{len(parts)}"


async def test_composite_checksums_for_servers_without_full_object(facility: Facility) -> None:
    files = dataset_files(34, n=2, big=11_000_000)  # three parts of 5 MiB
    pid = facility.add_dataset(files)
    bucket = tape_lts(facility, checksum_type="COMPOSITE")
    async with facility.app() as app:
        res = await run_job(app, facility.scicat.add_job("archive", [pid]))
        assert res.status.value == "finishedSuccessful", res.datasets
        checked = await verify_dataset(app, pid)
    assert not checked.failed and set(checked.verified_by.values()) == {VERIFY_SERVER_CHECKSUM}
    client = facility.s3.client()
    multipart = {k: h for k, h in objects(facility.s3, bucket).items() if k.endswith(".tar") and
                 h["ETag"].endswith('-3"')}
    assert multipart
    for key, head in multipart.items():
        index = json.loads(client.get_object(Bucket=bucket, Key=key + ".index.json")["Body"].read())
        # The part count may be left off by the server (moto does): the digest must match.
        digest = head["ChecksumCRC32"].removesuffix("-3")
        assert head["ChecksumType"] == "COMPOSITE" and index["object_checksum"] == f"crc32:{digest}-3"


async def test_failed_multipart_write_leaves_no_upload_and_no_object(
    facility: Facility, s3_fault_proxy: FaultProxy,
) -> None:
    files = {"big/movie.mrc": bytes(range(256)) * 40_000}  # one datablock, two parts
    pid = facility.add_dataset(files)
    bucket = tape_lts(facility, endpoint_url=s3_fault_proxy.url, max_attempts=1)
    s3_fault_proxy.fail_always(status=500, method="PUT")  # every UploadPart
    async with facility.app() as app:
        res = await run_job(app, facility.scicat.add_job("archive", [pid]))
    assert res.status.value == "finishedUnsuccessful"
    assert "upload aborted" in res.datasets[0].message
    client = facility.s3.client()
    assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    assert client.list_objects_v2(Bucket=bucket).get("Contents", []) == []
    assert facility.scicat.datablocks(pid) == []
    assert len(facility.landing_keys(pid)) == len(files)
