"""The ``s3`` storage's lean client (GET, list, HEAD in worker threads on urllib3, signed by
botocore) against a real S3 server (moto over HTTP, over TLS through a terminating proxy, and
through a forward proxy of the environment), compared with what boto3 reads where both apply."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from moverd_storage_s3.lean import LeanReader

from moverd import NotFoundError, StorageError, UnsafePathError
from tests.support.faultproxy import FaultProxy, only_proxy
from tests.support.s3 import S3Server
from tests.support.tlsproxy import TLSProxy
from tests.test_storage_s3 import FAST_RETRIES, MIB, opened, read_all

pytestmark = pytest.mark.anyio

AWKWARD_KEYS = [
    "plain.bin",
    "with space/and more spaces.txt",
    "plus+sign/a+b+c.tar",
    "percent%20literal/100%.dat",
    "tilde~/x~y",
    "unicode/ÄÖÜ ß/日本語 ファイル.bin",
    "xml/&amp; <tag> 'quote' \"dq\".txt",
    "ctl/tab\there bell\x07.txt",  # control characters: XML 1.0 cannot carry them raw
    "deep/" + "é" * 200 + "/end",
]


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


async def blocking_read_all(reader: Any, chunk: int = MIB) -> tuple[bytes, list[int], str]:
    """Read as the core does: one thread hop per chunk that both receives and hashes it."""
    out = bytearray()
    sizes: list[int] = []
    md5 = hashlib.md5()
    view = memoryview(bytearray(chunk))

    def step() -> int:
        n: int = reader.readinto_blocking(view)
        md5.update(view[:n])
        return n

    try:
        while n := await anyio.to_thread.run_sync(step, limiter=reader.limiter):
            sizes.append(n)
            out += view[:n]
    finally:
        await reader.aclose()
    return bytes(out), sizes, md5.hexdigest()


async def test_awkward_keys_round_trip(s3_options: dict[str, Any], s3_server: S3Server) -> None:
    client = s3_server.client()
    bucket = s3_options["bucket"]
    bodies = {key: f"body of {key!r}".encode() * (i + 1) for i, key in enumerate(AWKWARD_KEYS)}
    for key, body in bodies.items():
        client.put_object(Bucket=bucket, Key=f"top/{key}", Body=body)
    async with opened(s3_options, prefix="top") as storage:
        listed = {info.key: info async for info in storage.list()}
        assert sorted(listed) == sorted(AWKWARD_KEYS)
        for key, body in bodies.items():
            if any(ord(c) < 0x20 for c in key):
                continue  # listed faithfully, but moverd refuses such keys for reading
            assert listed[key].size == len(body)
            assert listed[key].etag == hashlib.md5(body).hexdigest()
            assert await read_all(await storage.open_reader(key)) == body
            assert await read_all(await storage.open_reader(key, 3, 5)) == body[3:8]
            info = await storage.stat(key)
            assert (info.key, info.size, info.etag) == (key, len(body), listed[key].etag)
            assert abs(info.mtime - listed[key].mtime) < 1  # HEAD gives whole seconds
        assert [i.key async for i in storage.list("unicode/ÄÖÜ ß")] == ["unicode/ÄÖÜ ß/日本語 ファイル.bin"]


async def test_listing_and_stat_match_boto3s(s3_options: dict[str, Any], s3_server: S3Server) -> None:
    """What the lean client parses out of ListObjectsV2 and HEAD is what boto3 parses."""
    client = s3_server.client()
    bucket = s3_options["bucket"]
    for i, key in enumerate(AWKWARD_KEYS):
        client.put_object(Bucket=bucket, Key=f"p/{key}", Body=os.urandom(i * 1000))
    client.put_object(Bucket=bucket, Key="p/folder/", Body=b"")
    expected = {
        obj["Key"][2:]: (obj["Size"], obj["ETag"].strip('"'), obj["LastModified"].timestamp())
        for obj in client.list_objects_v2(Bucket=bucket, Prefix="p/")["Contents"] if not obj["Key"].endswith("/")
    }
    async with opened(s3_options, prefix="p") as storage:
        listed = {i.key: (i.size, i.etag, i.mtime) async for i in storage.list()}
        assert listed == expected
        assert len(listed) == len(AWKWARD_KEYS)
        for key in ("plain.bin", "unicode/ÄÖÜ ß/日本語 ファイル.bin"):
            head = client.head_object(Bucket=bucket, Key=f"p/{key}")
            info = await storage.stat(key)
            assert (info.size, info.etag, info.mtime) == (
                head["ContentLength"], head["ETag"].strip('"'), head["LastModified"].timestamp()
            )


async def test_lean_listing_pages_beyond_1000(s3_options: dict[str, Any], s3_server: S3Server) -> None:
    from concurrent.futures import ThreadPoolExecutor

    client = s3_server.client()
    bucket = s3_options["bucket"]
    names = [f"many/{i:05d} é+x" for i in range(2010)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: client.put_object(Bucket=bucket, Key=k, Body=b"x"), names))
    async with opened(s3_options) as storage:
        assert storage._fast is not None
        page, token = await storage._fast.list_page("many/", None)
        assert len(page) == 1000 and token  # really paged
        listed = [i.key async for i in storage.list("many")]
        assert listed == sorted(names)


async def test_blocking_reads_fill_chunks_and_resume(
    s3_options: dict[str, Any], s3_server: S3Server, s3_fault_proxy: FaultProxy
) -> None:
    data = os.urandom(3 * MIB + 123)
    s3_server.client().put_object(Bucket=s3_options["bucket"], Key="r.bin", Body=data)
    opts = {**s3_options, "endpoint_url": s3_fault_proxy.url, **FAST_RETRIES}
    async with opened(opts) as storage:
        reader = await storage.open_reader("r.bin")
        assert isinstance(reader, LeanReader)
        got, sizes, digest = await blocking_read_all(reader)
        assert got == data and digest == hashlib.md5(data).hexdigest()
        assert sizes == [MIB, MIB, MIB, 123]  # whole chunks, as the core wants them
        assert reader.resumes == 0

        # the first GET and its first resume break mid-body (a reset, then an early close)
        s3_fault_proxy.reset_next(1, after_bytes=700_000, rst=True)
        s3_fault_proxy.reset_next(1, after_bytes=900_000, rst=False)
        reader = await storage.open_reader("r.bin")
        got, sizes, digest = await blocking_read_all(reader)
        assert got == data and digest == hashlib.md5(data).hexdigest()
        assert sizes == [MIB, MIB, MIB, 123]
        assert reader.resumes == 2

        # a ranged read breaking too; async and blocking reads mixed on one reader
        s3_fault_proxy.reset_next(1, after_bytes=100_000)
        reader = await storage.open_reader("r.bin", MIB - 5, MIB + 10)
        assert isinstance(reader, LeanReader)
        view = memoryview(bytearray(1000))
        first = await reader.readinto(view)
        head = bytes(view[:first])
        rest, _, _ = await blocking_read_all(reader, chunk=256 * 1024)
        assert head + rest == data[MIB - 5 : 2 * MIB + 5]
        assert reader.resumes == 1
        assert reader.readinto_blocking(view) == 0  # closed: nothing more


async def test_object_replaced_during_blocking_resume(
    s3_options: dict[str, Any], s3_server: S3Server, s3_fault_proxy: FaultProxy
) -> None:
    bucket = s3_options["bucket"]
    s3_server.client().put_object(Bucket=bucket, Key="v.bin", Body=os.urandom(2 * MIB))
    async with opened({**s3_options, "endpoint_url": s3_fault_proxy.url, **FAST_RETRIES}) as storage:
        s3_fault_proxy.reset_next(1, after_bytes=256 * 1024)
        reader = await storage.open_reader("v.bin")
        assert await read_blocking(reader, memoryview(bytearray(1000))) == 1000  # the GET is sent
        s3_server.client().put_object(Bucket=bucket, Key="v.bin", Body=os.urandom(2 * MIB))
        with pytest.raises(StorageError, match=f"s3 {bucket}/v.bin: the object was replaced"):
            await blocking_read_all(reader)


async def test_lean_listing_errors(s3_options: dict[str, Any], s3_fault_proxy: FaultProxy) -> None:
    bucket = s3_options["bucket"]
    opts = {**s3_options, "max_attempts": 2}
    async with opened(opts, bucket="no-such-bucket-here") as storage:
        with pytest.raises(StorageError, match="bucket 'no-such-bucket-here' does not exist at http://"):
            [i async for i in storage.list()]
    async with opened({**opts, "endpoint_url": s3_fault_proxy.url}) as storage:
        s3_fault_proxy.fail_next(1, status=503, method="GET")  # retried
        assert [i async for i in storage.list()] == []
        s3_fault_proxy.fail_always(status=403, code="AccessDenied", method="GET")
        with pytest.raises(StorageError, match=f"s3 {bucket}/x/: list failed: AccessDenied: Injected fault"):
            [i async for i in storage.list("x")]


async def test_cancelled_lean_read_lets_go_of_its_connection(s3_options: dict[str, Any]) -> None:
    """A server that accepts the GET and never answers: cancelling the waiting task must stop the
    worker thread blocked on the socket (the server sees the connection end) long before
    ``read_timeout``, and the reader is unusable afterwards."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.settimeout(60)
        endpoint = f"http://127.0.0.1:{listener.getsockname()[1]}"
        async with opened(s3_options, endpoint_url=endpoint, read_timeout=600, max_attempts=1) as storage:
            reader = await storage.open_reader("k")  # lazy: the GET goes with the first read
            buf = memoryview(bytearray(1000))
            with anyio.move_on_after(0.3) as scope:
                await reader.readinto(buf)
            assert scope.cancelled_caught

            def drain() -> bytes:
                conn, _ = listener.accept()
                with conn:
                    conn.settimeout(60)  # a guard: without the interrupt, this would time out
                    data = b""
                    while chunk := conn.recv(65536):
                        data += chunk
                    return data

            request = await anyio.to_thread.run_sync(drain)
            assert request.startswith(b"GET /" + s3_options["bucket"].encode() + b"/k HTTP/1.1\r\n")
            with pytest.raises(StorageError, match="a read was cancelled"):
                await reader.readinto(buf)
            await reader.aclose()


