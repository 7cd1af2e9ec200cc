"""HSM recalls on the POSIX LTS: with a ``recall_command``, a retrieval asks the HSM for every
offline datablock first (bounded by ``recall_timeout``), then waits for it like a restore.

An offline file is a sparse stub (full size, no block on disk), as an HSM leaves a migrated file;
the "tape" is a folder the real tar was moved to, and the working recall command copies it back.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from moverd.services.jobs import run_job
from tests.support.facility import Facility, dataset_files
from tests.test_tape_retrieve import Restores

pytestmark = pytest.mark.anyio


def migrate(lts: Path, tape: Path) -> list[str]:
    """Move every datablock to ``tape`` and leave an offline stub in its place; their names."""
    tape.mkdir(exist_ok=True)
    names = []
    for tar in sorted(lts.rglob("*.tar")):
        size = tar.stat().st_size
        shutil.move(tar, tape / tar.name)
        with open(tar, "wb") as f:
            os.truncate(f.fileno(), size)
        if tar.stat().st_blocks:
            pytest.skip("this file system allocates blocks for sparse files: cannot fake an offline file")
        names.append(tar.name)
    return names


async def archived_then_migrated(facility: Facility, seed: int) -> tuple[str, dict[str, bytes], list[str]]:
    files = dataset_files(seed, n=4)
    pid = facility.add_dataset(files)
    async with facility.app() as app:
        res = await run_job(app, facility.scicat.add_job("archive", [pid]))
    assert res.status.value == "finishedSuccessful", res.datasets
    return pid, files, migrate(facility.tmp / "lts", facility.tmp / "tape")


def with_recall(facility: Facility, command: list[str], **extra: Any) -> None:
    facility.overrides["storages"] = {
        **facility.settings_dict()["storages"],
        "lts": {"type": "posix", "root": str(facility.tmp / "lts"), "create": True, "recall_command": command,
                "offline_timeout": 10, "offline_poll": 0.05, "offline_poll_max": 0.2, **extra},
    }


async def test_recall_command_recalls_offline_datablocks(facility: Facility) -> None:
    pid, files, migrated = await archived_then_migrated(facility, 51)
    tape = facility.tmp / "tape"
    with_recall(facility, ["sh", "-c", 'cp "$1/$(basename "$0")" "$0"', "{path}", str(tape)])
    seen = Restores()
    facility.plugins.append(seen)
    job_id = facility.scicat.add_job("retrieve", [(pid, ["big/movie.mrc", "raw/frame_000.tiff"])])
    async with facility.app() as app:
        res = await run_job(app, job_id)
    assert res.status.value == "finishedSuccessful", res.datasets
    assert {"requested", "available"} <= seen.states()
    requested = {k.rsplit("/", 1)[-1] for k, s in seen.events if s == "requested"}
    assert requested and requested <= set(migrated)  # only the datablocks holding those files
    for e in facility.scicat.job(job_id)["jobResultObject"]["result"]:
        assert httpx.get(e["url"]).raise_for_status().content == files[e["name"]]


async def test_failing_recall_command_is_a_system_error(facility: Facility) -> None:
    pid, _, _ = await archived_then_migrated(facility, 52)
    with_recall(facility, ["sh", "-c", "echo tape library offline >&2; exit 3"])
    seen = Restores()
    facility.plugins.append(seen)
    async with facility.app() as app:
        res = await run_job(app, facility.scicat.add_job("retrieve", [pid]))
    assert res.status.value == "finishedUnsuccessful"
    outcome = res.datasets[0]
    assert outcome.outcome == "system_error"
    assert "the recall command 'sh' for" in outcome.message
    assert "failed (exit 3): tape library offline" in outcome.message
    assert "failed" in seen.states()
    assert facility.scicat.lifecycle(pid)["retrieveStatusMessage"] == "datasetRetrievalFailed"
    assert facility.retrieval_keys() == []


async def test_hanging_recall_command_is_killed_at_its_bound(facility: Facility) -> None:
    pid, _, _ = await archived_then_migrated(facility, 53)
    with_recall(facility, ["sleep", "60"], recall_timeout=0.5)
    start = time.monotonic()
    async with facility.app() as app:
        res = await run_job(app, facility.scicat.add_job("retrieve", [pid]))
    assert time.monotonic() - start < 15
    assert res.status.value == "finishedUnsuccessful"
    message = res.datasets[0].message
    assert "the recall command 'sleep'" in message and "did not finish within 0.5 s (recall_timeout)" in message
