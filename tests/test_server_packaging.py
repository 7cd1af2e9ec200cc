"""Packaging checks that need no engine: the example configuration is valid and documents every
key of every section and plugin, the systemd unit verifies, the compose file is well-formed and
every variable it uses is in ``.env.example``; plus the systemd notify protocol itself."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, get_args

import pytest
import yaml
from moverd_catalog_scicat.options import SciCatOptions
from moverd_flows.settings import PrefectSettings
from moverd_storage_lts.options import PosixOptions
from moverd_storage_s3.options import S3Options
from pydantic import BaseModel, SecretStr

from moverd.builtin.local_catalog import LocalCatalogOptions
from moverd.config import ArchiveSettings, PipelineSettings, RetrieveSettings, load_settings
from moverd_daemon.notify import Notifier
from moverd_daemon.settings import AuthSettings, DaemonSettings, IngestSettings, SchedulerSettings, ServerSettings

PACKAGING = Path(__file__).resolve().parents[1] / "packaging"
EXAMPLE = PACKAGING / "moverd.example.toml"

SECTION = re.compile(r"^\s*\[([a-z_.]+)\]\s*$")
KEY = re.compile(r"^\s*#?\s*([a-z_]+)\s*=")


def documented_keys() -> dict[str, set[str]]:
    """Keys per section, set or commented out (``# key = ...``), as the example shows them."""
    out: dict[str, set[str]] = {"": set()}
    section = ""
    for line in EXAMPLE.read_text().splitlines():
        m = SECTION.match(line)
        if m:
            section = m.group(1)
            out.setdefault(section, set())
            continue
        k = KEY.match(line)
        if k:
            out[section].add(k.group(1))
    return out


def _secret(model: type[BaseModel], name: str) -> bool:
    ann = model.model_fields[name].annotation
    return ann is SecretStr or SecretStr in get_args(ann)


def missing(model: type[BaseModel], keys: set[str], skip: set[str] | frozenset[str] = frozenset()) -> list[str]:
    out = []
    for name, field in model.model_fields.items():
        if field.deprecated:  # kept so that old files load; not shown to new ones
            continue
        if name in skip or name in keys:
            continue
        if f"{name}_file" in keys and (_secret(model, name) or name == "username"):
            continue
        out.append(name)
    return out


def test_example_config_documents_every_key() -> None:
    keys = documented_keys()
    sections: list[tuple[str, type[BaseModel], set[str]]] = [
        ("", DaemonSettings,
         {"pipeline", "archive", "retrieve", "prefect", "server", "scheduler", "storages", "catalog", "ingest"}),
        ("pipeline", PipelineSettings, set()),
        ("archive", ArchiveSettings, set()),
        ("retrieve", RetrieveSettings, set()),
        ("prefect", PrefectSettings, set()),
        ("server", ServerSettings, {"auth"}),
        ("server.auth", AuthSettings, set()),
        ("scheduler", SchedulerSettings, set()),
        ("ingest", IngestSettings, set()),
        ("storages.lts", PosixOptions, set()),
        ("storages.landing", S3Options, set()),
        ("catalog", SciCatOptions, set()),
        ("catalog", LocalCatalogOptions, set()),
    ]
    problems = {f"[{name}]": missing(model, keys.get(name, set()), skip) for name, model, skip in sections}
    assert {k: v for k, v in problems.items() if v} == {}
    text = EXAMPLE.read_text()
    for line in text.splitlines():  # every key set or shown has a comment above it or beside it
        assert len(line) <= 120, line


def test_example_config_is_valid(tmp_path: Path) -> None:
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    text = EXAMPLE.read_text()
    for name in set(re.findall(r"/run/secrets/([a-z_]+)", text)):
        (secrets / name).write_text(f"{name}-value\n")
    (tmp_path / "lts").mkdir()
    text = text.replace("/run/secrets/", f"{secrets}/").replace('"/mnt/lts/archive"', f'"{tmp_path / "lts"}"')
    config = tmp_path / "moverd.toml"
    config.write_text(text)
    settings = load_settings(config, DaemonSettings)
    assert settings.server.root_path == "/archiver/api/v1" and settings.prefect.global_limits
    assert settings.server.auth.basic_password is not None
    assert settings.server.auth.basic_password.get_secret_value() == "moverd_api_password-value"
    assert settings.server.auth.effective_jwks_url == "https://kc.psi.ch/realms/awi/protocol/openid-connect/certs"
    done = subprocess.run([sys.executable, "-m", "moverd", "config", "check", "--config", str(config)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    unit = (PACKAGING / "systemd" / "moverd.service").read_text()
    for key in ("Type=notify", "User=moverd", "ProtectSystem=strict", "ReadWritePaths=", "NoNewPrivileges=yes",
                "PrivateTmp=yes", "Restart=on-failure", "WatchdogSec="):
        assert key in unit, key
    # verify needs an executable ExecStart: this checkout's moverd stands in for /opt/moverd's
    exe = Path(sys.executable).with_name("moverd")
    path = tmp_path / "moverd.service"
    path.write_text(unit.replace("/opt/moverd/bin/moverd", str(exe)))
    done = subprocess.run([analyze, "verify", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stderr.strip() == "", done.stderr


def test_compose_file_and_env_example(tmp_path: Path) -> None:
    compose_text = (PACKAGING / "compose.yaml").read_text()
    compose: dict[str, Any] = yaml.safe_load(compose_text)
    services = compose["services"]
    expected = {"postgres", "prefect-server", "prefect-config", "minio", "moverd-archival", "moverd-retrieval"}
    assert expected <= set(services)
    for name in ("moverd-archival", "moverd-retrieval"):
        env = services[name]["environment"]
        assert env["PREFECT_API_URL"].startswith("http://prefect-server")
        assert set(services[name]["secrets"]) >= {"scicat_password", "minio_password"}
    assert all("file" in s for s in compose["secrets"].values())
    used = set(re.findall(r"\$\{([A-Z_]+)(?::-[^}]*)?\}", compose_text))
    defined = {line.split("=", 1)[0] for line in (PACKAGING / ".env.example").read_text().splitlines()
               if line and not line.startswith("#") and "=" in line}
    assert used - defined == set(), "variables the compose file uses but .env.example does not define"
    dc = shutil.which("docker-compose")
    if dc is None:
        return
    work = tmp_path / "compose"
    (work / ".secrets").mkdir(parents=True)
    shutil.copy(PACKAGING / "compose.yaml", work / "compose.yaml")
    shutil.copy(PACKAGING / ".env.example", work / ".env")
    for secret in compose["secrets"].values():
        (work / secret["file"]).write_text("x\n")
    done = subprocess.run([dc, "-f", "compose.yaml", "config", "-q"], cwd=work, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr


def test_systemd_notify_protocol(tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(str(path))
        server.settimeout(2)
        n = Notifier({"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "4000000"})
        assert n.enabled and n.watchdog_interval == 2.0
        assert n.ready("ready: http://x")
        assert server.recv(4096).decode().splitlines()[:2] == ["READY=1", "STATUS=ready: http://x"]
        assert n.watchdog()
        assert server.recv(4096) == b"WATCHDOG=1"
        assert n.stopping("draining 1 job(s)", extend_seconds=5)
        assert server.recv(4096).decode().splitlines() == [
            "STOPPING=1", "STATUS=draining 1 job(s)", "EXTEND_TIMEOUT_USEC=5000000"]
    assert not Notifier({}).send("READY=1")  # no NOTIFY_SOCKET: a no-op
    assert Notifier({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "1", "WATCHDOG_PID": "1"}).watchdog_interval is None
