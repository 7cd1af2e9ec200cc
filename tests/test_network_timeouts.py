"""No network wait is unbounded: an S3 endpoint or a SciCat server that accepts connections and
never answers fails each call within its configured bounds, with an error that names the
endpoint and the request it waited for; and the defaults bound a call to a couple of minutes."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import anyio
import pytest
from moverd_catalog_scicat.catalog import SciCatCatalog
from moverd_catalog_scicat.options import SciCatOptions
from moverd_storage_s3 import S3Options, S3Storage
from moverd_storage_s3.client import make_config

from moverd import CatalogError, StorageError
from tests.test_storage_s3 import opened, read_all

pytestmark = pytest.mark.anyio

SHORT = {"connect_timeout": 0.5, "read_timeout": 0.3, "request_timeout": 1.5, "max_attempts": 8}
"""Timeouts short enough for a test; eight attempts of 0.3 s with backoff would take ~4 s or more,
so only ``request_timeout`` can end a call in time."""


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def silent_endpoint() -> Iterator[str]:
    """``http://127.0.0.1:PORT`` of a real TCP server that accepts every connection, reads what
    it is sent and never answers."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    listener.settimeout(0.2)
    held: list[socket.socket] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.setblocking(False)
            held.append(conn)
        for conn in held:
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(5)
        listener.close()


class Timed:
    def __enter__(self) -> Timed:
        self.start = time.monotonic()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.monotonic() - self.start


# -- S3 ------------------------------------------------------------------------------------------


async def test_silent_s3_endpoint_fails_listing_and_reading_in_bounded_time(
    s3_options: dict[str, Any], silent_endpoint: str
) -> None:
    bucket = s3_options["bucket"]
    said = f"^s3 {silent_endpoint}: no answer to"
    async with opened(s3_options, endpoint_url=silent_endpoint, **SHORT) as storage:
        with Timed() as t, anyio.fail_after(10):
            with pytest.raises(StorageError, match=f"{said} list {bucket}/ds/ within 1.5 s"):
                [i async for i in storage.list("ds")]
        assert 1.2 < t.seconds < 3.5
        with Timed() as t, anyio.fail_after(10):
            with pytest.raises(StorageError, match=f"{said} GET {bucket}/ds/f within 1.5 s"):
                await read_all(await storage.open_reader("ds/f"))
        assert 1.2 < t.seconds < 3.5
        with Timed() as t, anyio.fail_after(10):
            with pytest.raises(StorageError, match=f"{said} HEAD {bucket}/ds/f within 1.5 s"):
                await storage.stat("ds/f")
        assert 1.2 < t.seconds < 3.5


async def test_silent_s3_endpoint_fails_after_its_attempts_of_read_timeout(
    s3_options: dict[str, Any], silent_endpoint: str
) -> None:
    """With a generous ``request_timeout``, the attempts end it: each waited ``read_timeout``."""
    bucket = s3_options["bucket"]
    opts = {**SHORT, "request_timeout": 60, "max_attempts": 2}
    async with opened(s3_options, endpoint_url=silent_endpoint, **opts) as storage:
        with Timed() as t, anyio.fail_after(20):
            with pytest.raises(
                StorageError, match=f"^s3 {silent_endpoint}: no answer to GET {bucket}/k within 0.3 s \\(2 attempts\\)$"
            ):
                await read_all(await storage.open_reader("k"))
        assert t.seconds < 5


async def test_silent_s3_endpoint_fails_a_write_in_bounded_time(
    s3_options: dict[str, Any], silent_endpoint: str
) -> None:
    """Uploads (aiobotocore on every endpoint): a single PutObject and a multipart upload."""
    bucket = s3_options["bucket"]
    async with opened(s3_options, endpoint_url=silent_endpoint, part_size="5MiB", **SHORT) as storage:
        for size in (10, 6 * 1024 * 1024):
            with Timed() as t, anyio.fail_after(15):
                said = f"^s3 {silent_endpoint}: no answer to \\w+ (\\d+ of )?{bucket}/up"
                with pytest.raises(StorageError, match=said):
                    writer = await storage.open_writer("up", size_hint=size)
                    await writer.write(b"x" * size)
                    await writer.commit()
            assert t.seconds < 6  # the request's 1.5 s, and the abort's one attempt (0.8 s)


def test_s3_defaults_bound_every_request() -> None:
    """The defaults as they reach both clients: a request (its retries included) ends within
    ``request_timeout``; the lean client cuts its last wait to the deadline, aiobotocore's calls are
    cancelled at it. 900 s and more of retries on a silent endpoint was the old behaviour."""
    opts = S3Options(bucket="bkt", endpoint_url="http://127.0.0.1:9", access_key_id="a", secret_access_key="b")
    assert (opts.connect_timeout, opts.read_timeout, opts.request_timeout) == (10, 30, 120)
    storage = S3Storage("t", opts)
    assert storage._fast is not None
    fast = storage._fast
    assert (fast.connect_timeout, fast.read_timeout, fast.request_timeout) == (10, 30, 120)
    config = make_config(opts)
    assert (config.connect_timeout, config.read_timeout) == (10, 30)
    # A broken body waits at most read_timeout, then its resumes get request_timeout: 150 s.
    assert opts.read_timeout + opts.request_timeout <= 150


# -- SciCat --------------------------------------------------------------------------------------


def scicat(url: str, **over: Any) -> SciCatCatalog:
    return SciCatCatalog(SciCatOptions.model_validate(
        {"url": url, "username": "archiver", "password": "pw", "retry_delay": 0.05, **over}
    ))


async def test_silent_scicat_fails_a_call_in_bounded_time(silent_endpoint: str) -> None:
    cat = scicat(silent_endpoint, timeout=0.3, connect_timeout=0.5, request_timeout=1.5, max_attempts=8)
    try:
        with Timed() as t, anyio.fail_after(10):
            with pytest.raises(
                CatalogError,
                # the call's bound ends it while its login is retried
                match=f"^SciCat {silent_endpoint}: no answer to GET /api/v3/jobs/job-1 within 1.5 s "
                "\\(request_timeout\\)$",
            ):
                await cat.get_job("job-1")
        assert 1.2 < t.seconds < 3
    finally:
        await cat.aclose()
    cat = scicat(silent_endpoint, timeout=0.3, request_timeout=60, max_attempts=2)
    try:
        with Timed() as t, anyio.fail_after(20):
            with pytest.raises(
                CatalogError,
                match=f"^SciCat {silent_endpoint}: no answer to POST /api/v3/auth/login within 0.3 s \\(2 attempts\\)$",
            ):
                await cat.get_job("job-1")
        assert t.seconds < 5
    finally:
        await cat.aclose()


def test_scicat_defaults_bound_every_call() -> None:
    cat = scicat("http://127.0.0.1:9")
    opts = cat.http.opts
    assert (opts.connect_timeout, opts.timeout, opts.request_timeout) == (10, 30, 120)
    timeout = cat.http.client.timeout
    assert (timeout.connect, timeout.read, timeout.write, timeout.pool) == (10, 30, 30, 30)
