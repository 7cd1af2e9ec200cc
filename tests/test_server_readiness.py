"""``GET /health/readyz`` and job reads name the cause when the catalog cannot be reached, not
just that the check ran out of time.

Two real daemons, started side by side: one whose SciCat URL does not resolve
(``nonexistent.invalid``: the name fails at once, and SciCat's client retries with backoff, so the
check used to end in "timed out after 3 s" between two attempts), one whose SciCat accepts
connections and never answers (its client's read timeout is 1 s here, so the first attempt has
failed before the check's time is up).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.daemon import Daemon, wait_for
from tests.support.silent import SilentServer

TIMEOUT = 3


def not_ready(daemon: Daemon) -> dict[str, Any]:
    """The readiness answer once the daemon serves it (it starts with its catalog away)."""
    def answer() -> dict[str, Any] | None:
        assert daemon.proc is not None and daemon.proc.poll() is None, daemon.log()
        try:
            r = httpx.get(f"{daemon.url}/health/readyz", timeout=30)
        except httpx.HTTPError:
            return None
        if r.status_code == 503 and "daemon" not in r.json()["checks"]:
            data: dict[str, Any] = r.json()
            return data
        assert r.status_code != 200, r.text
        return None

    result: dict[str, Any] = wait_for(answer, 150, 0.25, "the readiness answer")
    return result


@pytest.fixture(scope="module")
def daemons(prefect_db_template: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Daemon]]:
    tmp = tmp_path_factory.mktemp("readiness")
    silent = SilentServer()
    catalog = {"type": "scicat", "username": "archiver", "password": "secret"}
    urls = {"unresolvable": {"url": "http://nonexistent.invalid"},
            "silent": {"url": silent.url, "timeout": 1, "connect_timeout": 1}}
    out = {name: Daemon.create(tmp, {"catalog": {**catalog, **extra}, "server": {"readiness_timeout": TIMEOUT}},
                               template=prefect_db_template, name=name) for name, extra in urls.items()}
    for d in out.values():
        d.start()
    try:
        yield out
    finally:
        for d in out.values():
            d.stop()
        silent.close()


def test_unresolvable_catalog_host_is_named(daemons: dict[str, Daemon]) -> None:
    daemon = daemons["unresolvable"]
    checks = not_ready(daemon)["checks"]
    assert checks["storage lts"] == "ok" and checks["prefect"] == "ok", checks
    catalog = checks["catalog"]
    assert catalog.startswith(f"timed out after {TIMEOUT} s"), catalog
    assert "Name or service not known" in catalog or "not resolve" in catalog, catalog
    assert "auth/login" in catalog, catalog
    # a job read that runs out of time says why too
    view = httpx.get(f"{daemon.url}/jobs/some-job", timeout=30).json()
    assert "Name or service not known" in view["catalog"]["error"], view


def test_silent_catalog_is_named(daemons: dict[str, Daemon]) -> None:
    checks = not_ready(daemons["silent"])["checks"]
    catalog = checks["catalog"]
    assert catalog.startswith(f"timed out after {TIMEOUT} s"), catalog
    # the cause is named: its read timeout, or on a loaded host the connect timeout before it
    assert ("ReadTimeout" in catalog or "ConnectTimeout" in catalog) and "auth/login" in catalog, catalog
