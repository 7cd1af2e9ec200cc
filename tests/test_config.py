"""Configuration: TOML, environment overrides, secrets from files, and clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moverd import ConfigError
from moverd.config import load_settings

MOVERD = [sys.executable, "-m", "moverd"]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOVERD_")}
    return {**env, **extra}


def config_check(path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*MOVERD, "config", "check", "--config", str(path)], capture_output=True, text=True,
                          env=clean_env(**env), timeout=60)


def test_toml_and_environment_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "moverd.toml"
    cfg.write_text(f'state_dir = "{tmp_path}/state"\n[pipeline]\ntarget_size = "20GiB"\nchecksum = "sha256"\n')
    monkeypatch.setenv("MOVERD_PIPELINE__TARGET_SIZE", "1GiB")
    s = load_settings(cfg)
    assert s.pipeline.target_size == 2**30 and s.pipeline.checksum == "sha256"
    assert s.storages["lts"] == {"type": "posix", "root": f"{tmp_path}/state/lts", "create": True}
    monkeypatch.setenv("MOVERD_CONFIG", str(cfg))
    assert load_settings(None).pipeline.checksum == "sha256"


def test_every_problem_is_reported_with_its_key(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(
        "[pipeline]\ntarget_size = \"20 gigs\"\nbogus = 1\n"
        "[storages.lts]\ntype = \"posix\"\nroot = \"/does/not/exist\"\n"
        "[storages.landing]\ntype = \"s3\"\nbucket = \"landing\"\nsecret_access_key_file = \"/no/such/secret\"\n"
    )
    with pytest.raises(ConfigError) as err:
        load_settings(cfg)
    text = str(err.value)
    assert "pipeline.target_size: not a size: '20 gigs'" in text and "pipeline.bogus: unknown key" in text
    cfg.write_text(
        "[storages.lts]\ntype = \"posix\"\nroot = \"/does/not/exist\"\nwrite_limit = 4\nfrobnicate = true\n"
        "[storages.landing]\ntype = \"s3\"\nbucket = \"landing\"\nsecret_access_key_file = \"/no/such/secret\"\n"
        "[storages.extra]\ntype = \"ftp\"\n"
    )
    p = config_check(cfg)
    assert p.returncode == 3
    lines = p.stderr.splitlines()
    assert any("storages.lts.root" in ln and "does not exist" in ln for ln in lines), p.stderr
    assert any("storages.lts.frobnicate: unknown key" in ln for ln in lines), p.stderr
    assert any("secret_access_key_file" in ln and "/no/such/secret" in ln and "does not exist" in ln
               for ln in lines), p.stderr
    assert any("storages.extra.type: unknown storage type 'ftp'" in ln for ln in lines), p.stderr
    assert "Traceback" not in p.stderr


@pytest.mark.parametrize(
    "content,message",
    [
        ("[pipeline\n", "is not valid TOML"),
        ("state_dir = 3\n", "state_dir: Input is not a valid path"),
        ("[catalog]\nurl = 'x'\n", "catalog: needs a 'type'"),
        ("[catalog]\ntype = 'scicat'\nurl = 'http://x'\n", "catalog.username"),
        ("[scheduler]\njournal_retention = '-5d'\n", "scheduler.journal_retention: not a duration: '-5d'"),
        ("[pipeline]\nprefetch_bytes = '16 lots'\n", "pipeline.prefetch_bytes"),
        ("[pipeline]\nprefetch_bytes = '1KiB'\n", "pipeline.prefetch_bytes"),
    ],
)
def test_broken_config_files(tmp_path: Path, content: str, message: str) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(content)
    p = config_check(cfg)
    assert p.returncode == 3 and message in p.stderr, p.stderr


def test_missing_config_file_and_good_config(tmp_path: Path) -> None:
    p = config_check(tmp_path / "nope.toml")
    assert p.returncode == 3 and "does not exist" in p.stderr
    good = tmp_path / "good.toml"
    good.write_text(f'state_dir = "{tmp_path}/s"\n')
    p = config_check(good)
    assert p.returncode == 0 and "configuration OK" in p.stdout


def test_show_masks_secrets(tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("s3cr3t-value\n")
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        f'state_dir = "{tmp_path}/s"\n[storages.landing]\ntype = "s3"\nbucket = "landing"\n'
        f'endpoint_url = "http://127.0.0.1:9"\naccess_key_id = "AKIA"\nsecret_access_key_file = "{secret}"\n'
    )
    p = subprocess.run([*MOVERD, "config", "show", "-c", str(cfg)], capture_output=True, text=True,
                       env=clean_env(), timeout=60)
    assert p.returncode == 0, p.stderr
    assert "s3cr3t-value" not in p.stdout and "AKIA" not in p.stdout
    shown = json.loads(p.stdout)
    assert shown["storages"]["landing"]["secret_access_key"] == "**********"
    assert shown["storages"]["lts"]["type"] == "posix"


def test_one_check_finds_every_typo_with_a_suggestion_and_the_variable(tmp_path: Path) -> None:
    cfg = tmp_path / "typos.toml"
    cfg.write_text(
        f'state_dir = "{tmp_path}/s"\nbogus = 1\n[pipeline]\nchunk_sise = "1MiB"\n'
        f'[storages.lts]\ntype = "posix"\nroot = "{tmp_path}"\nwrite_limt = 2\n'
        f'[storages.landing]\ntype = "posix"\nroot = "{tmp_path}"\nfsyn = true\n'
    )
    p = config_check(cfg, MOVERD_PIPELINE__TARGET_SIZE="lots")
    assert p.returncode == 3
    lines = p.stderr.splitlines()
    wanted = [
        "bogus: unknown key",
        "pipeline.chunk_sise: unknown key; did you mean 'chunk_size'?",
        "storages.lts.write_limt: unknown key; did you mean 'write_limit'?",
        "storages.landing.fsyn: unknown key; did you mean 'fsync'?",
        "(from the environment variable MOVERD_PIPELINE__TARGET_SIZE)",
    ]
    for w in wanted:
        assert any(w in ln for ln in lines), (w, p.stderr)


def test_connect_reaches_every_part(tmp_path: Path, s3_options: dict[str, str], scicat) -> None:  # type: ignore[no-untyped-def]
    from tests.support.scicat import ARCHIVER

    def toml(endpoint: str, scicat_url: str) -> str:
        return (
            f'state_dir = "{tmp_path}/s"\n[storages.landing]\ntype = "s3"\nbucket = "{s3_options["bucket"]}"\n'
            f'endpoint_url = "{endpoint}"\naccess_key_id = "{s3_options["access_key_id"]}"\n'
            f'secret_access_key = "{s3_options["secret_access_key"]}"\nmax_attempts = 1\n'
            f'[catalog]\ntype = "scicat"\nurl = "{scicat_url}"\nusername = "{ARCHIVER[0]}"\n'
            f'password = "{ARCHIVER[1]}"\n'
        )

    cfg = tmp_path / "good.toml"
    cfg.write_text(toml(s3_options["endpoint_url"], scicat.url))
    p = subprocess.run([*MOVERD, "config", "check", "--connect", "-c", str(cfg)], capture_output=True, text=True,
                       env=clean_env(), timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    for what in ("catalog (scicat): reachable, logged in", "storage landing (s3): listed, writable",
                 "storage lts (posix): listed, writable"):
        assert any(ln.startswith("ok") and what in ln for ln in p.stdout.splitlines()), p.stdout
    assert scicat.requests("POST", "auth/login")
    # Nothing is left behind by the probes.
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_options["endpoint_url"], aws_access_key_id="testing",
                      aws_secret_access_key="testing", region_name="us-east-1")
    assert s3.list_objects_v2(Bucket=s3_options["bucket"]).get("KeyCount", 0) == 0
    # A wrong password and a closed port: each part says what failed, and the exit code is 1.
    bad = tmp_path / "bad.toml"
    bad.write_text(toml("http://127.0.0.1:9", scicat.url).replace(f'password = "{ARCHIVER[1]}"', 'password = "no"'))
    p = subprocess.run([*MOVERD, "config", "check", "--connect", "-c", str(bad)], capture_output=True,
                       text=True, env=clean_env(), timeout=180)
    assert p.returncode == 1, p.stdout + p.stderr
    fails = [ln for ln in p.stdout.splitlines() if ln.startswith("FAIL")]
    assert any("catalog (scicat)" in ln for ln in fails) and any("storage landing (s3)" in ln for ln in fails)
    assert any("127.0.0.1:9" in ln for ln in fails), p.stdout


def test_a_retry_of_an_error_without_a_message_names_its_type(caplog) -> None:  # type: ignore[no-untyped-def]
    import anyio

    from moverd import retry_async

    calls = []

    async def op() -> int:
        calls.append(1)
        if len(calls) == 1:
            raise TimeoutError()
        return 7

    async def main() -> int:
        return await retry_async(op, retryable=lambda exc: True, attempts=2, what="GET x", base_delay=0.01)

    assert anyio.run(main) == 7
    assert "GET x failed (TimeoutError), retry 1/1" in caplog.text


def test_a_removed_s3_option_still_loads_with_a_warning(tmp_path: Path) -> None:
    """``fast_get`` chose between two read paths; there is one now. A configuration written for
    the older moverd still loads, and says the key can go."""
    cfg = tmp_path / "old.toml"
    cfg.write_text(
        f'state_dir = "{tmp_path}/state"\n'
        "[storages.landing]\ntype = \"s3\"\nbucket = \"landing\"\nendpoint_url = \"http://127.0.0.1:9\"\n"
        "access_key_id = \"a\"\nsecret_access_key = \"b\"\nfast_get = false\n"
    )
    p = config_check(cfg)
    assert p.returncode == 0, p.stderr
    assert "fast_get is deprecated and has no effect" in p.stderr and "delete the key" in p.stderr
