"""What an operator's browser sees of a ``moverd serve`` daemon on the embedded default.

* ``/docs`` works without a route out: Swagger UI's script and style come from the daemon, not a
  CDN. A real headless Chromium loads the page (this machine has no route out, so the page is
  offline by construction) and the test looks for the operations Swagger UI rendered into the DOM.
* The local Prefect UI keeps its port across a quick restart, while the previous server's
  connections are still in TIME-WAIT (bookmarks of the UI keep working).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.daemon import Daemon
from tests.support.s3 import free_port

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        exe = shutil.which(name)
        if exe:
            return exe
    raise AssertionError("no Chromium on this machine: .ci/run installs it (apt-get install chromium)")


def dump_dom(url: str, budget_ms: int = 10_000) -> str:
    """The DOM after the page ran its scripts for ``budget_ms`` of virtual time."""
    with tempfile.TemporaryDirectory(prefix="moverd-chromium-") as profile:
        done = subprocess.run(
            [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}",
             "--dump-dom", url],
            capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
        )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def daemon(prefect_db_template: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    tmp = tmp_path_factory.mktemp("ui")
    # Loopback and no credentials: the API takes anonymous requests, so the browser needs none.
    d = Daemon.create(tmp, {"server": {"prefect_port": free_port(), "shutdown_grace": 5}},
                      template=prefect_db_template, name="ui")
    d.start()
    try:
        d.wait_ready()
        yield d
    finally:
        d.stop()


def test_api_docs_render_offline_in_a_browser(daemon: Daemon) -> None:
    dom = dump_dom(f"{daemon.url}/docs")
    root = daemon.root_path
    assert 'class="swagger-ui"' in dom, dom[-3000:]
    assert "opblock-post" in dom and f'data-path="{root}/jobs"' in dom, dom[-3000:]
    assert f'data-path="{root}/jobs/{{job_id}}"' in dom and f'data-path="{root}/health/readyz"' in dom
    page = httpx.get(f"{daemon.url}/docs", timeout=30)
    assert page.status_code == 200
    assert "http://" not in page.text and "https://" not in page.text, page.text  # nothing from elsewhere
    for asset, kind in (("swagger-ui-bundle.js", "javascript"), ("swagger-ui.css", "text/css")):
        r = httpx.get(f"{daemon.url}/docs/assets/{asset}", timeout=30)
        assert r.status_code == 200 and kind in r.headers["content-type"], (asset, r.headers)
    assert httpx.get(f"{daemon.url}/docs/assets/..%2Fcore.py", timeout=30).status_code == 404


def test_prefect_ui_keeps_its_port_across_a_quick_restart(daemon: Daemon) -> None:
    ui = daemon.prefect_api().removesuffix("/api")
    port = int(ui.rsplit(":", 1)[1])
    # A browser tab holding a connection: the server closes it when it stops, which leaves the
    # server's side of it in TIME-WAIT (so do the daemon's own connections to it).
    with httpx.Client(timeout=30) as browser:
        assert browser.get(f"{ui}/api/health").status_code == 200
        assert daemon.stop() == 0, daemon.log()
    with socket.socket() as probe:  # what the port probe used to do: fails while TIME-WAIT lasts
        with pytest.raises(OSError):
            probe.bind(("127.0.0.1", port))
    daemon.start().wait_ready()
    assert daemon.prefect_api() == f"{ui}/api", daemon.log()
    assert httpx.get(f"{ui}/api/health", timeout=30).status_code == 200
    assert f"port {port} is taken" not in daemon.log()
