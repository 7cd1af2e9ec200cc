"""Archiving the same folder again after a crash resumes it; an archived folder is not archived twice.

A real ``moverd archive`` process is killed with SIGKILL once some datablocks are committed on the
LTS (seen from the LTS directory itself), then the same command runs again.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.support.trees import read_tree

MOVERD = [sys.executable, "-m", "moverd"]
KiB = 1024


def env_for(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOVERD_")}
    env.update(MOVERD_STATE_DIR=str(tmp_path / "state"), MOVERD_PIPELINE__TARGET_SIZE="1MiB",
               MOVERD_PIPELINE__DATABLOCK_CONCURRENCY="1")
    return env


def moverd(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(MOVERD + args, env=env, capture_output=True, text=True, timeout=180)


def committed(lts: Path) -> int:
    return sum(1 for _ in lts.rglob("*.index.json")) if lts.exists() else 0


def test_a_killed_archive_resumes_on_the_same_folder(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    rng = random.Random()
    for i in range(120):
        (src / f"d{i % 4}").mkdir(exist_ok=True)
        (src / f"d{i % 4}" / f"f{i:03d}.bin").write_bytes(os.urandom(512 * KiB))
    env = env_for(tmp_path)
    lts = tmp_path / "state" / "lts"
    proc = subprocess.Popen([*MOVERD, "archive", str(src), "--json"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    kill_after = rng.randint(2, 20)
    deadline = time.monotonic() + 120
    while committed(lts) < kill_after and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = committed(lts)
    assert before >= 1, "the archive ended before it could be killed"

    p = moverd(["archive", str(src), "--json"], env)
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)
    assert res["resumed"] is True and res["reused"] >= before - 1 and res["reused"] + res["written"] == 60
    datasets = json.loads(moverd(["datasets", "--json"], env).stdout)
    assert [d["pid"] for d in datasets] == [res["dataset"]]
    assert datasets[0]["lifecycle"]["archive_status"] == "datasetOnArchiveDisk"
    # One dataset's tars on the LTS, no temporary files, and no more bytes than one copy.
    tars = list(lts.rglob("*.tar"))
    assert len(tars) == 60
    assert [p for p in lts.rglob("*") if p.is_file() and not p.name.endswith((".tar", ".index.json"))] == []
    data = sum(f.stat().st_size for f in src.rglob("*") if f.is_file())
    assert sum(t.stat().st_size for t in tars) < data * 1.01

    # Again: reported as archived, not archived twice.
    p = moverd(["archive", str(src)], env)
    assert p.returncode == 0, p.stderr
    assert "already archived" in p.stdout and res["dataset"] in p.stdout and "--new" in p.stdout
    assert len(json.loads(moverd(["datasets", "--json"], env).stdout)) == 1
    # --new: a second dataset, as asked.
    p = moverd(["archive", str(src), "--new", "--json"], env)
    assert p.returncode == 0, p.stderr
    second = json.loads(p.stdout)["dataset"]
    assert second != res["dataset"] and len(json.loads(moverd(["datasets", "--json"], env).stdout)) == 2
    moverd(["retrieve", res["dataset"], "--to", str(tmp_path / "out")], env)
    assert read_tree(tmp_path / "out") == read_tree(src)


def test_an_interrupted_archive_says_how_to_resume(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(120):
        (src / f"f{i:03d}.bin").write_bytes(os.urandom(512 * KiB))
    env = env_for(tmp_path)
    lts = tmp_path / "state" / "lts"
    proc = subprocess.Popen([*MOVERD, "archive", str(src)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while committed(lts) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert f"resume with: moverd archive {src}" in err
    p = moverd(["archive", str(src), "--json"], env)
    assert p.returncode == 0 and json.loads(p.stdout)["resumed"] is True, p.stderr


def test_a_changed_folder_is_a_new_dataset(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.bin").write_bytes(os.urandom(64 * KiB))
    env = env_for(tmp_path)
    first = json.loads(moverd(["archive", str(src), "--json"], env).stdout)["dataset"]
    (src / "b.bin").write_bytes(b"more")
    p = moverd(["archive", str(src), "--json"], env)
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)
    assert res["dataset"] != first and not res["resumed"] and res["files"] == 2


def test_archiving_a_catalogued_dataset_runs_the_job_lifecycle(tmp_path: Path) -> None:
    """``moverd archive <id>`` of a dataset in the landing zone: verified, registered, then the
    landing files deleted, as a job does; a missing file is a user error with the dataset marked
    so and nothing registered."""
    import anyio

    from moverd.app import App
    from moverd.config import Settings
    from moverd.models import FileEntry

    env = env_for(tmp_path)
    state = tmp_path / "state"

    async def register(name: str, files: dict[str, bytes], upload: dict[str, bytes]) -> str:
        async with App(Settings(state_dir=state)) as app:
            ds = await app.catalog.create_dataset(
                [FileEntry(path=p, size=len(d)) for p, d in files.items()], pid=f"facility/{name}")
            for p, d in upload.items():
                target = state / "landing" / ds.pid / p
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(d)
            return ds.pid

    files = {"raw/a.bin": os.urandom(200 * KiB), "b.json": b"{}"}
    pid = anyio.run(register, "good", files, files)
    p = moverd(["archive", pid, "--json"], env)
    assert p.returncode == 0, p.stderr
    assert not any((state / "landing" / pid).rglob("*.bin"))  # deleted once verified
    shown = {d["pid"]: d for d in json.loads(moverd(["datasets", "--json"], env).stdout)}
    assert shown[pid]["lifecycle"]["archive_status"] == "datasetOnArchiveDisk"

    bad = anyio.run(register, "bad", files, {"b.json": b"{}"})
    p = moverd(["archive", bad], env)
    assert p.returncode == 2 and "'raw/a.bin' is missing" in p.stderr, p.stderr
    shown = {d["pid"]: d for d in json.loads(moverd(["datasets", "--json"], env).stdout)}
    assert shown[bad]["lifecycle"]["archive_status"] == "missingFilesError"
    assert (state / "landing" / bad / "b.json").exists()  # kept
