"""Real small file systems for disk-full and read-only faults (tmpfs mounts; the tests run as
root). Skipped with the reason where mounting is not permitted."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


def _run(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, check=False)


@contextlib.contextmanager
def tmpfs(mnt: Path, size: str = "1m", fstype: str = "tmpfs") -> Iterator[Path]:
    """Mount a tmpfs of ``size`` (or another memory file system) on ``mnt`` (created), unmount
    it afterwards."""
    mnt.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        pytest.skip(f"no mount command: cannot make a {fstype} for file system faults")
    res = _run(["mount", "-t", fstype, "-o", f"size={size},mode=0755", fstype, str(mnt)])
    if res.returncode != 0:
        pytest.skip(f"mounting a {fstype} is not permitted here: {res.stderr.strip()}")
    try:
        yield mnt
    finally:
        if _run(["umount", str(mnt)]).returncode != 0:
            _run(["umount", "-l", str(mnt)])


def remount_read_only(mnt: Path) -> None:
    res = _run(["mount", "-o", "remount,ro", str(mnt)])
    assert res.returncode == 0, res.stderr


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A real 1 MiB tmpfs, unmounted afterwards."""
    with tmpfs(tmp_path / "small", "1m") as mnt:
        yield mnt


@pytest.fixture
def no_direct_io_fs(tmp_path: Path) -> Iterator[Path]:
    """A real ramfs: a file system that refuses ``O_DIRECT`` (``EINVAL`` on open and on
    ``F_SETFL``), as some network and FUSE file systems do."""
    with tmpfs(tmp_path / "ramfs", "64m", fstype="ramfs") as mnt:
        yield mnt
