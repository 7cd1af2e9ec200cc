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


def moverd_on_terminal(args: list[str], env: dict[str, str], *, timeout: float = 180,
                       ) -> tuple[subprocess.CompletedProcess[str], bytes]:
    """Run ``moverd ARGS`` with stderr on a pseudo-terminal (200 columns), as a user at a shell
    sees it; stdout is piped. Returns the process and what the terminal showed."""
    import pty

    primary, secondary = pty.openpty()
    try:
        p = subprocess.run(MOVERD + args, env={**env, "COLUMNS": "200"}, stdout=subprocess.PIPE, stderr=secondary,
                           text=True, timeout=timeout)
        os.close(secondary)
        secondary = -1
        shown = b""
        while True:
            try:
                chunk = os.read(primary, 65536)
            except OSError:  # EIO: the terminal's other end is closed and drained
                break
            if not chunk:
                break
            shown += chunk
    finally:
        os.close(primary)
        if secondary >= 0:
            os.close(secondary)
    return p, shown


def run(args: list[str], env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess[str]:
    """``moverd ARGS`` that must succeed unless ``check`` is False."""
    return moverd(args, env, check=check)


def moverd_peak_rss(args: list[str], env: dict[str, str], *, timeout: float = 180,
                    poll: float = 0.01) -> tuple[subprocess.CompletedProcess[str], int]:
    """Run ``moverd ARGS``; also its peak resident set in bytes: the kernel's high-water mark of
    the child's own address space (``VmHWM``, which starts afresh at ``exec``), polled until it
    exits. It only grows, so the last reading is the peak up to then. Not ``ru_maxrss`` of the
    children: it keeps the largest child this process ever reaped, and counts the parent's
    pages for a child made by ``vfork``."""
    import tempfile
    import time

    peak = 0
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(MOVERD + args, env=env, stdout=out, stderr=err, stdin=subprocess.DEVNULL, text=True)
        deadline = time.monotonic() + timeout
        while proc.poll() is None:
            peak = max(peak, vm_hwm(proc.pid))
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                raise AssertionError(f"moverd {args} did not end within {timeout} s")
            time.sleep(poll)
        out.seek(0)
        err.seek(0)
        done = subprocess.CompletedProcess(MOVERD + args, proc.returncode, out.read(), err.read())
    return done, peak


def vm_hwm(pid: int) -> int:
    """The peak resident set of process ``pid`` so far, in bytes (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass  # gone, or a zombie between two polls
    return 0
