"""``moverd serve`` on the embedded default with nothing configured but where to keep its state:
local catalog, local folders, Prefect in its ephemeral mode. This is the README's walk-through
(``moverd job create`` + ``curl``), plus the housekeeping the scheduler runs on its own."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

import httpx

from tests.support.daemon import REPO, Daemon, wait_for


def moverd(daemon: Daemon, *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "moverd", *args, "--config", str(daemon.config)],
                          env=daemon.env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def status(daemon: Daemon, job_id: str) -> dict[str, Any]:
    data: dict[str, Any] = httpx.get(f"{daemon.url}/jobs/{job_id}", timeout=30).json()
    return data


def finished(daemon: Daemon, job_id: str) -> dict[str, Any]:
    """The job's view once it ended (``status`` is the catalog's all along: ``inProgress`` first)."""
    def done() -> dict[str, Any] | None:
        v = status(daemon, job_id)
        return v if str(v["status"]).startswith("finished") else None

    result: dict[str, Any] = wait_for(done, 120, 0.25, f"job {job_id}")
    return result


def test_embedded_default_walkthrough_and_housekeeping(tmp_path: Path, prefect_db_template: Path) -> None:
    folder = tmp_path / "dataset"
    (folder / "raw").mkdir(parents=True)
    for i in range(5):
        (folder / "raw" / f"f{i}.bin").write_bytes(os.urandom(300_000 + i))
    (folder / "notes.txt").write_text("hello\n")
    state = tmp_path / "state"
    old = time.time() - 3 * 3600
    stale = state / "lts" / "old" / ".x.tar.moverd-tmp-0123456789ab"
    fresh = state / "lts" / "old" / ".y.tar.moverd-tmp-ba9876543210"
    expired = state / "retrieval" / "gone" / "old.tar"
    for p in (stale, fresh, expired):
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    os.utime(stale, (old, old))
    os.utime(expired, (old, old))
    settings = {
        "state_dir": str(state),
        "pipeline": {"target_size": "1MiB", "chunk_size": "256KiB", "buffer_budget": "8MiB"},
        "retrieve": {"url_expiry": "1h"},
        "server": {"prefect_ui": False},
        "scheduler": {"poll_catalog_interval": 1, "stale_temp_interval": 1, "stale_temp_age": "1h",
                      "retrieval_cleanup_interval": 1, "retrieval_cleanup_margin": 0},
    }
    daemon = Daemon.create(tmp_path, settings, name="local")
    # Prefect's ephemeral server keeps its database in PREFECT_HOME: give it a migrated one.
    home = Path(daemon.env["PREFECT_HOME"])
    home.mkdir(parents=True)
    shutil.copy2(prefect_db_template, home / "prefect.db")
    daemon.start().wait_ready()
    try:
        log = daemon.log()
        assert f"API:        {daemon.url}" in log and "Prefect UI: none" in log
        job = json.loads(moverd(daemon, "job", "create", "archive", str(folder), "--json"))
        r = httpx.post(f"{daemon.url}/jobs", json={"id": job["id"], "type": "archive"}, timeout=30)
        # 200: the scheduler's catalog poll (every second here) started the job first; the answer
        # is then that run, not a second one.
        assert r.status_code in (200, 201), r.text
        assert r.json()["name"] == f"archive-job {job['id']}"
        view = finished(daemon, job["id"])
        assert view["status"] == "finishedSuccessful" and view["catalog"]["status"] == "finishedSuccessful"
        pid = job["datasets"][0]
        # a job nobody posts: the scheduler finds it in the catalog
        retrieve = moverd(daemon, "job", "create", "retrieve", pid).strip()
        rview = finished(daemon, retrieve)
        assert rview["status"] == "finishedSuccessful", rview
        result = json.loads(moverd(daemon, "job", "show", retrieve))["result"]["downloads"]
        assert result and all(e["url"].startswith("file://") for e in result)
        # housekeeping: the stale temp file and the expired retrieval go, the fresh ones stay
        wait_for(lambda: not stale.exists() and not expired.exists(), 30, 0.2, "housekeeping")
        assert fresh.exists()
        assert all(Path(url2pathname(urlparse(e["url"]).path)).exists() for e in result)
        m = daemon.metrics()
        assert m['moverd_housekeeping_removed_total{task="stale_temp_files"}'] == 1
        assert m['moverd_housekeeping_removed_total{task="retrieval_cleanup"}'] == 1
    finally:
        assert daemon.stop() == 0, daemon.log()
    assert "Traceback" not in daemon.log(), daemon.log()
