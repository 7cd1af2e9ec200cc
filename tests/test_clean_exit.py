"""Every command that read S3 ends with its own exit code, never a signal at interpreter exit.

A client whose network threads are not Python's own can abort the process as it exits: the Rust
``object_store`` binding (obstore 0.12) did in 2 of 30 runs of 500 small GETs on this machine. A
Tokio worker still inside ``loop.call_soon_threadsafe`` (the wake-up write of a finished future)
re-takes the GIL after the main thread began finalizing; CPython 3.11 then ends that thread with
``pthread_exit``, whose forced unwind through Rust frames is an ``abort()`` (SIGABRT, exit 134)
after the work was done. moverd's S3 reads run in Python's own worker threads (urllib3 under
anyio), which finalization stops cleanly. This test runs the real command many times over a
few hundred GETs each and counts the exit codes."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.support.s3 import s3_landing_toml

RUNS = 12
OBJECTS = 200


def test_many_archive_runs_from_s3_all_exit_zero(tmp_path: Path, s3_options: dict[str, Any],
                                                 s3_server: Any) -> None:
    bucket, prefix = s3_options["bucket"], "ds/raw"
    client = s3_server.client()
    for i in range(OBJECTS):
        client.put_object(Bucket=bucket, Key=f"{prefix}/f{i:04d}.bin", Body=bytes([i % 251]) * 4096)
    cfg = tmp_path / "moverd.toml"
    cfg.write_text(s3_landing_toml(s3_options))
    base = {k: v for k, v in os.environ.items() if not k.startswith("MOVERD_")}
    codes: collections.Counter[int] = collections.Counter()
    failures = []
    for run in range(RUNS):
        env = {**base, "MOVERD_STATE_DIR": str(tmp_path / f"state-{run}")}  # a fresh archive each time
        p = subprocess.run([sys.executable, "-m", "moverd", "archive", f"landing:{prefix}", "--json", "-c", str(cfg)],
                           env=env, capture_output=True, text=True, timeout=120)
        codes[p.returncode] += 1
        if p.returncode != 0:
            failures.append(f"run {run}: exit {p.returncode}: {p.stderr[-500:]}")
        else:
            assert json.loads(p.stdout)["files"] == OBJECTS
    assert codes == {0: RUNS}, "\n".join(failures)
