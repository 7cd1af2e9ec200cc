"""The ``s3`` storage against a real S3 server (moto over HTTP): a source object that changes
between its listing and its read, or while it is read, is refused (never archived as verified),
and an endpoint that answers like a web server rather than S3 is named as such."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from moverd_storage_s3 import S3Storage

from moverd import NotFoundError, ObjectInfo, SourceChangedError, StorageError
from tests.support.faultproxy import FaultProxy
from tests.support.s3 import S3Server
from tests.test_storage_s3 import FAST_RETRIES, MIB, opened, read_all

pytestmark = pytest.mark.anyio



@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


async def listed(storage: S3Storage, key: str) -> ObjectInfo:
    found: list[ObjectInfo] = [info async for info in storage.list() if info.key == key]
    assert len(found) == 1 and found[0].etag
    return found[0]


@pytest.mark.parametrize("ranged", [False, True], ids=["whole", "range"])
async def test_object_overwritten_after_listing_is_refused(
    s3_options: dict[str, Any], s3_server: S3Server, ranged: bool
) -> None:
    """Same key, same size, other bytes (a second upload of the file): the ETag pinned with
    ``If-Match`` no longer matches, and the reader refuses rather than deliver the new bytes."""
    bucket = s3_options["bucket"]
    client = s3_server.client()
    first = os.urandom(300_000)
    client.put_object(Bucket=bucket, Key="ds/f.bin", Body=first)
    args = (1000, 5000) if ranged else ()
    async with opened(s3_options) as storage:
        info = await listed(storage, "ds/f.bin")
        # The listed version reads fine with expect=.
        reader = await storage.open_reader("ds/f.bin", *args, expect=info)
        assert await read_all(reader) == (first[1000:6000] if ranged else first)
        client.put_object(Bucket=bucket, Key="ds/f.bin", Body=os.urandom(len(first)))
        with pytest.raises(SourceChangedError, match=f"^s3 {bucket}/ds/f.bin: the object changed while it was read"):
            reader = await storage.open_reader("ds/f.bin", *args, expect=info)
            await read_all(reader)
        # Without expect= the new version is simply read: the pin is what refuses it.
        reader = await storage.open_reader("ds/f.bin", *args)
        assert len(await read_all(reader)) == (5000 if ranged else len(first))


async def test_size_is_checked_against_the_listing(
    s3_options: dict[str, Any], s3_server: S3Server
) -> None:
    """A listing entry whose size is not the object's (an entry from another listing, or a server
    that does not compare ETags) is refused on its size: the bytes would not be the listed ones."""
    bucket = s3_options["bucket"]
    s3_server.client().put_object(Bucket=bucket, Key="g.bin", Body=b"y" * 5000)
    async with opened(s3_options) as storage:
        info = await listed(storage, "g.bin")
        wrong = ObjectInfo(key="g.bin", size=4000, mtime=info.mtime, etag=None)
        for args in [(), (100, 50), (0, 0)]:
            with pytest.raises(SourceChangedError, match=f"^s3 {bucket}/g.bin: .*now 5000 bytes"):
                reader = await storage.open_reader("g.bin", *args, expect=wrong)
                await read_all(reader)


async def test_object_replaced_while_read_is_refused_on_resume(
    s3_options: dict[str, Any], s3_server: S3Server, s3_fault_proxy: FaultProxy
) -> None:
    """The body breaks, the object is replaced, the resumed GET carries the listed ETag: a
    SourceChangedError (a user error: archive again later), not a splice of two versions."""
    bucket = s3_options["bucket"]
    s3_server.client().put_object(Bucket=bucket, Key="v.bin", Body=os.urandom(2 * MIB))
    opts = {**s3_options, "endpoint_url": s3_fault_proxy.url, **FAST_RETRIES}
    async with opened(opts) as storage:
        info = await listed(storage, "v.bin")
        s3_fault_proxy.reset_next(1, after_bytes=256 * 1024, method="GET")
        reader = await storage.open_reader("v.bin", expect=info)
        assert await reader.readinto(memoryview(bytearray(1000))) > 0
        s3_server.client().put_object(Bucket=bucket, Key="v.bin", Body=os.urandom(2 * MIB))
        with pytest.raises(SourceChangedError, match=f"^s3 {bucket}/v.bin: the object changed while it was read"):
            await read_all(reader)


# -- answers that are not S3's ---------------------------------------------------------------------


class _WebServer(BaseHTTPRequestHandler):
    """A plain web server: every path is a 404 HTML page (a wrong port, another service)."""

    protocol_version = "HTTP/1.1"  # answers ``Expect: 100-continue``, as web servers do

    def _answer(self, body: bool) -> None:
        page = b"<!DOCTYPE html><html><head><title>404 Not Found</title></head><body>nope</body></html>"
        self.send_response(404)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(page)))
        self.end_headers()
        if body:
            self.wfile.write(page)

    def do_GET(self) -> None:
        self._answer(True)

    def do_PUT(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self._answer(True)

    def do_HEAD(self) -> None:
        self._answer(False)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def web_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _WebServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


async def test_html_404_is_not_reported_as_a_missing_object(
    s3_options: dict[str, Any], web_server: str
) -> None:
    bucket = s3_options["bucket"]
    opts = {**s3_options, "endpoint_url": web_server, "max_attempts": 1}
    said = (
        f"{web_server}: the endpoint did not answer like S3: HTTP 404 Not Found, "
        "Content-Type text/html; charset=utf-8, body starts '<!DOCTYPE html>"
    )
    async with opened(opts) as storage:
        with pytest.raises(StorageError, match=f"^s3 {bucket}/ds/f.bin: {said}") as info:
            reader = await storage.open_reader("ds/f.bin")
            await read_all(reader)
        assert not isinstance(info.value, NotFoundError)
        with pytest.raises(StorageError, match=f"^s3 {bucket}/ds/: list failed: {said}") as info:
            [i async for i in storage.list("ds")]
        assert not isinstance(info.value, NotFoundError)
        with pytest.raises(StorageError, match=f"^s3 {bucket}/up.bin: upload failed: {said}") as info:
            writer = await storage.open_writer("up.bin")
            await writer.write(b"data")
            await writer.commit()
        assert not isinstance(info.value, NotFoundError)
