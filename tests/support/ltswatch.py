"""A plugin for the scale-out test: a POSIX storage that logs when each writer opens and ends.

Loaded by ``moverd serve`` through ``plugins = ["tests.support.ltswatch"]`` (no patching of
moverd), it registers the storage type ``watched-posix``: the ``posix`` storage plus one line per
writer event appended to ``watch_log`` (``<monotonic time> <pid> open|commit|end <key>``: a
committed writer logs ``commit`` before its ``end``). The core opens
LTS writers only inside its write slot, so the number of writers open at once, across every
daemon on the host (``CLOCK_MONOTONIC`` is system-wide), is a lower bound of the slots held and
must never exceed the global limit.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import anyio
from moverd_storage_lts.options import PosixOptions
from moverd_storage_lts.storage import PosixStorage

from moverd import StorageType, Writer, hookimpl


class WatchedOptions(PosixOptions):  # type: ignore[misc]
    watch_log: Path
    commit_delay: float = 0.0
    """Seconds each commit waits first (a slow disk flush), so that writers of different jobs
    are open at the same time however small their datablocks."""


def _log(path: Path, event: str, key: str) -> None:
    line = f"{time.monotonic():.6f} {os.getpid()} {event} {key}\n".encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)  # one O_APPEND write: lines of several processes never interleave
    finally:
        os.close(fd)


class WatchedWriter(Writer):
    def __init__(self, inner: Writer, log: Path, key: str, commit_delay: float) -> None:
        self.inner, self.log, self.key, self.commit_delay = inner, log, key, commit_delay
        self.ended = False

    async def write(self, data: memoryview | bytes) -> None:
        await self.inner.write(data)

    def _end(self) -> None:
        if not self.ended:
            self.ended = True
            _log(self.log, "end", self.key)

    async def commit(self) -> None:
        try:
            if self.commit_delay:
                await anyio.sleep(self.commit_delay)
            await self.inner.commit()
            _log(self.log, "commit", self.key)
        finally:
            self._end()

    async def abort(self) -> None:
        try:
            await self.inner.abort()
        finally:
            self._end()


class WatchedStorage(PosixStorage):  # type: ignore[misc]
    def __init__(self, name: str, options: WatchedOptions) -> None:
        super().__init__(name, options)
        self.watch_log = options.watch_log
        self.commit_delay = options.commit_delay

    async def open_writer(self, key: str, size_hint: int | None = None) -> Any:
        _log(self.watch_log, "open", key)
        try:
            inner = await super().open_writer(key, size_hint)
        except BaseException:
            _log(self.watch_log, "end", key)
            raise
        return WatchedWriter(inner, self.watch_log, key, self.commit_delay)


@hookimpl
def register_storages(register: Any) -> None:
    register(StorageType(name="watched-posix", options=WatchedOptions,
                         create=lambda name, options, ctx: WatchedStorage(name, options),
                         description="posix storage that logs writer open/end times (tests)"))


def max_concurrent(log: Path) -> tuple[int, set[int]]:
    """The most writers open at once in ``log``, and the processes that wrote."""
    events = []
    pids = set()
    for line in log.read_text().splitlines():
        t, pid, event, _key = line.split(" ", 3)
        pids.add(int(pid))
        if event == "commit":
            continue
        # at equal times, count an end before an open: touching intervals do not overlap
        events.append((float(t), 1 if event == "open" else 0, 1 if event == "open" else -1))
    peak = current = 0
    for _, _, delta in sorted(events):
        current += delta
        peak = max(peak, current)
    return peak, pids


def commits(log: Path) -> dict[str, list[int]]:
    """Each key committed in ``log``, with the processes that committed it (once each, if all is well)."""
    out: dict[str, list[int]] = {}
    for line in log.read_text().splitlines():
        _t, pid, event, key = line.split(" ", 3)
        if event == "commit":
            out.setdefault(key, []).append(int(pid))
    return out