@pytest.mark.parametrize("mode", ["http", "https", "https-via-https-proxy"])
async def test_cancelled_read_mid_body_lets_go_of_its_connection(
    s3_options: dict[str, Any], tmp_path: Path, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server that sends the head and part of the body, then goes silent: cancelling the read
    wakes the worker thread blocked in the body (the server sees the connection end within
    seconds, not ``read_timeout``), over TLS as over plain HTTP, and with TLS inside the TLS of
    an ``https://`` proxy (urllib3's ``SSLTransport``, not a socket, is what the thread reads)."""
    tls = mode != "http"
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.settimeout(60)
        ended: list[float] = []

        def serve() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(60)  # a guard: without the interrupt, this would time out
                conn.recv(65536)
                conn.sendall(b'HTTP/1.1 200 OK\r\nContent-Length: 100000\r\nETag: "e"\r\n\r\n' + b"x" * 400)
                while conn.recv(65536):
                    pass
                ended.append(time.monotonic())

        with contextlib.ExitStack() as stack:
            endpoint = f"http://127.0.0.1:{listener.getsockname()[1]}"
            extra: dict[str, Any] = {}
            if tls:
                proxy = stack.enter_context(TLSProxy("127.0.0.1", listener.getsockname()[1], tmp_path))
                endpoint, extra = proxy.url, {"ca_bundle": str(proxy.ca_bundle)}
            if mode == "https-via-https-proxy":
                _, secure = stack.enter_context(https_forward_proxy(tmp_path / "proxy-tls"))
                extra = {"ca_bundle": str(bundle_of(tmp_path / "both-cas.pem", proxy, secure))}
                only_proxy(monkeypatch, "HTTPS_PROXY", secure.url)
            async with anyio.create_task_group() as tg:
                tg.start_soon(anyio.to_thread.run_sync, serve)
                async with opened(s3_options, endpoint_url=endpoint, read_timeout=600, max_attempts=1,
                                  **extra) as storage:
                    reader = await storage.open_reader("k")
                    buf = memoryview(bytearray(MIB))
                    with anyio.move_on_after(0.5) as scope:
                        await reader.readinto(buf)
                    assert scope.cancelled_caught
                    cancelled = time.monotonic()
                    with anyio.fail_after(10):
                        while not ended:
                            await anyio.sleep(0.05)
                    assert ended[0] - cancelled < 5
                    with pytest.raises(StorageError, match="a read was cancelled"):
                        await reader.readinto(buf)


@pytest.mark.parametrize("stall", ["before the answer", "in the body"])
async def test_lean_read_times_out_after_read_timeout(s3_options: dict[str, Any], stall: str) -> None:
    """A server that goes silent (before its answer, or after half the body): the read fails
    with a timeout after ``read_timeout``, not never (the resume
    it tries finds the server gone), and the bytes counted are the object's."""
    body = b"x" * 1000
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        endpoint = f"http://127.0.0.1:{listener.getsockname()[1]}"

        def serve() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.recv(65536)
                if stall == "in the body":
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\nETag: \"e\"\r\n\r\n" + body[:400])
                conn.recv(65536)  # until the client gives up and closes

        async with anyio.create_task_group() as tg:
            tg.start_soon(anyio.to_thread.run_sync, serve)
            async with opened(s3_options, endpoint_url=endpoint, read_timeout=0.5, max_attempts=1) as storage:
                reader = await storage.open_reader("k")
                buf = memoryview(bytearray(1000))
                got = 0
                # A buffer is filled whole: the 400 bytes that came are not counted, so the
                # resume starts at byte 0 (and would overwrite them with the same bytes).
                resumed = r" \(resumed at byte 0\)" if stall == "in the body" else ""
                with anyio.fail_after(10):
                    with pytest.raises(
                        StorageError,
                        match=f"^s3 {endpoint}: no answer to GET {s3_options['bucket']}/k{resumed} within 0.5 s$",
                    ):
                        while True:
                            n = await reader.readinto(buf[got:])
                            assert n > 0
                            got += n
                await reader.aclose()
        assert bytes(buf[:got]) == body[:got]


