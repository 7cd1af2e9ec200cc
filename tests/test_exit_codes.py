"""Errors a user makes get one clear line and the documented exit code, and change nothing.

2: user error (bad input); 3: broken configuration, found before anything is registered.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.support.cli import MOVERD, cli_env, moverd


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return cli_env(tmp_path)


def datasets(env: dict[str, str]) -> list[dict[str, object]]:
    p = moverd(["datasets", "--json"], env)
    assert p.returncode == 0, p.stderr
    return list(json.loads(p.stdout))


def test_a_file_name_that_is_not_utf8_is_a_user_error_naming_it(tmp_path: Path, env: dict[str, str]) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "ok.txt").write_text("fine")
    with open(os.path.join(os.fsencode(src / "sub"), b"caf\xe9-\xff.tif"), "wb") as f:
        f.write(b"data")
    p = moverd(["archive", str(src)], env)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in p.stderr
    assert "sub/caf\\xe9-\\xff.tif" in lines[0] and "not valid UTF-8" in lines[0]
    assert datasets(env) == []


def test_an_unknown_checksum_is_a_configuration_error_at_start(tmp_path: Path, env: dict[str, str]) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a").write_text("a")
    env["MOVERD_PIPELINE__CHECKSUM"] = "md7"
    p = moverd(["config", "check"], env)
    assert p.returncode == 3 and "pipeline.checksum: unknown algorithm 'md7'" in p.stderr
    p = moverd(["archive", str(tmp_path / "src")], env)
    assert p.returncode == 3, p.stderr
    assert "pipeline.checksum: unknown algorithm 'md7'" in p.stderr
    del env["MOVERD_PIPELINE__CHECKSUM"]
    assert datasets(env) == []


@pytest.mark.parametrize("section", [
    "[storages.lts]\ntype = \"posix\"\nroot = \"{root}\"\nwrite_limt = 2\n",
    "[storages.lts]\ntype = \"nosuchtype\"\n",
    "[storages.landing]\ntype = \"s3\"\nbucket = \"landing\"\nendpoint_url = 7\n",
])
def test_a_storage_configuration_error_comes_before_any_dataset(
    tmp_path: Path, env: dict[str, str], section: str
) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a").write_text("a")
    config = tmp_path / "moverd.toml"
    config.write_text(section.format(root=tmp_path / "lts"))
    for _ in range(2):
        p = moverd(["archive", str(tmp_path / "src"), "-c", str(config)], env)
        assert p.returncode == 3, p.stderr
        assert "storages." in p.stderr
    assert datasets(env) == []


def test_an_environment_override_merges_with_the_embedded_default(tmp_path: Path, env: dict[str, str]) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.txt").write_text("hello")
    env["MOVERD_STORAGES__LTS__ROOT"] = str(tmp_path / "elsewhere")
    p = moverd(["config", "check"], env)
    assert p.returncode == 0, p.stderr
    shown = json.loads(moverd(["config", "show"], env).stdout)["storages"]["lts"]
    assert shown["type"] == "posix" and shown["root"] == str(tmp_path / "elsewhere")
    p = moverd(["archive", str(tmp_path / "src"), "--json"], env)
    assert p.returncode == 0, p.stderr
    assert list((tmp_path / "elsewhere").rglob("*.tar"))
    assert not (tmp_path / "state" / "lts").exists() or not list((tmp_path / "state" / "lts").rglob("*.tar"))


def test_job_create_on_a_missing_folder_says_the_folder_is_missing(tmp_path: Path, env: dict[str, str]) -> None:
    p = subprocess.run([*MOVERD, "job", "create", "archive", "./my-dataset"], env=env, capture_output=True,
                       text=True, timeout=60, cwd=tmp_path)
    assert p.returncode == 2 and "folder './my-dataset' does not exist" in p.stderr, p.stderr
    p = moverd(["job", "create", "archive", "local/no-such-dataset"], env)
    assert p.returncode == 2 and "not found in the local catalog" in p.stderr, p.stderr


def test_upload_exit_codes_without_a_daemon(tmp_path: Path, env: dict[str, str]) -> None:
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "a").write_text("a")
    from tests.support.s3 import free_port

    url = f"http://127.0.0.1:{free_port()}/archiver/api/v1"
    p = moverd(["upload", str(tmp_path / "ds"), "--dataset", "x", "--url", url, "--part-size", "1MiB"], env)
    assert p.returncode == 2 and "--part-size" in p.stderr and "Traceback" not in p.stderr
    p = moverd(["upload", str(tmp_path / "nope"), "--dataset", "x", "--url", url], env)
    assert p.returncode == 2 and "no such file or folder" in p.stderr
    p = moverd(["upload", str(tmp_path / "ds"), "--dataset", "x", "--url", url], env)
    assert p.returncode == 1 and "ConnectError" in p.stderr and len(p.stderr.strip().splitlines()) == 1
