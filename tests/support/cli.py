"""The ``moverd`` command as a user runs it: a subprocess on a state directory of its own."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

MOVERD = [sys.executable, "-m", "moverd"]


def cli_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """This process's environment without any ``MOVERD_*``, state under ``tmp_path/state``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOVERD_")}
    env["MOVERD_STATE_DIR"] = str(tmp_path / "state")
    env.update(extra)
    return env


def moverd(
    args: list[str], env: dict[str, str], *, check: bool = False, timeout: float = 180, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``moverd ARGS``; with ``check``, a non-zero exit fails with the command's stderr."""
    p = subprocess.run(MOVERD + args, env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    if check and p.returncode != 0:
        raise AssertionError(f"moverd {args} failed ({p.returncode}): {p.stderr}")
    return p


def run(args: list[str], env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess[str]:
    """``moverd ARGS`` that must succeed unless ``check`` is False."""
    return moverd(args, env, check=check)
