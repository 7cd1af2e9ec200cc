"""A plain install of moverd, with only what its metadata declares, works on its embedded default.

The wheel is built from this tree and installed into a new virtual environment (dependencies from
the package index, as a user's ``pip install moverd`` gets them): no S3 or SciCat plugin, no test
tools. It must archive a folder and retrieve it, byte for byte.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.support.trees import read_tree, small_files_tree

ROOT = Path(__file__).resolve().parent.parent


def test_plain_install_archives_and_retrieves_on_the_embedded_default(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w",
                    str(wheels), str(ROOT)], check=True, capture_output=True, timeout=300)
    (wheel,) = wheels.glob("moverd-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q",
                          "--disable-pip-version-check", str(wheel)], capture_output=True, text=True, timeout=600)
    assert pip.returncode == 0, pip.stderr[-3000:]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MOVERD_", "PYTHON"))}
    env["MOVERD_STATE_DIR"] = str(tmp_path / "state")
    moverd = str(venv / "bin" / "moverd")
    installed = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "list", "--format=json"],
                               capture_output=True, text=True, check=True).stdout
    names = {d["name"] for d in json.loads(installed)}
    assert "moverd" in names and not {"moverd-storage-s3", "moverd-catalog-scicat", "pytest", "moto"} & names

    plugins = json.loads(subprocess.run([moverd, "plugins", "--json"], env=env, capture_output=True, text=True,
                                        check=True, cwd=tmp_path).stdout)
    assert plugins["broken"] == {} and "posix" in plugins["storages"] and "local" in plugins["catalogs"]
    files = small_files_tree(tmp_path / "data", 30)
    p = subprocess.run([moverd, "archive", str(tmp_path / "data"), "--json"], env=env, capture_output=True,
                       text=True, cwd=tmp_path, timeout=120)
    assert p.returncode == 0, p.stderr
    pid = json.loads(p.stdout)["dataset"]
    p = subprocess.run([moverd, "retrieve", pid, "--to", str(tmp_path / "out")], env=env, capture_output=True,
                       text=True, cwd=tmp_path, timeout=120)
    assert p.returncode == 0, p.stderr
    assert read_tree(tmp_path / "out") == files
