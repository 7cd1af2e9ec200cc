"""The ``s3`` storage plugin against a real S3 server (moto over HTTP), faults included."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anyio
import httpx
import pytest
from moverd_storage_s3 import S3Options, S3Storage
from pydantic import ValidationError

from moverd import NotFoundError, Reader, StorageError
from tests.support.faultproxy import FaultProxy
from tests.support.s3 import S3Server

MIB = 1024 * 1024
FAST_RETRIES = {"max_attempts": 3}


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@contextlib.asynccontextmanager
async def opened(options: dict[str, Any], **overrides: Any) -> AsyncIterator[S3Storage]:
    storage = S3Storage("test", S3Options.model_validate({**options, **overrides}))
    try:
        yield storage
    finally:
        await storage.aclose()


async def read_all(reader: Reader, chunk: int = MIB) -> bytes:
    out = bytearray()
    buf = bytearray(chunk)
    view = memoryview(buf)
    try:
        while n := await reader.readinto(view):
            out += view[:n]
    finally:
        await reader.aclose()
    return bytes(out)


async def open_and_read(storage: S3Storage, key: str, *args: Any) -> None:
    """``open_reader`` and a first read, for errors: a reader sends its GET with its first read
    and raises from there, so its ``open_reader`` must not raise."""
    reader = await storage.open_reader(key, *args)  # no I/O: nothing to fail
    try:
        await reader.readinto(memoryview(bytearray(1000)))
    finally:
        await reader.aclose()


async def write(storage: S3Storage, key: str, data: bytes, chunk: int = MIB + 7) -> Any:
    writer = await storage.open_writer(key, size_hint=len(data))
    view = memoryview(data)
    for i in range(0, len(data), chunk):
        await writer.write(view[i : i + chunk])
    await writer.commit()
    return writer


def uploads(s3_server: S3Server, bucket: str) -> list[Any]:
    return list(s3_server.client().list_multipart_uploads(Bucket=bucket).get("Uploads", []))


def keys(s3_server: S3Server, bucket: str) -> list[str]:
    resp = s3_server.client().list_objects_v2(Bucket=bucket)
    return sorted(o["Key"] for o in resp.get("Contents", []))


# -- plugin and options ------------------------------------------------------------------------


def test_registered_through_entry_point(s3_options: dict[str, Any], tmp_path: Path) -> None:
    from moverd.plugins import load_plugins
    from moverd.registry import Context, Registry

    pm, report = load_plugins()
    assert "storage_s3" not in report.broken
    registry = Registry.from_plugins(pm)
    assert registry.storages["s3"].plugin == "storage_s3"
    storage = registry.create_storage("s3", "landing", s3_options, Context(state_dir=tmp_path))
    assert isinstance(storage, S3Storage)
    info = storage.describe()
    assert info == {
        "type": "s3", "name": "landing", "endpoint": s3_options["endpoint_url"], "external_endpoint": None,
        "region": "us-east-1", "bucket": s3_options["bucket"], "prefix": "", "storage_class": None,
        "index_storage_class": "STANDARD", "verification": "read-back", "restore": None,
    }
    assert "testing" not in repr(storage.options)


def test_options_errors(tmp_path: Path) -> None:
    base = {"bucket": "data", "endpoint_url": "http://localhost:9000"}
    cases = [
        ({"colour": "blue"}, "colour", "Extra inputs are not permitted"),
        ({"part_size": "4MiB"}, "part_size", "at least 5 MiB"),
        ({"part_size": "lots"}, "part_size", "not a size"),
        ({"bucket": "ab"}, "bucket", "at least 3 characters"),
        ({"endpoint_url": "minio:9000"}, "endpoint_url", "http:// or https://"),
        ({"prefix": "../up"}, "prefix", "'..' is not allowed"),
        ({"access_key_id": "a"}, "", "give both access_key_id and secret_access_key"),
        (
            {"access_key_id": "a", "secret_access_key_file": str(tmp_path / "nope")},
            "", "secret_access_key_file: secret file", ),
        ({"read_timeout": "soon"}, "read_timeout", "not a duration"),
    ]
    for extra, field, message in cases:
        with pytest.raises(ValidationError) as info:
            S3Options.model_validate({**base, **extra})
        text = str(info.value)
        assert message in text, (extra, text)
        if field:
            assert info.value.errors()[0]["loc"] == (field,), (extra, text)
    (tmp_path / "secret").write_text("s3cr3t\n")
    with pytest.raises(ValidationError, match="give either secret_access_key or secret_access_key_file"):
        S3Options.model_validate(
            {**base, "access_key_id": "a", "secret_access_key": "x",
             "secret_access_key_file": str(tmp_path / "secret")}
        )
    opts = S3Options.model_validate({**base, "part_size": "5MiB", "read_timeout": "5m", "prefix": "./a//b/"})
    assert (opts.part_size, opts.read_timeout, opts.prefix) == (5 * MIB, 300.0, "a/b")


@pytest.mark.anyio
async def test_secret_from_file(s3_options: dict[str, Any], tmp_path: Path) -> None:
    secret = tmp_path / "s3-secret"
    secret.write_text(s3_options.pop("secret_access_key") + "\n")
    key_file = tmp_path / "s3-key"
    key_file.write_text(s3_options.pop("access_key_id"))
    opts = {**s3_options, "secret_access_key_file": str(secret), "access_key_id_file": str(key_file)}
    async with opened(opts) as storage:
        assert storage.options.secret_access_key is not None
        assert storage.options.secret_access_key.get_secret_value() == "testing"
        assert "testing" not in str(storage.describe())
        await write(storage, "x", b"hello")
        assert await read_all(await storage.open_reader("x")) == b"hello"


# -- writing and reading -----------------------------------------------------------------------


@pytest.mark.anyio
async def test_small_round_trip_is_one_put(s3_options: dict[str, Any], s3_server: S3Server) -> None:
    async with opened(s3_options) as storage:
        data = os.urandom(1000)
        writer = await write(storage, "dir/small.bin", data, chunk=300)
        assert writer.parts_in_flight_peak == 0 and writer.buffers_allocated == 1
        assert await read_all(await storage.open_reader("dir/small.bin")) == data
        info = await storage.stat("dir/small.bin")
        assert (info.key, info.size) == ("dir/small.bin", 1000)
        assert info.etag and "-" not in info.etag and '"' not in info.etag
        assert info.mtime > 1.6e9 and info.mode is None
        # empty object, and an object of exactly one part: still no multipart upload
        await write(storage, "empty", b"")
        assert (await storage.stat("empty")).size == 0
        assert await read_all(await storage.open_reader("empty")) == b""
        one_part = os.urandom(5 * MIB)
        await write(storage, "one-part", one_part)
        assert "-" not in ((await storage.stat("one-part")).etag or "")
    assert uploads(s3_server, s3_options["bucket"]) == []


@pytest.mark.anyio
async def test_multipart_round_trip(s3_options: dict[str, Any], s3_server: S3Server) -> None:
    data = os.urandom(12 * MIB + 12345)
    async with opened(s3_options, part_size="5MiB", upload_concurrency=2) as storage:
        writer = await write(storage, "big/blob.tar", data)
        # three parts, bounded memory: at most concurrency + 1 part buffers, 2 uploads at once
        assert writer.buffers_allocated <= 3
        assert 1 <= writer.parts_in_flight_peak <= 2
        info = await storage.stat("big/blob.tar")
        assert info.size == len(data) and info.etag is not None and info.etag.endswith("-3")
        assert await read_all(await storage.open_reader("big/blob.tar"), chunk=3 * MIB) == data
        body = s3_server.client().get_object(Bucket=s3_options["bucket"], Key="big/blob.tar")["Body"].read()
        assert body == data
    assert uploads(s3_server, s3_options["bucket"]) == []


@pytest.mark.anyio
async def test_an_object_beyond_the_part_limit_is_written_in_bigger_parts(
    s3_options: dict[str, Any], s3_server: S3Server, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """S3 takes at most 10 000 parts (here lowered to 3, the rest is real): an object whose size
    hint needs more at part_size goes in bigger parts; one that outgrows its hint fails at the
    part past the limit, naming the setting, and leaves no upload behind."""
    from moverd_storage_s3 import writer as writer_module

    monkeypatch.setattr(writer_module, "MAX_PARTS", 3)
    bucket = s3_options["bucket"]
    data = os.urandom(20 * MIB)
    caplog.set_level("INFO", logger="moverd_storage_s3")
    async with opened(s3_options, part_size="5MiB", upload_concurrency=2) as storage:
        writer = await write(storage, "big/over.tar", data)
        # 20 MiB (+1 %) in 3 parts: 7 MiB each, the last one shorter
        assert (await storage.stat("big/over.tar")).etag.endswith("-3")  # type: ignore[union-attr]
        assert writer.buffers_allocated <= 3
        assert await read_all(await storage.open_reader("big/over.tar")) == data
        assert "parts of 7.0 MiB instead of part_size 5.0 MiB" in caplog.text
        # the hint said 10 MiB, more came: part 4 would be refused by S3, the writer stops first,
        # in a write (21 MiB: a fifth part's bytes arrive) or at the commit (exactly 4 parts)
        for size in (21 * MIB, 20 * MIB):
            short = await storage.open_writer("big/outgrown.tar", size_hint=10 * MIB)
            with pytest.raises(StorageError, match=r"outgrew 3 parts of 5\.0 MiB \(more than 15\.0 MiB\), the "
                               r"most S3 takes; raise part_size \(now 5\.0 MiB\)"):
                more = data + os.urandom(size - len(data))
                for i in range(0, size, MIB):
                    await short.write(more[i : i + MIB])
                await short.commit()
            await short.abort()
            assert uploads(s3_server, bucket) == []
            assert "big/outgrown.tar" not in keys(s3_server, bucket)
    # beyond even 5 GiB parts: refused when the writer opens, before anything is sent
    with pytest.raises(StorageError, match=r"cannot be uploaded: S3 takes at most 3 parts of 5\.0 GiB"):
        writer_module.part_size_for(5 * MIB, 16 * 1024**3)
    # within 3 parts of 5 GiB, but not with the 1 % margin: the margin gives way
    assert writer_module.part_size_for(5 * MIB, 15 * 1024**3 - 1) == 5 * 1024**3


@pytest.mark.anyio
async def test_commit_replaces_and_writer_is_single_use(s3_options: dict[str, Any]) -> None:
    async with opened(s3_options) as storage:
        await write(storage, "k", b"old")
        writer = await write(storage, "k", b"new!")
        assert await read_all(await storage.open_reader("k")) == b"new!"
        with pytest.raises(StorageError, match="already committed"):
            await writer.write(b"more")
        await writer.abort()  # after commit: a no-op, the object stays
        assert (await storage.stat("k")).size == 4


@pytest.mark.anyio
async def test_abort_leaves_nothing(s3_options: dict[str, Any], s3_server: S3Server) -> None:
    bucket = s3_options["bucket"]
    async with opened(s3_options, part_size="5MiB") as storage:
        writer = await storage.open_writer("partial.tar")
        await writer.write(os.urandom(11 * MIB))  # two parts under way, the third filling
        assert len(uploads(s3_server, bucket)) == 1
        await writer.abort()
        await writer.abort()  # twice is fine
        assert uploads(s3_server, bucket) == []
        small = await storage.open_writer("small")
        await small.write(b"abc")
        await small.abort()
        with pytest.raises(StorageError, match="already aborted"):
            await small.commit()
    assert keys(s3_server, bucket) == []


@pytest.mark.anyio
async def test_cancelled_writer_is_aborted_cleanly(s3_options: dict[str, Any], s3_server: S3Server) -> None:
    chunk = memoryview(os.urandom(MIB))
    async with opened(s3_options, part_size="5MiB", upload_concurrency=2) as storage:
        writer = await storage.open_writer("cancelled.tar")
        with anyio.move_on_after(0.3) as scope:
            while True:  # the pipeline's consumer, cancelled while parts are in flight
                await writer.write(chunk)
        assert scope.cancelled_caught
        assert writer.buffers_allocated <= 3  # memory stayed bounded however much was written
        with anyio.CancelScope(shield=True):
            await writer.abort()
    assert uploads(s3_server, s3_options["bucket"]) == []
    assert keys(s3_server, s3_options["bucket"]) == []


@pytest.mark.anyio
async def test_ranged_reads(s3_options: dict[str, Any]) -> None:
    data = os.urandom(3 * MIB + 17)
    size = len(data)
    async with opened(s3_options) as storage:
        await write(storage, "r.bin", data)
        for offset, length in [(0, 10), (5, None), (MIB - 1, MIB + 2), (size - 3, None), (size - 3, 100),
                               (size, None), (size, 0), (0, 0), (0, size)]:
            reader = await storage.open_reader("r.bin", offset, length, uncached=True)
            got = await read_all(reader, chunk=100_000)
            end = size if length is None else offset + length
            assert got == data[offset:end], (offset, length)
        with pytest.raises(StorageError, match=f"offset {size + 1} is beyond the end \\({size} bytes\\)"):
            await open_and_read(storage, "r.bin", size + 1)
        # a reader closed early releases its connection and reads nothing more
        reader = await storage.open_reader("r.bin")
        buf = bytearray(1000)
        assert await reader.readinto(memoryview(buf)) > 0
        await reader.aclose()
        assert await reader.readinto(memoryview(buf)) == 0


@pytest.mark.anyio
async def test_not_found(s3_options: dict[str, Any]) -> None:
    bucket = s3_options["bucket"]
    async with opened(s3_options) as storage:
        with pytest.raises(NotFoundError, match=f"s3 {bucket}/no/such: no such object"):
            await storage.stat("no/such")
        with pytest.raises(NotFoundError, match=f"s3 {bucket}/missing: no such object"):
            await open_and_read(storage, "missing")
        with pytest.raises(NotFoundError):
            await storage.open_reader("missing", 0, 0)
        assert not await storage.exists("missing")
        await storage.delete("missing")  # deleting a missing object is fine
    async with opened(s3_options, bucket="no-such-bucket-here") as storage:
        with pytest.raises(NotFoundError, match="bucket 'no-such-bucket-here' does not exist at http://"):
            await open_and_read(storage, "x")


@pytest.mark.anyio
async def test_create_bucket_option(s3_options: dict[str, Any], s3_server: S3Server) -> None:
    name = s3_options["bucket"] + "-new"
    async with opened(s3_options, bucket=name, create_bucket=True) as storage:
        await write(storage, "a", b"1")
    async with opened(s3_options, bucket=name, create_bucket=True) as storage:  # exists: fine
        assert [i.key async for i in storage.list()] == ["a"]
    assert keys(s3_server, name) == ["a"]
    other = s3_options["bucket"] + "-listed-first"
    async with opened(s3_options, bucket=other, create_bucket=True) as storage:
        assert [i.key async for i in storage.list()] == []  # created by the first listing
    assert keys(s3_server, other) == []


# -- listing, prefixes, deleting -------------------------------------------------------------


@pytest.mark.anyio
async def test_prefix_handling(s3_options: dict[str, Any], s3_server: S3Server) -> None:
    bucket = s3_options["bucket"]
    client = s3_server.client()
    for key in ("archive/v1x/outside", "other/y", "archive/v1"):
        client.put_object(Bucket=bucket, Key=key, Body=b"-")
    client.put_object(Bucket=bucket, Key="archive/v1/marker/", Body=b"")  # console "folder"
    async with opened(s3_options, prefix="archive/v1") as storage:
        await write(storage, "ds/a.txt", b"a")
        await write(storage, "ds/sub/b.txt", b"bb")
        await write(storage, "dsx/c.txt", b"ccc")
        assert sorted(i.key for i in [i async for i in storage.list()]) == [
            "ds/a.txt", "ds/sub/b.txt", "dsx/c.txt",
        ]
        listed = {i.key: i.size async for i in storage.list("ds")}
        assert listed == {"ds/a.txt": 1, "ds/sub/b.txt": 2}  # a folder: not "dsx"
        assert [i.key async for i in storage.list("ds/sub/")] == ["ds/sub/b.txt"]
        assert [i.key async for i in storage.list("ds/a.txt")] == []
        assert (await storage.stat("ds/a.txt")).key == "ds/a.txt"
        assert await storage.delete_prefix("ds") == 2
        await storage.delete("dsx/c.txt")
        assert [i async for i in storage.list()] == []
    assert keys(s3_server, bucket) == ["archive/v1", "archive/v1/marker/", "archive/v1x/outside", "other/y"]


@pytest.mark.anyio
async def test_list_and_delete_beyond_1000(s3_options: dict[str, Any], s3_server: S3Server) -> None:
    bucket = s3_options["bucket"]
    client = s3_server.client()
    names = [f"many/{i:05d}" for i in range(1003)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: client.put_object(Bucket=bucket, Key=k, Body=b"x"), names))
    client.put_object(Bucket=bucket, Key="keep/me", Body=b"x")
    async with opened(s3_options) as storage:
        listed = [i async for i in storage.list("many")]
        assert sorted(i.key for i in listed) == names
        assert all(i.size == 1 and i.etag for i in listed)
        assert await storage.delete_prefix("many") == 1003
        assert [i.key async for i in storage.list()] == ["keep/me"]


# -- presigned URLs --------------------------------------------------------------------------


@pytest.mark.anyio
async def test_presign(s3_options: dict[str, Any], s3_server: S3Server) -> None:
    data = os.urandom(300_000)
    async with opened(s3_options, prefix="retrieve") as storage:
        await write(storage, "ds1/block 1.tar", data)
        url = await storage.presign("ds1/block 1.tar", timedelta(hours=1))
        path = f"/{s3_options['bucket']}/retrieve/ds1/block%201.tar?"
        assert url.startswith(s3_options["endpoint_url"] + path)
        assert "X-Amz-Expires=3600" in url and "X-Amz-Signature=" in url
        async with httpx.AsyncClient() as http:
            resp = await http.get(url)
        assert resp.status_code == 200 and resp.content == data
        for bad, message in [(timedelta(days=7, seconds=1), "at most 7 days"), (timedelta(0), "positive")]:
            with pytest.raises(ValueError, match=message):
                await storage.presign("ds1/block 1.tar", bad)
        await storage.presign("ds1/block 1.tar", timedelta(days=7))  # the limit itself is fine

    external = f"http://localhost:{s3_server.port}"
    async with opened(s3_options, prefix="retrieve", external_endpoint_url=external + "/") as storage:
        url = await storage.presign("ds1/block 1.tar", timedelta(minutes=5))
        assert urlsplit(url).netloc == f"localhost:{s3_server.port}"
        assert storage.describe()["external_endpoint"] == external
        async with httpx.AsyncClient() as http:
            resp = await http.get(url)
        assert resp.status_code == 200 and resp.content == data


# -- faults ----------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_retries_survive_503_bursts(
    s3_options: dict[str, Any], s3_server: S3Server, s3_fault_proxy: FaultProxy
) -> None:
    data = os.urandom(11 * MIB)
    opts = {**s3_options, "endpoint_url": s3_fault_proxy.url, **FAST_RETRIES}
    async with opened(opts, part_size="5MiB") as storage:
        s3_fault_proxy.fail_next(2, status=503, method="PUT")  # SlowDown on the first parts
        await write(storage, "w.bin", data)
        s3_fault_proxy.fail_next(1, status=500, method="GET")
        s3_fault_proxy.fail_next(1, status=503, code="ServiceUnavailable", method="GET")
        assert await read_all(await storage.open_reader("w.bin")) == data
        s3_fault_proxy.fail_next(1, status=503, method="POST")  # create multipart upload
        await write(storage, "w2.bin", data)
        s3_fault_proxy.drop_next(2, method="PUT")  # connections reset while sending a part
        await write(storage, "w3.bin", data)
        assert await read_all(await storage.open_reader("w3.bin")) == data
    assert s3_fault_proxy.faults == 7
    assert uploads(s3_server, s3_options["bucket"]) == []
    assert keys(s3_server, s3_options["bucket"]) == ["w.bin", "w2.bin", "w3.bin"]


@pytest.mark.anyio
@pytest.mark.parametrize("rst", [True, False], ids=["reset", "early-close"])
async def test_broken_read_is_resumed(
    s3_options: dict[str, Any], s3_fault_proxy: FaultProxy, s3_server: S3Server, rst: bool
) -> None:
    data = os.urandom(3 * MIB)
    s3_server.client().put_object(Bucket=s3_options["bucket"], Key="r.bin", Body=data)
    opts = {**s3_options, "endpoint_url": s3_fault_proxy.url, **FAST_RETRIES}
    async with opened(opts) as storage:
        s3_fault_proxy.reset_next(2, after_bytes=700_000, rst=rst)  # the first GET and its resume
        reader = await storage.open_reader("r.bin")
        assert await read_all(reader, chunk=256 * 1024) == data
        assert reader.resumes == 2
        s3_fault_proxy.reset_next(1, after_bytes=100_000, rst=rst)  # a ranged read too
        reader = await storage.open_reader("r.bin", MIB, MIB)
        assert await read_all(reader) == data[MIB : 2 * MIB]
        assert reader.resumes == 1


@pytest.mark.anyio
async def test_object_replaced_during_resumed_read(
    s3_options: dict[str, Any], s3_fault_proxy: FaultProxy, s3_server: S3Server
) -> None:
    bucket = s3_options["bucket"]
    s3_server.client().put_object(Bucket=bucket, Key="v.bin", Body=os.urandom(2 * MIB))
    opts = {**s3_options, "endpoint_url": s3_fault_proxy.url, **FAST_RETRIES}
    async with opened(opts) as storage:
        s3_fault_proxy.reset_next(1, after_bytes=256 * 1024)
        reader = await storage.open_reader("v.bin")
        # a lean reader sends its GET with its first read: replace the object after that
        assert await reader.readinto(memoryview(bytearray(1000))) > 0
        s3_server.client().put_object(Bucket=bucket, Key="v.bin", Body=os.urandom(2 * MIB))
        with pytest.raises(StorageError, match=f"s3 {bucket}/v.bin: the object was replaced"):
            await read_all(reader)


@pytest.mark.anyio
async def test_persistent_failure_is_a_storage_error(
    s3_options: dict[str, Any], s3_server: S3Server, s3_fault_proxy: FaultProxy
) -> None:
    bucket = s3_options["bucket"]
    s3_server.client().put_object(Bucket=bucket, Key="there", Body=b"x")
    opts = {**s3_options, "endpoint_url": s3_fault_proxy.url, **FAST_RETRIES, "max_attempts": 2}
    async with opened(opts, part_size="5MiB") as storage:
        s3_fault_proxy.fail_always(status=503, method="PUT")
        writer = await storage.open_writer("w.bin")
        with pytest.raises(StorageError, match=f"s3 {bucket}/w.bin: upload failed: SlowDown") as info:
            await writer.write(os.urandom(6 * MIB))
            await writer.commit()
        assert "upload aborted" in str(info.value)
        assert uploads(s3_server, bucket) == []  # aborted before raising
        with pytest.raises(StorageError, match=f"s3 {bucket}/small: upload failed: SlowDown"):
            await write(storage, "small", b"tiny")
    s3_fault_proxy.clear()
    async with opened({**opts, "max_attempts": 1}) as storage:  # reads: no retries, to stay fast
        s3_fault_proxy.fail_always(status=500, method="GET")
        with pytest.raises(StorageError, match=f"s3 {bucket}/there: InternalError") as err:
            await open_and_read(storage, "there")
        assert not isinstance(err.value, NotFoundError)
        s3_fault_proxy.fail_always(status=500, method="HEAD")
        with pytest.raises(StorageError, match=f"s3 {bucket}/there"):
            await storage.stat("there")
        s3_fault_proxy.clear()
        s3_fault_proxy.reset_next(100, after_bytes=10)
        reader = await storage.open_reader("there", 0, None)
        assert await read_all(reader) == b"x"  # shorter than the cut: unharmed
    assert keys(s3_server, bucket) == ["there"]


@pytest.mark.anyio
async def test_stream_that_never_recovers(
    s3_options: dict[str, Any], s3_server: S3Server, s3_fault_proxy: FaultProxy
) -> None:
    bucket = s3_options["bucket"]
    s3_server.client().put_object(Bucket=bucket, Key="r", Body=os.urandom(MIB))
    opts = {**s3_options, "endpoint_url": s3_fault_proxy.url, **FAST_RETRIES, "max_attempts": 2}
    async with opened(opts) as storage:
        s3_fault_proxy.reset_next(3, after_bytes=0)  # the GET and each resume: no body at all
        reader = await storage.open_reader("r")
        with pytest.raises(StorageError, match=f"s3 {bucket}/r: read at byte 0 \\(resumed\\) failed"):
            await read_all(reader)


@pytest.mark.anyio
async def test_unreachable_endpoint(s3_options: dict[str, Any]) -> None:
    from tests.support.s3 import free_port

    endpoint = f"http://127.0.0.1:{free_port()}"
    bucket = s3_options["bucket"]
    opts = {**s3_options, "endpoint_url": endpoint, "max_attempts": 1, "connect_timeout": 1}
    async with opened(opts) as storage:
        with pytest.raises(StorageError, match=f"s3 {bucket}/k: cannot talk to {endpoint}"):
            await storage.stat("k")
        with pytest.raises(StorageError, match=f"s3 {bucket}/k: cannot talk to {endpoint}"):
            await open_and_read(storage, "k")
        with pytest.raises(StorageError, match=f"s3 {bucket}/d/: list failed: cannot talk to {endpoint}"):
            [i async for i in storage.list("d")]
        with pytest.raises(StorageError, match=endpoint):
            await write(storage, "k", b"data")


def test_no_expedited_restore_from_deep_archive(s3_options: dict[str, Any]) -> None:
    """S3 refuses an Expedited restore of a DEEP_ARCHIVE object: the configuration says so at
    load, not the first retrieval, perhaps years later."""
    with pytest.raises(ValidationError, match="no Expedited restore from DEEP_ARCHIVE; choose Standard"):
        S3Options(**{**s3_options, "storage_class": "deep_archive", "restore_tier": "Expedited"})
    assert S3Options(**{**s3_options, "storage_class": "GLACIER", "restore_tier": "Expedited"}).cold
    assert S3Options(**{**s3_options, "storage_class": "DEEP_ARCHIVE", "restore_tier": "Bulk"}).cold


@pytest.mark.anyio
async def test_expedited_restore_without_capacity_falls_back_to_standard(
    s3_options: dict[str, Any], s3_server: S3Server, s3_fault_proxy: FaultProxy, caplog: pytest.LogCaptureFixture
) -> None:
    """Expedited capacity is not guaranteed: when S3 answers GlacierExpeditedRetrievalNotAvailable
    (503) after botocore's retries, the restore is asked again in the Standard tier, with a
    warning, instead of failing the retrieval. Other refusals still fail."""
    s3_server.client().put_object(Bucket=s3_options["bucket"], Key="cold/k", Body=b"x", StorageClass="GLACIER")
    opts = {**s3_options, "endpoint_url": s3_fault_proxy.url, "max_attempts": 2, "restore_tier": "Expedited",
            "storage_class": "GLACIER"}
    async with opened(opts) as storage:
        assert (await storage.restore_state("cold/k")).value == "archived"
        s3_fault_proxy.fail_next(2, status=503, code="GlacierExpeditedRetrievalNotAvailable", method="POST")
        await storage.request_restore("cold/k")
        posts = [t for m, t, _ in s3_fault_proxy.seen if m == "POST" and t.endswith("?restore")]
        assert len(posts) == 3  # two Expedited attempts refused, then the Standard one
        assert "no Expedited restore available for cold/k now; asking for a Standard one" in caplog.text
        assert (await storage.restore_state("cold/k")).value in ("in_progress", "available")
        # The next restore goes as Standard straight away: one request, no warning.
        s3_server.client().put_object(Bucket=s3_options["bucket"], Key="cold/k2", Body=b"y", StorageClass="GLACIER")
        caplog.clear()
        await storage.request_restore("cold/k2")
        posts = [t for m, t, _ in s3_fault_proxy.seen if m == "POST" and t.endswith("?restore")]
        assert len(posts) == 4 and "Expedited" not in caplog.text
        s3_fault_proxy.fail_next(2, status=503, code="SlowDown", method="POST")
        with pytest.raises(StorageError, match="SlowDown"):
            await storage.request_restore("cold/k")
