"""Free-space back-pressure of the ``posix`` storage on a real small file system (a 1 MiB tmpfs):
a wait says at once what it waits for (log and metric) and again while it lasts, ends when space
appears, and a datablock that could never fit fails at once."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
from moverd_storage_lts import PosixOptions, PosixStorage

from moverd import NoSpaceError
from moverd_daemon.metrics import Metrics

pytestmark = pytest.mark.anyio

KIB = 1024


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


def lts(root: Path, **over: Any) -> PosixStorage:
    opts = {"root": str(root), "free_space_poll": 0.05, "free_space_report": 0.3, "free_space_timeout": 10, **over}
    return PosixStorage("lts", PosixOptions.model_validate(opts))


async def test_datablock_bigger_than_the_file_system_fails_at_once(small_fs: Path) -> None:
    storage = lts(small_fs, free_space_timeout=3600)
    start = time.monotonic()
    with pytest.raises(NoSpaceError, match=r"^posix storage 'lts': a datablock of 2\.0 MiB cannot be written to "
                       rf"{small_fs}: the file system holds 1\.0 MiB in all"):
        await storage.wait_for_space(2 * 1024 * KIB)
    assert time.monotonic() - start < 1
    # min_free counts: 600 KiB + 600 KiB to keep free cannot fit in 1 MiB either
    with pytest.raises(NoSpaceError, match="min_free 600.0 KiB must stay free"):
        await lts(small_fs, min_free=600 * KIB).wait_for_space(600 * KIB)


async def test_wait_is_logged_and_observed_at_once_and_ends_when_space_appears(
    small_fs: Path, caplog: pytest.LogCaptureFixture
) -> None:
    filler = small_fs / "filler"
    filler.write_bytes(b"x" * (700 * KIB))
    metrics = Metrics()
    seen: list[dict[str, Any]] = []

    def observe(**kw: Any) -> None:
        seen.append(kw)
        metrics.storage_space_wait(**kw)

    storage = lts(small_fs)
    storage.observe = observe
    caplog.set_level(logging.INFO, logger="moverd_storage_lts")
    async with anyio.create_task_group() as tg:
        done = anyio.Event()

        async def write() -> None:
            await storage.wait_for_space(500 * KIB)
            done.set()

        tg.start_soon(write)
        # at once (its first look, before any repeat): one line saying what it waits for, and the
        # metric. The look runs in a worker thread, which a loaded host may start late: wait for it.
        with anyio.fail_after(5):
            while not seen:
                await anyio.sleep(0.01)
        first = [r.getMessage() for r in caplog.records if "waiting for free space" in r.getMessage()]
        assert first == [
            f"posix storage 'lts': waiting for free space in {small_fs}: 500.0 KiB needed, "
            f"{first[0].split(' needed, ')[1].split(' free')[0]} free, min_free 0 B; for up to 10 s"
        ]
        assert seen and seen[0]["waiting"] is True and seen[0]["needed"] == 500 * KIB and seen[0]["storage"] == "lts"
        text = metrics.render()[0].decode()
        assert 'moverd_storage_space_waiters{storage="lts"} 1.0' in text
        shortfall = 500 * KIB - seen[0]["free"]
        assert f'moverd_storage_space_shortfall_bytes{{storage="lts"}} {float(shortfall)}' in text
        with anyio.fail_after(5):  # and again while it lasts (every 0.3 s here)
            while sum("still waiting for free space" in r.getMessage() for r in caplog.records) < 2:
                await anyio.sleep(0.05)
        assert not done.is_set()
        filler.unlink()
        with anyio.fail_after(2):
            await done.wait()
    assert seen[-1]["waiting"] is False
    text = metrics.render()[0].decode()
    assert 'moverd_storage_space_waiters{storage="lts"} 0.0' in text
    assert 'moverd_storage_space_shortfall_bytes{storage="lts"} 0.0' in text


async def test_wait_that_times_out_says_what_it_waited_for(small_fs: Path) -> None:
    """``min_free`` more than is free but less than the whole: a wait, then the timeout's error."""
    storage = lts(small_fs, min_free=900 * KIB, free_space_timeout=0.4)
    (small_fs / "filler").write_bytes(b"x" * (200 * KIB))
    start = time.monotonic()
    said = (rf"^posix storage 'lts': not enough free space in {small_fs}: 50\.0 KiB needed, .* free, "
            r"min_free 900\.0 KiB; waited 0\.\d s \(free_space_timeout 0\.4 s\)$")
    with pytest.raises(NoSpaceError, match=said):
        await storage.wait_for_space(50 * KIB)
    assert 0.35 < time.monotonic() - start < 2
