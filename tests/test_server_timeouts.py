"""A silent Prefect server does not hang ``moverd serve``: every request of its Prefect client has
``server.prefect_request_timeout`` (``PREFECT_API_REQUEST_TIMEOUT``) and the check at start is
bounded by it as a whole, so the start fails within the bound, naming the endpoint."""

from __future__ import annotations

import time
from pathlib import Path

from tests.support.daemon import Daemon
from tests.support.silent import SilentServer


def test_a_silent_prefect_server_fails_the_start_within_the_bound(tmp_path: Path) -> None:
    with SilentServer() as silent:
        d = Daemon.create(tmp_path, {"state_dir": str(tmp_path / "state"), "scheduler": {"enabled": False},
                                     "server": {"prefect_request_timeout": 3}}, name="silent-prefect")
        d.env["PREFECT_API_URL"] = f"{silent.url}/api"
        t0 = time.monotonic()
        d.start()
        assert d.proc is not None
        code = d.proc.wait(120)
        took = time.monotonic() - t0
        log = d.log()
        assert code == 3, log
        assert silent.accepted >= 1, log  # it connected: the wait was for an answer
        assert f"Prefect at {silent.url}/api" in log and "no answer within 3 s" in log, log
        # the start itself (imports, plugins) takes a few seconds; Prefect's 60 s times 6 tries did not
        assert took < 30, (took, log)
