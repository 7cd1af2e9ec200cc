"""The layer rules hold (the contracts in pyproject.toml), and a violation of each breaks them.

The violations are made in a copy of the packages, so that the real tree is never touched: an
engine function that imports the daemon (an import inside a function counts), a plugin that
reaches past moverd's public names, and the Prefect layer importing the command line.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import tomli_w

ROOT = Path(__file__).resolve().parent.parent
LINT = Path(sys.executable).parent / "lint-imports"
PACKAGES = {
    "moverd": ROOT / "moverd",
    "moverd_cli": ROOT / "moverd_cli",
    "moverd_daemon": ROOT / "moverd_daemon",
    "moverd_flows": ROOT / "flows" / "moverd_flows",
    "moverd_storage_s3": ROOT / "plugins" / "storage_s3" / "moverd_storage_s3",
    "moverd_storage_lts": ROOT / "plugins" / "storage_lts" / "moverd_storage_lts",
    "moverd_catalog_scicat": ROOT / "plugins" / "catalog_scicat" / "moverd_catalog_scicat",
}


def lint(cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(LINT), "--no-cache"], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_the_tree_keeps_every_contract() -> None:
    p = lint(ROOT)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "0 broken" in p.stdout


@pytest.mark.parametrize("module,line,contract", [
    ("moverd/services/verify.py", "def _late() -> None:\n    import moverd_daemon.metrics  # noqa\n",
     "The engine imports no CLI"),
    ("moverd_storage_s3/storage.py", "from moverd.pipeline import TarSink  # noqa\n",
     "Plugins import only moverd's public names"),
    ("moverd_storage_lts/storage.py", "import moverd_catalog_scicat  # noqa\n", "A plugin never imports another"),
    ("moverd_flows/jobs.py", "from moverd_cli.main import app as _app  # noqa\n", "The Prefect layer imports only"),
])
def test_a_violation_breaks_its_contract(tmp_path: Path, module: str, line: str, contract: str) -> None:
    for name, src in PACKAGES.items():
        shutil.copytree(src, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    (tmp_path / "pyproject.toml").write_text(tomli_w.dumps({"tool": {"importlinter": config}}))
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    assert lint(tmp_path, env).returncode == 0  # the copy keeps them too
    target = tmp_path / module
    target.write_text(target.read_text() + "\n" + line)
    p = lint(tmp_path, env)
    assert p.returncode != 0, p.stdout
    broken = p.stdout[p.stdout.index("Broken contracts"):]
    assert contract in broken, p.stdout


def test_the_engine_names_no_type_of_a_plugin() -> None:
    """The engine (``moverd``) never spells a plugin's storage or catalog type name: what it needs
    from one is a capability the type declares (``StorageType.url_scheme``, ``Catalog.local_folders``)."""
    import ast

    from moverd.plugins import load_plugins
    from moverd.registry import Registry

    registry = Registry.from_plugins(load_plugins()[0])
    # the built-in catalog, and the POSIX storage that ships in moverd's own distribution
    # (moverd.LOCAL_STORAGE_TYPE), are the engine's own
    foreign = {t.name for t in [*registry.storages.values(), *registry.catalogs.values()]
               if not t.plugin.startswith("moverd.") and t.plugin != "storage_lts"}
    assert {"s3", "scicat"} <= foreign, foreign
    found = []
    for path in sorted((ROOT / "moverd").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Constant) and node.value in foreign:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value!r}")
    assert found == []