# -- lazy open: the GET goes with the first read ------------------------------------------------


def count_calls(monkeypatch: pytest.MonkeyPatch, obj: Any, name: str) -> list[str]:
    """Record each call of ``obj.name`` (which still runs), from any thread."""
    calls: list[str] = []
    original = getattr(obj, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls.append(name)
        return original(*args, **kwargs)

    monkeypatch.setattr(obj, name, wrapper)
    return calls


def socket_fds() -> int:
    """Sockets open in this process."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
        except OSError:
            pass
    return count


async def read_blocking(reader: Any, buf: memoryview) -> int:
    """One ``readinto_blocking`` in a worker thread, as the core calls it."""
    n: int = await anyio.to_thread.run_sync(reader.readinto_blocking, buf, limiter=reader.limiter)
    return n


async def test_lazy_open_missing_object_raises_from_first_read(
    s3_options: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket = s3_options["bucket"]
    buf = memoryview(bytearray(1000))
    async with opened(s3_options) as storage:
        assert storage._fast is not None
        exchanges = count_calls(monkeypatch, storage._fast, "send")
        for args in [(), (10, 100)]:
            reader = await storage.open_reader("missing", *args)
            assert isinstance(reader, LeanReader) and exchanges == []  # no I/O yet
            with pytest.raises(NotFoundError, match=f"^s3 {bucket}/missing: no such object$"):
                await reader.readinto(buf)
            await reader.aclose()
            reader = await storage.open_reader("missing", *args)
            with pytest.raises(NotFoundError, match=f"^s3 {bucket}/missing: no such object$"):
                await read_blocking(reader, buf)
            await reader.aclose()
            exchanges.clear()
        with pytest.raises(ValueError):
            await storage.open_reader("missing", -1)  # bad arguments still raise at once
        with pytest.raises(UnsafePathError):
            await storage.open_reader("../escape")
        assert exchanges == []
    endpoint = re.escape(s3_options["endpoint_url"])
    async with opened(s3_options, bucket="no-such-bucket-here") as storage:
        for read in (lambda r: r.readinto(buf), lambda r: read_blocking(r, buf)):
            reader = await storage.open_reader("x")
            error = f"^s3 no-such-bucket-here/x: bucket 'no-such-bucket-here' does not exist at {endpoint}$"
            with pytest.raises(NotFoundError, match=error):
                await read(reader)
            await reader.aclose()


async def test_lazy_open_errors_and_retries(
    s3_options: dict[str, Any], s3_server: S3Server, s3_fault_proxy: FaultProxy
) -> None:
    bucket = s3_options["bucket"]
    data = os.urandom(300_000)
    s3_server.client().put_object(Bucket=bucket, Key="k", Body=data)
    buf = memoryview(bytearray(MIB))
    opts = {**s3_options, "endpoint_url": s3_fault_proxy.url, **FAST_RETRIES}
    async with opened(opts) as storage:
        s3_fault_proxy.fail_next(2, status=503, method="GET")  # retried within the first read
        reader = await storage.open_reader("k")
        assert s3_fault_proxy.faults == 0
        assert await read_blocking(reader, buf) == len(data) and buf[: len(data)] == data
        assert s3_fault_proxy.faults == 2 and reader.resumes == 0
        await reader.aclose()
        s3_fault_proxy.fail_always(status=403, code="AccessDenied", method="GET")
        for read in (lambda r: r.readinto(buf), lambda r: read_blocking(r, buf)):
            reader = await storage.open_reader("k")
            with pytest.raises(StorageError, match=f"^s3 {bucket}/k: AccessDenied: Injected fault") as err:
                await read(reader)
            assert not isinstance(err.value, NotFoundError)
            await reader.aclose()


async def test_lazy_ranges_at_and_past_the_end(s3_options: dict[str, Any], s3_server: S3Server) -> None:
    bucket = s3_options["bucket"]
    data = os.urandom(5000)
    s3_server.client().put_object(Bucket=bucket, Key="r.bin", Body=data)
    buf = memoryview(bytearray(1000))
    async with opened(s3_options) as storage:
        for offset, length in [(5000, None), (5000, 10)]:  # S3 answers 416: a HEAD tells the end
            reader = await storage.open_reader("r.bin", offset, length)
            assert await reader.readinto(buf) == 0
            assert await reader.readinto(buf) == 0
            await reader.aclose()
            reader = await storage.open_reader("r.bin", offset, length)
            assert await read_blocking(reader, buf) == 0
            assert await read_blocking(reader, buf) == 0
            await reader.aclose()
        for offset, length in [(5001, None), (9999, 10)]:
            error = re.escape(f"s3 {bucket}/r.bin: offset {offset} is beyond the end (5000 bytes)")
            reader = await storage.open_reader("r.bin", offset, length)
            with pytest.raises(StorageError, match=f"^{error}$"):
                await reader.readinto(buf)
            await reader.aclose()
            reader = await storage.open_reader("r.bin", offset, length)
            with pytest.raises(StorageError, match=f"^{error}$"):
                await read_blocking(reader, buf)
            await reader.aclose()
        # the end is unknown until the GET answered: not taken for "at the end" before
        assert await read_all(await storage.open_reader("r.bin", 4990, 100), chunk=7) == data[4990:]
        assert await read_all(await storage.open_reader("r.bin", 4990), chunk=3) == data[4990:]
        got, sizes, _ = await blocking_read_all(await storage.open_reader("r.bin", 10, None), chunk=4000)
        assert got == data[10:] and sizes == [4000, 990]
        reader = await storage.open_reader("r.bin", 0, 100)
        assert await reader.readinto(memoryview(bytearray(0))) == 0  # an empty buffer: no GET either
        assert await read_all(reader) == data[:100]


async def test_small_object_costs_one_thread_hop(
    s3_options: dict[str, Any], s3_server: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Open and first read share a worker-thread call; the end needs none."""
    data = os.urandom(20_000)
    s3_server.client().put_object(Bucket=s3_options["bucket"], Key="small.bin", Body=data)
    async with opened(s3_options) as storage:
        assert storage._fast is not None
        runs = count_calls(monkeypatch, storage._fast, "run")
        for _ in range(3):
            runs.clear()
            reader = await storage.open_reader("small.bin")
            assert runs == []
            assert await read_all(reader) == data  # reads until readinto returns 0
            assert runs == ["run"]
        reader = await storage.open_reader("small.bin")
        got, sizes, _ = await blocking_read_all(reader)  # the core's own hop: the reader adds none
        assert got == data and sizes == [len(data)] and runs == ["run"]


async def test_aclose_before_any_read_does_no_io(
    s3_options: dict[str, Any], s3_server: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    s3_server.client().put_object(Bucket=s3_options["bucket"], Key="k", Body=b"x" * 1000)
    buf = memoryview(bytearray(1000))
    async with opened(s3_options) as storage:
        fast = storage._fast
        assert fast is not None
        calls = [count_calls(monkeypatch, fast, name) for name in ("run", "send", "head_blocking")]
        before = socket_fds()
        reader = await storage.open_reader("k")
        await reader.aclose()
        assert await reader.readinto(buf) == 0
        assert await read_blocking(reader, buf) == 0
        await reader.aclose()
        assert calls == [[], [], []]
        assert socket_fds() == before


def test_lean_path_imports_no_aioboto3(s3_options: dict[str, Any], s3_server: S3Server, tmp_path: Path) -> None:
    """Listing, stat and reading never import aioboto3, aiobotocore or aiohttp
    (half a second of every CLI run); botocore only signs."""
    client = s3_server.client()
    for i in range(3):
        client.put_object(Bucket=s3_options["bucket"], Key=f"ds/f{i}", Body=b"x" * (i + 1) * 100_000)
    script = textwrap.dedent(
        """
        import json, sys
        import anyio
        from moverd.plugins import load_plugins
        from moverd.registry import Context, Registry

        options, state = json.loads(sys.argv[1]), sys.argv[2]

        async def main():
            registry = Registry.from_plugins(load_plugins()[0])
            storage = registry.create_storage("s3", "landing", options, Context(state_dir=state))
            try:
                infos = [i async for i in storage.list("ds")]
                total = 0
                for info in infos:
                    await storage.stat(info.key)
                    reader = await storage.open_reader(info.key)
                    buf = memoryview(bytearray(65536))
                    while n := await reader.readinto(buf):
                        total += n
                    await reader.aclose()
            finally:
                await storage.aclose()
            heavy = sorted(m for m in ("aioboto3", "aiobotocore", "aiohttp", "boto3") if m in sys.modules)
            print(json.dumps({"objects": len(infos), "bytes": total, "heavy": heavy}))

        anyio.run(main)
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MOVERD_"))}
    out = subprocess.run(
        [sys.executable, "-c", script, json.dumps(s3_options), str(tmp_path)],
        capture_output=True, text=True, check=True, env=env, cwd=Path(__file__).parent.parent,
    )
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"objects": 3, "bytes": 600_000, "heavy": []}


# -- every endpoint, every kind of credentials ---------------------------------------------------


@contextlib.contextmanager
def https_forward_proxy(folder: Path) -> Iterator[tuple[FaultProxy, TLSProxy]]:
    """An ``https://`` forward proxy: TLS (its own CA, in ``folder``) in front of a fault proxy
    that tunnels CONNECT to the address it names."""
    folder.mkdir()
    with FaultProxy("127.0.0.1", 9) as forward, TLSProxy("127.0.0.1", forward.port, folder) as secure:
        yield forward, secure


def bundle_of(path: Path, *proxies: TLSProxy) -> Path:
    """One CA bundle trusting each of ``proxies``' CAs."""
    path.write_bytes(b"".join(p.ca_bundle.read_bytes() for p in proxies))
    return path


@pytest.fixture
def tls_proxy(s3_fault_proxy: FaultProxy, tmp_path: Path) -> Iterator[TLSProxy]:
    """``https://127.0.0.1:PORT`` (its own CA in ``ca_bundle``) in front of the fault proxy in
    front of moto: TLS, and faults under it."""
    with TLSProxy("127.0.0.1", s3_fault_proxy.port, tmp_path) as proxy:
        yield proxy


async def test_https_endpoint_reads_through_the_lean_path(
    s3_options: dict[str, Any], tls_proxy: TLSProxy, s3_fault_proxy: FaultProxy
) -> None:
    """An ``https://`` endpoint whose certificate is signed by ``ca_bundle``: reads, listings and
    HEADs go through the lean client (verified TLS), a body that breaks under TLS is resumed, and
    writes go through aiobotocore with the same CA."""
    data = os.urandom(3 * MIB + 5)
    opts = {**s3_options, "endpoint_url": tls_proxy.url, "ca_bundle": str(tls_proxy.ca_bundle), **FAST_RETRIES}
    async with opened(opts) as storage:
        assert storage._fast is not None
        await write_object(storage, "tls/r.bin", data)
        assert [(i.key, i.size) async for i in storage.list("tls")] == [("tls/r.bin", len(data))]
        assert (await storage.stat("tls/r.bin")).size == len(data)
        reader = await storage.open_reader("tls/r.bin")
        assert isinstance(reader, LeanReader)
        got, sizes, digest = await blocking_read_all(reader)
        assert got == data and digest == hashlib.md5(data).hexdigest()
        assert sizes == [MIB, MIB, MIB, 5] and reader.resumes == 0
        s3_fault_proxy.reset_next(1, after_bytes=700_000, rst=True)
        reader = await storage.open_reader("tls/r.bin", 10, 2 * MIB)
        got, _, _ = await blocking_read_all(reader)
        assert got == data[10 : 10 + 2 * MIB] and reader.resumes == 1
        assert await read_all(await storage.open_reader("tls/r.bin", len(data) - 3)) == data[-3:]
        # kept alive: a body read to its end gives its connection back for the next request
        before = tls_proxy.connections
        for _ in range(5):
            assert await read_all(await storage.open_reader("tls/r.bin", 0, 1000)) == data[:1000]
            assert (await storage.stat("tls/r.bin")).size == len(data)
        assert tls_proxy.connections - before <= 1
    assert b"GET /" + s3_options["bucket"].encode() + b"/tls/r.bin HTTP/1.1" in tls_proxy.sent


async def test_https_endpoint_through_a_proxy_of_the_environment(
    s3_options: dict[str, Any], tls_proxy: TLSProxy, s3_fault_proxy: FaultProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``HTTPS_PROXY`` (with a user and password) in front of an ``https://`` endpoint: reads,
    listings and HEADs go through a CONNECT tunnel with verified TLS to the endpoint inside it,
    carrying the proxy's credentials, as botocore sends the uploads; a body that breaks inside
    the tunnel is resumed on a new one."""
    data = os.urandom(2 * MIB + 11)
    with FaultProxy("127.0.0.1", 9) as forward:  # a forward proxy only: CONNECT names the address
        only_proxy(monkeypatch, "HTTPS_PROXY", f"http://mover:s%3Acret@127.0.0.1:{forward.port}")
        opts = {**s3_options, "endpoint_url": tls_proxy.url, "ca_bundle": str(tls_proxy.ca_bundle), **FAST_RETRIES}
        async with opened(opts) as storage:
            assert storage._fast.proxy == f"http://mover:s%3Acret@127.0.0.1:{forward.port}"
            await write_object(storage, "px/r.bin", data)  # aiobotocore, through the same proxy
            uploads = len(forward.seen)
            assert uploads >= 1
            assert [(i.key, i.size) async for i in storage.list("px")] == [("px/r.bin", len(data))]
            assert (await storage.stat("px/r.bin")).size == len(data)
            s3_fault_proxy.reset_next(1, after_bytes=500_000, rst=True)
            reader = await storage.open_reader("px/r.bin")
            got, _, digest = await blocking_read_all(reader)
            assert got == data and digest == hashlib.md5(data).hexdigest() and reader.resumes == 1
        tunnels = forward.seen[uploads:]
    target = tls_proxy.url.removeprefix("https://")
    assert tunnels and all(seen == ("CONNECT", target, None) for seen in tunnels), tunnels
    basic = "Basic " + base64.b64encode(b"mover:s:cret").decode()
    assert forward.proxy_authorizations == [basic] * len(forward.seen)
    assert b"GET /" + s3_options["bucket"].encode() + b"/px/r.bin HTTP/1.1" in tls_proxy.sent


async def test_https_endpoint_through_an_https_proxy(
    s3_options: dict[str, Any], s3_server: S3Server, tls_proxy: TLSProxy, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """TLS inside TLS: an ``https://`` proxy (its certificate checked against ``ca_bundle``,
    which holds both CAs) tunnels to an ``https://`` endpoint. Reads go through, and a reader
    closed in the middle of a body stops at once (the plain socket under both TLS layers is
    shut down)."""
    data = os.urandom(3 * MIB)
    s3_server.client().put_object(Bucket=s3_options["bucket"], Key="tt/r.bin", Body=data)
    with https_forward_proxy(tmp_path / "proxy-tls") as (forward, secure_proxy):
        bundle = bundle_of(tmp_path / "both-cas.pem", tls_proxy, secure_proxy)
        only_proxy(monkeypatch, "HTTPS_PROXY", f"https://mover:pw@127.0.0.1:{secure_proxy.port}")
        opts = {**s3_options, "endpoint_url": tls_proxy.url, "ca_bundle": str(bundle), **FAST_RETRIES}
        async with opened(opts) as storage:
            assert await read_all(await storage.open_reader("tt/r.bin", 5, 1000)) == data[5:1005]
            reader = await storage.open_reader("tt/r.bin")
            assert await reader.readinto(memoryview(bytearray(64 * 1024))) == 64 * 1024
            await reader.aclose()  # mid-body
            assert [(i.key, i.size) async for i in storage.list("tt")] == [("tt/r.bin", len(data))]
        assert forward.seen and all(method == "CONNECT" for method, _, _ in forward.seen), forward.seen
        assert forward.proxy_authorizations == ["Basic " + base64.b64encode(b"mover:pw").decode()] * len(forward.seen)


async def test_https_certificate_is_verified(s3_options: dict[str, Any], tls_proxy: TLSProxy) -> None:
    """Without the CA the lean client refuses the server at once (a certificate that does not
    verify is not worth another attempt); ``verify_tls = false`` reads anyway."""
    s3_server_client_put(s3_options, "k", b"secret bytes")
    opts = {**s3_options, "endpoint_url": tls_proxy.url, "max_attempts": 5}
    async with opened(opts) as storage:
        reader = await storage.open_reader("k")
        with anyio.fail_after(5):
            with pytest.raises(StorageError, match=f"^s3 {s3_options['bucket']}/k: cannot talk to {tls_proxy.url}: "
                               "SSL.*CERTIFICATE_VERIFY_FAILED"):
                await read_all(reader)
    async with opened(opts, verify_tls=False) as storage:
        assert await read_all(await storage.open_reader("k")) == b"secret bytes"


def s3_server_client_put(s3_options: dict[str, Any], key: str, body: bytes) -> None:
    import boto3

    boto3.client(
        "s3", endpoint_url=s3_options["endpoint_url"], region_name=s3_options["region"],
        aws_access_key_id=s3_options["access_key_id"], aws_secret_access_key=s3_options["secret_access_key"],
    ).put_object(Bucket=s3_options["bucket"], Key=key, Body=body)


async def write_object(storage: Any, key: str, data: bytes) -> None:
    writer = await storage.open_writer(key, size_hint=len(data))
    await writer.write(data)
    await writer.commit()


@pytest.fixture
def no_aws_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An environment without AWS settings of the machine's (files, profile, instance metadata)."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    config = tmp_path / "aws-config"
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return config


def sent_tokens(proxy: TLSProxy) -> list[str]:
    return re.findall(r"(?im)^x-amz-security-token: (\S+)\r$", proxy.sent.decode("latin-1"))


async def test_session_credentials_from_the_environment(
    s3_options: dict[str, Any], s3_server: S3Server, tmp_path: Path, no_aws_config: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Temporary credentials (key, secret and session token in the environment, as a role or web
    identity leaves them): the lean client signs with them, token included."""
    s3_server.client().put_object(Bucket=s3_options["bucket"], Key="t/k", Body=b"temporary")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "ASIATEMPORARYKEY")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "temporary-secret")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "session-token-1")
    opts = {k: v for k, v in s3_options.items() if k not in ("access_key_id", "secret_access_key")}
    with TLSProxy(s3_server.host, s3_server.port, tmp_path, tls=False) as recorder:
        async with opened(opts, endpoint_url=recorder.url) as storage:
            reader = await storage.open_reader("t/k")
            assert isinstance(reader, LeanReader)
            assert await read_all(reader) == b"temporary"
            assert [i.key async for i in storage.list("t")] == ["t/k"]
    assert sent_tokens(recorder) == ["session-token-1", "session-token-1"]
    assert b"Credential=ASIATEMPORARYKEY/" in recorder.sent


