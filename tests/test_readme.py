"""The README's quickstart works when pasted: its block runs, as it stands, in a fresh clone."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def quickstart() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Quickstart"):]
    match = re.search(r"```sh\n(.*?)```", section, re.S)
    assert match, "README.md: the Quickstart section has no sh block"
    return match.group(1)


def test_the_quickstart_runs_verbatim_in_a_fresh_clone(tmp_path: Path) -> None:
    clone = tmp_path / "moverd"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True, timeout=120)
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MOVERD_", "VIRTUAL_ENV", "PYTHON", "XDG_")) and k != "PREFECT_API_URL"}
    # A new user's home (state under ~/.local/state), with the machine's pip cache so that the
    # install does not fetch every package again.
    env.update(HOME=str(home), PIP_CACHE_DIR=os.environ.get("PIP_CACHE_DIR", str(Path.home() / ".cache" / "pip")))
    p = subprocess.run(["bash", "-eo", "pipefail", "-c", quickstart()], cwd=clone, env=env, capture_output=True,
                       text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "same bytes" in p.stdout
    assert "verified" in p.stdout and "ok " in p.stdout
    assert list((home / ".local" / "state" / "moverd" / "lts").rglob("*.tar"))
