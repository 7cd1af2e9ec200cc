"""The moverd command as a user runs it: a subprocess, on the embedded default."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.cli import MOVERD, cli_env, moverd_on_terminal, run
from tests.support.trees import awkward_tree, read_tree, small_files_tree


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return cli_env(tmp_path, MOVERD_PIPELINE__TARGET_SIZE="1MiB")


def test_archive_retrieve_verify_from_the_command_line(tmp_path: Path, env: dict[str, str]) -> None:
    files = awkward_tree(tmp_path / "src")
    res = json.loads(run(["archive", str(tmp_path / "src"), "--json"], env).stdout)
    pid = res["dataset"]
    assert res["files"] == len(files) and res["written"] == len(res["datablocks"])
    listed = json.loads(run(["datasets", "--json"], env).stdout)
    assert [d["pid"] for d in listed] == [pid]
    assert listed[0]["lifecycle"]["archive_status"] == "datasetOnArchiveDisk"
    run(["retrieve", pid, "--to", str(tmp_path / "out")], env)
    assert read_tree(tmp_path / "out") == files
    run(["retrieve", pid, "--to", str(tmp_path / "one"), "--file", "big.bin"], env)
    assert read_tree(tmp_path / "one") == {"big.bin": files["big.bin"]}
    verified = json.loads(run(["verify", pid, "--json"], env).stdout)
    assert verified["failed"] == {} and len(verified["ok"]) == len(res["datablocks"])


@pytest.mark.parametrize(
    "args,code,message",
    [
        (["retrieve", "no-such-dataset", "--to", "x"], 2, "dataset 'no-such-dataset' not found"),
        (["archive", "./does-not-exist"], 2, "folder './does-not-exist' does not exist"),
        (["verify", "local/unknown"], 2, "not found"),
    ],
)
def test_bad_input_is_one_clear_line_and_an_exit_code(env: dict[str, str], args, code, message) -> None:
    p = run(args, env, check=False)
    assert p.returncode == code, p.stderr
    assert p.stderr.count("\n") == 1 and message in p.stderr
    assert "Traceback" not in p.stderr


def test_sigkill_mid_datablock_then_rerun_completes(tmp_path: Path, env: dict[str, str]) -> None:
    files = small_files_tree(tmp_path / "src", 48, size=2 * 2**20)  # 96 MiB, ~48 datablocks of 2 MiB
    env = {**env, "MOVERD_PIPELINE__TARGET_SIZE": "2MiB", "MOVERD_PIPELINE__DATABLOCK_CONCURRENCY": "1"}
    lts = tmp_path / "state" / "lts"
    proc = subprocess.Popen([*MOVERD, "archive", str(tmp_path / "src")], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    killed = False
    while time.monotonic() < deadline and proc.poll() is None:
        tmp = [p for p in lts.rglob("*") if ".moverd-tmp-" in p.name]
        done = list(lts.rglob("*.tar"))
        if tmp and len(done) >= 3:
            proc.send_signal(signal.SIGKILL)
            killed = True
            break
        time.sleep(0.002)
    proc.wait()
    assert killed, "the archive finished before it could be killed"
    # committed = the tar and its member index (a tar killed before its index is written again)
    committed_before = {p: p.stat().st_mtime_ns for p in lts.rglob("*.tar") if Path(f"{p}.index.json").exists()}
    assert len(committed_before) >= 2
    pid = json.loads(run(["datasets", "--json"], env).stdout)[0]["pid"]
    res = json.loads(run(["archive", pid, "--json"], env).stdout)
    assert res["reused"] == len(committed_before) and res["written"] + res["reused"] == len(res["datablocks"])
    assert not [p for p in lts.rglob("*") if ".moverd-tmp-" in p.name]
    for p, mtime in committed_before.items():
        assert p.stat().st_mtime_ns == mtime  # committed datablocks were reused, not rewritten
    run(["retrieve", pid, "--to", str(tmp_path / "out")], env)
    assert read_tree(tmp_path / "out") == files


def test_progress_bars_on_a_terminal_and_rich_only_when_shown(tmp_path: Path, env: dict[str, str]) -> None:
    """On a terminal the archive shows a bar (bytes, files) on stderr; with ``--json`` rich is
    not even imported (it costs ~25 ms of every start)."""
    small_files_tree(tmp_path / "src", 20, size=50_000)
    p, shown = moverd_on_terminal(["archive", str(tmp_path / "src")], env, timeout=120)
    assert p.returncode == 0, shown.decode(errors="replace")
    assert "archived" in p.stdout
    assert b"archive " in shown and b"20/20 files" in shown
    probe = (
        "import sys, runpy; sys.argv = ['moverd', 'datasets', '--json']\n"
        "try:\n    runpy.run_module('moverd', run_name='__main__')\nexcept SystemExit:\n    pass\n"
        "print('RICH', any(m == 'rich.console' for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60).stdout
    assert "RICH False" in out


def test_a_command_that_needs_no_prefect_does_not_import_it(tmp_path: Path, env: dict[str, str]) -> None:
    """Every command reads the whole configuration (``DaemonSettings``, which builds on the Prefect
    layer's ``FlowSettings``); importing that must not import Prefect itself, which costs a CLI run
    about a second of CPU and 40 MiB (the archive bench caught it once: 2.3 -> 4.0 CPU s per GiB)."""
    probe = (
        "import sys, runpy; sys.argv = ['moverd', 'datasets', '--json']\n"
        "try:\n    runpy.run_module('moverd', run_name='__main__')\nexcept SystemExit:\n    pass\n"
        "print('PREFECT', sorted(m for m in sys.modules if m == 'prefect' or m.startswith('prefect.'))[:3])"
    )
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60)
    assert "PREFECT []" in out.stdout, out.stdout + out.stderr