async def test_expiring_credentials_are_refreshed(
    s3_options: dict[str, Any], s3_server: S3Server, tmp_path: Path, no_aws_config: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Credentials that expire (here from a ``credential_process``, as botocore refreshes role
    and web-identity ones): a request after their refresh point signs with the new ones."""
    s3_server.client().put_object(Bucket=s3_options["bucket"], Key="k", Body=b"x")
    counter = tmp_path / "issued"
    script = tmp_path / "issue.py"
    script.write_text(textwrap.dedent(f"""
        import datetime, json, pathlib
        counter = pathlib.Path({str(counter)!r})
        n = int(counter.read_text()) + 1 if counter.exists() else 1
        counter.write_text(str(n))
        soon = datetime.datetime.now(datetime.UTC) + datetime.timedelta(minutes=5)  # inside the refresh window
        print(json.dumps({{"Version": 1, "AccessKeyId": "ASIAROLE", "SecretAccessKey": "s",
                           "SessionToken": f"token-{{n}}", "Expiration": soon.isoformat()}}))
    """))
    no_aws_config.write_text(f"[default]\ncredential_process = {sys.executable} {script}\n")
    opts = {k: v for k, v in s3_options.items() if k not in ("access_key_id", "secret_access_key")}
    with TLSProxy(s3_server.host, s3_server.port, tmp_path, tls=False) as recorder:
        async with opened(opts, endpoint_url=recorder.url) as storage:
            for _ in range(2):
                assert await read_all(await storage.open_reader("k")) == b"x"
    tokens = sent_tokens(recorder)
    assert len(tokens) == 2 and tokens[0] != tokens[1] and all(t.startswith("token-") for t in tokens)


async def test_web_identity_credentials_from_sts(
    s3_options: dict[str, Any], s3_server: S3Server, tmp_path: Path, no_aws_config: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A role taken with a web-identity token (``AWS_WEB_IDENTITY_TOKEN_FILE`` and
    ``AWS_ROLE_ARN``, as Kubernetes service accounts leave them), from a real STS endpoint
    (moto's AssumeRoleWithWebIdentity): botocore's chain asks STS once, and every request, lean
    reads and aiobotocore uploads alike, is signed with the temporary key and its session token."""
    token = tmp_path / "token"
    token.write_text("eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzeXN0ZW06c2VydmljZWFjY291bnQ6bW92ZXJkIn0.c2ln")
    monkeypatch.setenv("AWS_WEB_IDENTITY_TOKEN_FILE", str(token))
    monkeypatch.setenv("AWS_ROLE_ARN", "arn:aws:iam::123456789012:role/moverd-archiver")
    monkeypatch.setenv("AWS_ROLE_SESSION_NAME", "moverd-test")
    opts = {k: v for k, v in s3_options.items() if k not in ("access_key_id", "secret_access_key")}
    data = os.urandom(300_000)
    with TLSProxy(s3_server.host, s3_server.port, tmp_path, tls=False) as recorder:
        monkeypatch.setenv("AWS_ENDPOINT_URL_STS", recorder.url)  # STS through the recorder too
        async with opened(opts, endpoint_url=recorder.url) as storage:
            await write_object(storage, "wi/k", data)
            reader = await storage.open_reader("wi/k")
            assert isinstance(reader, LeanReader)
            assert await read_all(reader) == data
            assert [i.key async for i in storage.list("wi")] == ["wi/k"]
    sent = recorder.sent.decode("latin-1")
    assert sent.count("Action=AssumeRoleWithWebIdentity") == 2  # once per client: lean and aiobotocore
    assert "WebIdentityToken=" + token.read_text() in sent
    tokens = sent_tokens(recorder)
    assert len(tokens) >= 3 and len(set(tokens)) <= 2  # PUT, GET, list; each client its own session
    keys = re.findall(r"Credential=(\w+)/", sent)
    assert keys and all(k.startswith("ASIA") for k in keys), keys
