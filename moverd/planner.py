"""Splitting a dataset's files into datablocks.

Files go in sorted path order, so a plan is a pure function of the file list and the target
size: a re-run after a crash computes the same archive ids and finds what it already committed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .errors import UserError
from .keys import path_safe_id
from .models import FileEntry
from .tarframe import BLOCK, RECORD

# A pax header with a long name takes up to three blocks; budget generously.
_HEADER_ESTIMATE = 3 * BLOCK


@dataclass(frozen=True)
class DatablockPlan:
    index: int
    archive_id: str
    files: tuple[FileEntry, ...]

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def packed_size_estimate(self) -> int:
        """An upper bound of the tar's size, for free-space checks before writing."""
        data = sum(_HEADER_ESTIMATE + f.size + (-f.size % BLOCK) for f in self.files)
        return data + 2 * BLOCK + RECORD


def dataset_folder(pid: str) -> str:
    """The dataset's folder on the archive storage."""
    return path_safe_id(pid)


def archive_id(pid: str, index: int) -> str:
    safe = path_safe_id(pid)
    return f"{safe}/datablocks/{safe}_{index:05d}.tar"


def check_file_list(files: Sequence[FileEntry]) -> list[FileEntry]:
    """Sorted files; duplicates and a file that is also a folder of another are user errors."""
    ordered = sorted(files, key=lambda f: f.path)
    seen: set[str] = set()
    for f in ordered:
        if f.path in seen:
            raise UserError(f"file {f.path!r} is listed twice")
        seen.add(f.path)
    for f in ordered:
        parts = f.path.split("/")
        for i in range(1, len(parts)):
            if "/".join(parts[:i]) in seen:
                raise UserError(f"{'/'.join(parts[:i])!r} is both a file and the folder of {f.path!r}")
    return ordered


def plan_datablocks(pid: str, files: Sequence[FileEntry], target_size: int) -> list[DatablockPlan]:
    """Greedy split in path order: a block closes when the next file would pass ``target_size``.

    A file bigger than the target gets a block of its own; no block is ever empty; a dataset
    without files has no blocks.
    """
    if target_size <= 0:
        raise ValueError("target_size must be positive")
    plans: list[DatablockPlan] = []
    current: list[FileEntry] = []
    size = 0
    for f in check_file_list(files):
        if current and size + f.size > target_size:
            plans.append(DatablockPlan(len(plans), archive_id(pid, len(plans)), tuple(current)))
            current, size = [], 0
        current.append(f)
        size += f.size
    if current:
        plans.append(DatablockPlan(len(plans), archive_id(pid, len(plans)), tuple(current)))
    return plans
