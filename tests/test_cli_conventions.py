"""What rclone, restic and prefect users expect of a command line, tried on the real command."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import time
import tomllib
from pathlib import Path

import pytest

from tests.support.cli import MOVERD, cli_env, moverd


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return cli_env(tmp_path)


def folder(path: Path, n: int = 1) -> Path:
    path.mkdir(parents=True)
    for i in range(n):
        (path / f"f{i}.bin").write_bytes(os.urandom(3000))
    return path


def test_version_and_short_help(env: dict[str, str]) -> None:
    from moverd import __version__

    p = moverd(["--version"], env)
    assert p.returncode == 0 and p.stdout.strip() == f"moverd {__version__}"
    for args in (["-h"], ["archive", "-h"], ["config", "check", "-h"], ["job", "-h"]):
        p = moverd(args, env)
        assert p.returncode == 0 and "Usage: moverd" in p.stdout, (args, p.stderr)


def test_config_before_or_after_the_command(tmp_path: Path, env: dict[str, str]) -> None:
    del env["MOVERD_STATE_DIR"]  # the files say where state lives
    src = folder(tmp_path / "src")
    one, two = tmp_path / "one.toml", tmp_path / "two.toml"
    one.write_text(f'state_dir = "{tmp_path / "state-one"}"\n')
    two.write_text(f'state_dir = "{tmp_path / "state-two"}"\n')
    assert moverd(["-c", str(one), "archive", str(src)], env).returncode == 0
    assert list((tmp_path / "state-one").rglob("*.tar"))
    # after the command it is that command's, and wins over one given before
    assert moverd(["-c", str(one), "archive", str(src), "--new", "-c", str(two)], env).returncode == 0
    assert list((tmp_path / "state-two").rglob("*.tar"))
    p = moverd(["--config", str(tmp_path / "missing.toml"), "datasets"], env)
    assert p.returncode == 3 and "missing.toml" in p.stderr


def test_json_errors_are_json(tmp_path: Path, env: dict[str, str]) -> None:
    for args, code, kind in (
        (["retrieve", "local/nope", "--to", str(tmp_path / "o"), "--json"], 2, "user_error"),
        (["archive", str(tmp_path / "src"), "--json", "-c", str(tmp_path / "nope.toml")], 3, "config_error"),
    ):
        p = moverd(args, env)
        assert p.returncode == code and p.stdout == ""
        err = json.loads(p.stderr)["error"]
        assert err["kind"] == kind and err["exit_code"] == code and err["message"]


def test_piped_lists_show_whole_ids_and_sentences_count_right(tmp_path: Path, env: dict[str, str]) -> None:
    p = moverd(["archive", str(folder(tmp_path / "src"))], env)
    assert p.returncode == 0
    assert ": 1 file, " in p.stdout and " in 1 datablock (" in p.stdout and "(s)" not in p.stdout
    pid = next(w for w in p.stdout.split() if w.startswith("local/")).rstrip(":")
    rows = moverd(["datasets"], env).stdout.splitlines()
    assert rows[0].split("\t")[0] == "dataset" and rows[1].split("\t")[0] == pid
    job = moverd(["job", "create", "archive", str(tmp_path / "src")], env).stdout.strip()
    rows = moverd(["job", "list"], env).stdout.splitlines()
    assert rows[1].split("\t")[:3] == [job, "archive", "jobSubmitted"]
    listed = json.loads(moverd(["job", "list", "--json"], env).stdout)
    assert [j["id"] for j in listed] == [job]


def test_config_show_toml_is_the_same_configuration(tmp_path: Path, env: dict[str, str]) -> None:
    as_json = json.loads(moverd(["config", "show"], env).stdout)
    as_toml = tomllib.loads(moverd(["config", "show", "--toml"], env).stdout)

    def without_none(d: dict) -> dict:  # type: ignore[type-arg]
        return {k: without_none(v) if isinstance(v, dict) else v for k, v in d.items() if v is not None}

    assert as_toml == without_none(as_json)
    # and moverd reads it back as its configuration
    cfg = tmp_path / "shown.toml"
    cfg.write_text(moverd(["config", "show", "--toml"], env).stdout)
    assert moverd(["config", "check", "-c", str(cfg)], env).returncode == 0


def test_progress_on_a_terminal_uses_binary_units(tmp_path: Path, env: dict[str, str]) -> None:
    src = folder(tmp_path / "src", n=40)
    leader, follower = pty.openpty()
    env = {**env, "COLUMNS": "160"}
    proc = subprocess.Popen([*MOVERD, "archive", str(src)], env=env, stdin=follower, stdout=follower,
                            stderr=follower, close_fds=True)
    os.close(follower)
    seen = b""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        ready, _, _ = select.select([leader], [], [], 1)
        if ready:
            try:
                chunk = os.read(leader, 65536)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
        elif proc.poll() is not None:
            break
    proc.wait(timeout=30)
    os.close(leader)
    text = seen.decode(errors="replace")
    assert proc.returncode == 0, text
    assert "/40 files" in text and "B/s" in text
    assert " MB/s" not in text and " kB/s" not in text
