"""Run one tool as a subprocess and measure it: wall time, peak RSS, CPU.

Peak RSS is the kernel's high-water mark of the process's own address space (``VmHWM`` in
``/proc/PID/status``, which starts afresh at ``exec``), polled every 20 ms; ``ru_maxrss`` from
``wait4`` would not do, as it counts the forking parent's pages (the bench's own ~120 MiB).
CPU times come from ``wait4``. The S3 server's CPU over the same interval is reported too: it
shows how close a run came to the server's one-core ceiling. Children of the child are not
included (none of the measured tools forks workers; s5cmd uses goroutines).
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from tests.support.cli import vm_hwm


@dataclass
class Measured:
    seconds: float
    rc: int
    max_rss: int
    """Peak resident set size in bytes."""
    cpu_user: float
    cpu_sys: float
    stdout: str
    stderr: str
    server_cpu: float | None = None
    """CPU seconds the S3 server spent during the run."""

    @property
    def cpu(self) -> float:
        return self.cpu_user + self.cpu_sys


class ToolFailedError(RuntimeError):
    pass


SERVER_PID: int | None = None
"""Set by the bench once its S3 server runs."""


def _cpu_of(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def run_measured(cmd: list[str], *, env: dict[str, str] | None = None, cwd: Path | None = None,
                 logdir: Path, name: str, check: bool = True, poll: float = 0.02) -> Measured:
    logdir.mkdir(parents=True, exist_ok=True)
    out_path, err_path = logdir / f"{name}.out", logdir / f"{name}.err"
    server0 = _cpu_of(SERVER_PID)
    peak = 0
    with out_path.open("wb") as out, err_path.open("wb") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            peak = max(peak, vm_hwm(proc.pid))
            time.sleep(poll)
        seconds = time.perf_counter() - t0
    server1 = _cpu_of(SERVER_PID)
    proc.returncode = os.waitstatus_to_exitcode(status)
    result = Measured(
        seconds=seconds, rc=proc.returncode, max_rss=peak,
        cpu_user=usage.ru_utime, cpu_sys=usage.ru_stime,
        stdout=out_path.read_text(errors="replace"), stderr=err_path.read_text(errors="replace"),
        server_cpu=None if server0 is None or server1 is None else server1 - server0,
    )
    if check and result.rc != 0:
        raise ToolFailedError(f"{name}: {' '.join(cmd)} exited {result.rc}:\n{result.stderr[-3000:]}")
    return result


def drop_caches(paths: list[Path]) -> str:
    """Empty the page cache (root: the whole cache; else ``POSIX_FADV_DONTNEED`` on ``paths``)."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
        return "drop_caches"
    except OSError:
        pass
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return "fadvise"
