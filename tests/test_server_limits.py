"""Request bodies and heads are bounded before anything else, against a real ``moverd serve``.

The daemon listens with credentials configured; a client without them, or with them and a body
far over ``server.max_body_size``, streams 100 MB at it. The answer must come before the body is
read, and the daemon's memory must not grow by the body's size (before the limits, four such
requests took the daemon from 126 to 937 MiB).
"""

from __future__ import annotations

import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from tests.support.daemon import BASIC, Daemon

MiB = 1024 * 1024
BODY = 100 * MiB


@pytest.fixture(scope="module")
def daemon(prefect_db_template: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    tmp = tmp_path_factory.mktemp("limits")
    settings = {
        "state_dir": str(tmp / "state"),
        "server": {"prefect_ui": False, "max_body_size": "64KiB", "max_header_size": "16KiB",
                   "auth": {"basic_username": BASIC[0], "basic_password": BASIC[1]}},
        "scheduler": {"enabled": False},
    }
    d = Daemon.create(tmp, settings, name="limits")
    home = Path(d.env["PREFECT_HOME"])
    home.mkdir(parents=True)
    shutil.copy2(prefect_db_template, home / "prefect.db")
    d.start().wait_ready()
    try:
        yield d
    finally:
        d.stop()


def rss(d: Daemon) -> int:
    assert d.proc is not None
    return int(psutil.Process(d.proc.pid).memory_info().rss)


def chunks(total: int, size: int = MiB) -> Iterator[bytes]:
    block = b"x" * size
    sent = 0
    while sent < total:
        yield block
        sent += size


def post(d: Daemon, **kw: Any) -> tuple[httpx.Response | Exception, float]:
    t0 = time.monotonic()
    try:
        r = httpx.post(f"{d.url}/jobs", timeout=30, **kw)
    except httpx.HTTPError as exc:
        return exc, time.monotonic() - t0
    return r, time.monotonic() - t0


def test_big_bodies_are_refused_unread(daemon: Daemon) -> None:
    before = rss(daemon)
    cases: dict[str, tuple[dict[str, Any], set[int]]] = {
        "no credentials, chunked": ({"content": chunks(BODY)}, {401}),
        # refused on its declared length alone, credentials or not: nothing of it is read either way
        "no credentials, Content-Length": ({"content": b"y" * BODY}, {401, 413}),
        "credentials, chunked": ({"content": chunks(BODY), "auth": BASIC}, {413}),
        "credentials, Content-Length": ({"content": b"z" * BODY, "auth": BASIC}, {413}),
    }
    for what, (kw, statuses) in cases.items():
        r, took = post(daemon, headers={"Content-Type": "application/json"}, **kw)
        assert isinstance(r, httpx.Response), (what, r)
        assert r.status_code in statuses, (what, r.text)
        assert took < 5, (what, took)
    # four at once, as the fault campaign sent them
    results: list[tuple[httpx.Response | Exception, float]] = []
    threads = [threading.Thread(target=lambda: results.append(post(daemon, content=chunks(BODY))))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [r.status_code for r, _ in results if isinstance(r, httpx.Response)] == [401] * 4, results
    after = rss(daemon)
    assert after - before < 20 * MiB, (before / MiB, after / MiB)
    print(f"daemon RSS {before / MiB:.0f} MiB before, {after / MiB:.0f} MiB after 8 bodies of 100 MiB")


def test_small_body_limit_holds_for_authorised_callers_too(daemon: Daemon) -> None:
    over = b'{"id": "' + b"a" * (70 * 1024) + b'", "type": "archive"}'
    r, _ = post(daemon, content=over, auth=BASIC, headers={"Content-Type": "application/json"})
    assert isinstance(r, httpx.Response) and r.status_code == 413, r
    assert "max_body_size" in r.json()["detail"]


def test_credentials_are_checked_before_the_body_is_parsed(daemon: Daemon) -> None:
    headers = {"Content-Type": "application/json"}
    anonymous = httpx.post(f"{daemon.url}/jobs", content=b"{not json", headers=headers, timeout=30)
    assert anonymous.status_code == 401, anonymous.text
    assert "Basic" in anonymous.headers["WWW-Authenticate"]
    authed = httpx.post(f"{daemon.url}/jobs", content=b"{not json", headers=headers, auth=BASIC, timeout=30)
    assert authed.status_code == 422 and "JSON" in authed.json()["detail"], authed.text
    missing = httpx.post(f"{daemon.url}/jobs", json={"type": "archive"}, auth=BASIC, timeout=30)
    assert missing.status_code == 422 and "id is required" in missing.json()["detail"], missing.text
    unknown = httpx.post(f"{daemon.url}/jobs", json={"id": "no-such-job", "type": "archive"}, auth=BASIC, timeout=30)
    assert unknown.status_code == 404, unknown.text  # a small valid body still gets through


def raw_request(d: Daemon, head: bytes) -> bytes:
    """Send ``head`` over a plain socket and return what comes back until the server closes."""
    with socket.create_connection(("127.0.0.1", d.port), timeout=10) as s:
        try:
            s.sendall(head)
        except OSError:
            pass  # refused while still sending: the answer is read below
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


def test_oversized_headers_get_431_without_being_buffered(daemon: Daemon) -> None:
    r = httpx.get(f"{daemon.url}/jobs", auth=BASIC, headers={"X-Filler": "f" * (20 * 1024)}, timeout=30)
    assert r.status_code == 431, r.text
    assert "max_header_size" in r.text
    # a head that never ends is cut off at the limit, not buffered for as long as it keeps coming
    before = rss(daemon)
    answer = raw_request(daemon, b"GET /archiver/api/v1/health/livez HTTP/1.1\r\nHost: x\r\n"
                         + b"".join(b"X-%d: %s\r\n" % (i, b"v" * 1000) for i in range(20_000)))
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    assert rss(daemon) - before < 10 * MiB
    ok = httpx.get(f"{daemon.url}/jobs", auth=BASIC, headers={"X-Filler": "f" * 4096}, timeout=30)
    assert ok.status_code == 200, ok.text
