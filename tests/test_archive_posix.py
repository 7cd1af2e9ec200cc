"""Archive → retrieve round trips from a local folder, on the embedded default."""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
import time
from pathlib import Path
from typing import Any

import pytest

from moverd import MissingFileError, MoverdError, UnsafePathError, UserError, VerificationError
from moverd.app import App
from moverd.datablocks import read_index
from moverd.services import archive_dataset, retrieve_dataset, verify_dataset
from moverd.services.folders import dataset_source, register_folder
from tests.support.apps import make_settings
from tests.support.trees import awkward_tree, read_tree, small_files_tree

pytestmark = pytest.mark.anyio


async def archive_folder(app: App, folder: Path) -> str:
    ds, src = await register_folder(app, folder)
    await archive_dataset(app, ds.pid, source=src)
    return ds.pid


def lts_tars(app: App) -> list[Path]:
    return sorted(Path(app.settings.storages["lts"]["root"]).rglob("*.tar"))


async def test_awkward_tree_round_trip_is_byte_identical(app: App, tmp_path: Path) -> None:
    files = awkward_tree(tmp_path / "src")
    pid = await archive_folder(app, tmp_path / "src")
    blocks = await app.catalog.list_datablocks(pid)
    assert len(blocks) >= 3  # 1 MiB target: the 3 MiB file has a block of its own
    big = [b for b in blocks if any(m.path == "big.bin" for m in b.members)]
    assert len(big) == 1 and len(big[0].members) == 1
    await retrieve_dataset(app, pid, app.local_folder(tmp_path / "out", "out", create=True))
    assert read_tree(tmp_path / "out") == files
    assert os.stat(tmp_path / "out/exec.sh").st_mode & 0o777 == 0o755
    assert os.stat(tmp_path / "out/big.bin").st_mtime == 1_600_000_000


@pytest.mark.skipif(shutil.which("tar") is None, reason="GNU tar not installed")
async def test_datablocks_are_read_by_gnu_tar_and_tarfile(app: App, tmp_path: Path) -> None:
    files = awkward_tree(tmp_path / "src")
    await archive_folder(app, tmp_path / "src")
    (tmp_path / "gnu").mkdir()
    for tar in lts_tars(app):
        subprocess.run(["tar", "xf", str(tar), "-C", str(tmp_path / "gnu")], check=True)
        with tarfile.open(tar) as tf:
            tf.extractall(tmp_path / "py", filter="data")
    assert read_tree(tmp_path / "gnu") == files
    assert read_tree(tmp_path / "py") == files


async def test_many_small_files(app: App, tmp_path: Path) -> None:
    files = small_files_tree(tmp_path / "src", 5000, size=1024)
    pid = await archive_folder(app, tmp_path / "src")
    blocks = await app.catalog.list_datablocks(pid)
    assert sum(len(b.members) for b in blocks) == 5000
    await retrieve_dataset(app, pid, app.local_folder(tmp_path / "out", "out", create=True))
    assert read_tree(tmp_path / "out") == files


def _rchar() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar")


async def test_partial_retrieval_reads_only_the_requested_ranges(app: App, tmp_path: Path) -> None:
    files = small_files_tree(tmp_path / "src", 40, size=200_000)  # 8 MB in ~8 datablocks
    pid = await archive_folder(app, tmp_path / "src")
    blocks = await app.catalog.list_datablocks(pid)
    assert len(blocks) >= 6
    wanted = ["d00/f00003.bin", "d00/f00017.bin", "d00/f00038.bin"]
    before = _rchar()
    result = await retrieve_dataset(app, pid, app.local_folder(tmp_path / "out", "out", create=True), files=wanted)
    read = _rchar() - before
    assert sorted(m.path for m in result.files) == wanted
    assert read_tree(tmp_path / "out") == {w: files[w] for w in wanted}
    payload = 3 * 200_000
    indexes = sum(os.path.getsize(str(t) + ".index.json") for t in lts_tars(app))
    # Only the three members' bytes, the member indexes and the catalog: not the 8 MB of tars.
    assert read < payload + indexes + 512 * 1024, read
    total = sum(t.stat().st_size for t in lts_tars(app))
    assert read < total / 4


async def test_unknown_file_in_partial_retrieval_is_a_user_error(app: App, tmp_path: Path) -> None:
    awkward_tree(tmp_path / "src")
    pid = await archive_folder(app, tmp_path / "src")
    with pytest.raises(UserError, match="not in the dataset: 'nope'"):
        await retrieve_dataset(app, pid, app.local_folder(tmp_path / "out", "out", create=True), files=["nope"])
    with pytest.raises(UnsafePathError):
        await retrieve_dataset(app, pid, app.local_folder(tmp_path / "out", "out", create=True), files=["../x"])


async def test_missing_and_resized_files_fail_before_anything_is_written(app: App, tmp_path: Path) -> None:
    awkward_tree(tmp_path / "src")
    ds, _ = await register_folder(app, tmp_path / "src")
    (tmp_path / "src/exec.sh").unlink()
    (tmp_path / "src/empty.txt").write_bytes(b"now with data")
    src, prefix, _ = dataset_source(app, ds)
    with pytest.raises(MissingFileError) as err:
        await archive_dataset(app, ds.pid, source=src, prefix=prefix)
    assert "'exec.sh' is missing" in str(err.value) and "'empty.txt' has 13 bytes" in str(err.value)
    assert lts_tars(app) == []
    assert await app.catalog.list_datablocks(ds.pid) == []


async def test_symlink_out_of_the_source_is_refused(app: App, tmp_path: Path) -> None:
    awkward_tree(tmp_path / "src")
    (tmp_path / "secret").write_text("do not archive")
    os.symlink(tmp_path / "secret", tmp_path / "src/link")
    with pytest.raises(UnsafePathError, match="link"):
        await register_folder(app, tmp_path / "src")


async def test_bit_flip_is_detected_and_names_the_member(app: App, tmp_path: Path) -> None:
    awkward_tree(tmp_path / "src")
    pid = await archive_folder(app, tmp_path / "src")
    lts = app.storage("lts")
    blocks = await app.catalog.list_datablocks(pid)
    block = next(b for b in blocks if any(m.path.startswith("many/") for m in b.members))
    index = await read_index(lts, block.archive_id)
    assert index is not None
    victim = next(m for m in index.members if m.size > 100)
    tar = Path(app.settings.storages["lts"]["root"]) / block.archive_id
    with open(tar, "r+b") as f:
        f.seek(victim.offset + victim.size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x01]))
    result = await verify_dataset(app, pid)
    assert list(result.failed) == [block.archive_id]
    assert victim.path in result.failed[block.archive_id]
    assert len(result.ok) == len(await app.catalog.list_datablocks(pid)) - 1
    with pytest.raises(VerificationError, match=victim.path):
        await retrieve_dataset(app, pid, app.local_folder(tmp_path / "out", "out", create=True), files=[victim.path])
    assert not (tmp_path / "out" / victim.path).exists()


async def test_rerun_reuses_committed_datablocks(tmp_path: Path) -> None:
    awkward_tree(tmp_path / "src")
    async with App(make_settings(tmp_path)) as app:
        ds, src = await register_folder(app, tmp_path / "src")
        first = await archive_dataset(app, ds.pid, source=src)
        # forget the registrations: the tars and their indexes stay on the LTS
        for b in await app.catalog.list_datablocks(ds.pid):
            assert b.catalog_id
            await app.catalog.delete_datablock(ds.pid, b.catalog_id)
        mtimes = [t.stat().st_mtime_ns for t in lts_tars(app)]
        again = await archive_dataset(app, ds.pid, source=src)
        assert (again.written, again.reused) == (0, first.written)
        assert [t.stat().st_mtime_ns for t in lts_tars(app)] == mtimes
        third = await archive_dataset(app, ds.pid, source=src)
        assert third.written == 0 and len(await app.catalog.list_datablocks(ds.pid)) == len(first.datablocks)


async def test_full_lts_fails_clearly_and_leaves_no_partial_datablock(tmp_path: Path) -> None:
    from moverd import NoSpaceError
    from tests.support.mounts import tmpfs

    awkward_tree(tmp_path / "src")  # a 3 MiB file among small ones, 1 MiB datablocks
    with tmpfs(tmp_path / "lts", "2m") as lts_root:
        settings = make_settings(tmp_path, storages={"lts": {
            "type": "posix", "root": str(lts_root), "free_space_timeout": 0.3, "free_space_poll": 0.1}})
        async with App(settings) as app:
            ds, src = await register_folder(app, tmp_path / "src")
            with pytest.raises(NoSpaceError, match="free"):
                await archive_dataset(app, ds.pid, source=src)
            leftovers = [p for p in lts_root.rglob("*") if ".moverd-tmp-" in p.name]
            assert leftovers == []
            lts = app.storage("lts")
            for tar in lts_root.rglob("*.tar"):  # whatever is there is whole and verifies
                index = await read_index(lts, str(tar.relative_to(lts_root)))
                assert index is not None
                from moverd.datablocks import verify_datablock

                await verify_datablock(lts, index, app.registry.hasher, app.pool)
            assert not any(m.path == "big.bin" for b in await app.catalog.list_datablocks(ds.pid) for m in b.members)


async def test_file_vanishing_during_the_archive_is_a_clear_user_error(tmp_path: Path) -> None:
    from moverd import hookimpl
    from moverd.plugins import load_plugins

    files = small_files_tree(tmp_path / "src", 12, size=300_000)  # several 1 MiB datablocks
    victim = sorted(files)[-1]

    class DeleteWhenFirstBlockCommits:
        @hookimpl
        def datablock_committed(self, transfer: object, datablock: object) -> None:
            (tmp_path / "src" / victim).unlink(missing_ok=True)

    pm, report = load_plugins()
    pm.register(DeleteWhenFirstBlockCommits())
    settings = make_settings(tmp_path, pipeline={"datablock_concurrency": 1, "prefetch_files": 1,
                                                 "buffer_budget": "1MiB"})
    async with App(settings, pm, report) as app:
        ds, src = await register_folder(app, tmp_path / "src")
        with pytest.raises(MissingFileError, match=f"{victim}.*vanished"):
            await archive_dataset(app, ds.pid, source=src)
        assert not [p for p in (tmp_path / "state/lts").rglob("*") if ".moverd-tmp-" in p.name]


class _CountingReads:
    """The folder's storage, counting the files read at once (each read is slowed down a little,
    so that every file the pipeline lets through overlaps with the others)."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.open = 0
        self.peak = 0
        self.events: list[tuple[str, str]] = []
        """("open" or "close", key) in the order they happened."""

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def open_reader(self, key: str, *args: Any, **kwargs: Any) -> Any:
        reader = await self._inner.open_reader(key, *args, **kwargs)
        counter = self
        counter.open += 1
        counter.peak = max(counter.peak, counter.open)
        counter.events.append(("open", key))

        class Slow:
            def __getattr__(self, name: str) -> Any:
                return getattr(reader, name)

            def readinto_blocking(self, buf: memoryview) -> int:
                time.sleep(0.01)
                return int(reader.readinto_blocking(buf))

            async def aclose(self) -> None:
                counter.open -= 1
                counter.events.append(("close", key))
                await reader.aclose()

        return Slow()


@pytest.mark.parametrize(("size", "pipeline", "peak"), [
    # 300 kB files against 1 MiB of read-ahead: a file counts at most a quarter of it
    (300_000, {"prefetch_files": 32, "prefetch_bytes": "1MiB"}, 4),
    # 100 kB files: the bytes would let 10 through, the file count stops at 6
    (100_000, {"prefetch_files": 6, "prefetch_bytes": "1MiB"}, 6),
    # 300 kB files, 2 MiB: 6 files (1.8 MB) fit, a seventh does not
    (300_000, {"prefetch_files": 32, "prefetch_bytes": "2MiB"}, 6),
])
async def test_read_ahead_is_bounded_by_files_and_by_bytes(
    tmp_path: Path, size: int, pipeline: dict[str, Any], peak: int
) -> None:
    files = small_files_tree(tmp_path / "src", 24, size=size)
    async with App(make_settings(tmp_path, pipeline={"target_size": "1GiB", **pipeline})) as app:
        ds, src = await register_folder(app, tmp_path / "src")
        counting = _CountingReads(src)
        await archive_dataset(app, ds.pid, source=counting)  # type: ignore[arg-type]
        assert counting.peak == peak and counting.open == 0
        await retrieve_dataset(app, ds.pid, app.local_folder(tmp_path / "out", "out", create=True))
    assert read_tree(tmp_path / "out") == files


async def test_datablocks_of_a_dataset_read_in_plan_order_in_one_window(tmp_path: Path) -> None:
    """Two in flight (the default), and the datablocks read in plan order through one read-ahead
    window: each datablock opens its first file only after the one before opened its last, and
    the files read at once, across datablocks too, never pass ``prefetch_files``."""
    files = small_files_tree(tmp_path / "src", 24, size=300_000)
    async with App(make_settings(tmp_path, pipeline={"target_size": "2MiB", "prefetch_files": 4})) as app:
        ds, src = await register_folder(app, tmp_path / "src")
        counting = _CountingReads(src)
        result = await archive_dataset(app, ds.pid, source=counting)  # type: ignore[arg-type]
        assert len(result.datablocks) >= 3 and app.settings.pipeline.datablock_concurrency == 2
        assert counting.peak == 4 and counting.open == 0
        block_of = {m.path: b.index for b in result.datablocks for m in b.members}
        of_key = {key: b for path, b in block_of.items() for _, key in counting.events if key.endswith(path)}
        opened = [of_key[key] for what, key in counting.events if what == "open"]
        assert opened == sorted(opened), opened
        await retrieve_dataset(app, ds.pid, app.local_folder(tmp_path / "out", "out", create=True))
    assert read_tree(tmp_path / "out") == files


class _HeldReads:
    """The folder's storage, where opening ``held`` waits until ``awaited`` has been opened."""

    def __init__(self, inner: Any, held: str, awaited: str) -> None:
        import anyio

        self._inner = inner
        self.held, self.awaited = held, awaited
        self.opened = anyio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def open_reader(self, key: str, *args: Any, **kwargs: Any) -> Any:
        if key.endswith(self.awaited):
            self.opened.set()
        if key.endswith(self.held):
            await self.opened.wait()
        return await self._inner.open_reader(key, *args, **kwargs)


async def test_the_next_datablock_reads_while_the_last_files_of_the_one_before_are_read(tmp_path: Path) -> None:
    """No pause in the source's reads between two datablocks: once the last file of a datablock
    has its room in the window, the next datablock starts reading. Here the first datablock's
    last file cannot be read before the second's first file is opened; reading them in turn
    (the next datablock only once the one before is written) never ends."""
    import anyio

    from moverd.planner import plan_datablocks

    files = small_files_tree(tmp_path / "src", 24, size=300_000)
    async with App(make_settings(tmp_path, pipeline={"target_size": "2MiB", "prefetch_files": 4})) as app:
        ds, src = await register_folder(app, tmp_path / "src")
        plans = plan_datablocks(ds.pid, await app.catalog.list_files(ds.pid), app.settings.pipeline.target_size)
        assert len(plans) >= 3
        held = _HeldReads(src, plans[0].files[-1].path, plans[1].files[0].path)
        with anyio.fail_after(30):
            result = await archive_dataset(app, ds.pid, source=held)  # type: ignore[arg-type]
        assert held.opened.is_set() and len(result.datablocks) == len(plans)
        await retrieve_dataset(app, ds.pid, app.local_folder(tmp_path / "out", "out", create=True))
    assert read_tree(tmp_path / "out") == files


@pytest.mark.parametrize("pipeline", [
    # a pool of 16 slabs: the drain must hash what it holds before it waits, or readers starve
    {"chunk_size": "64KiB", "buffer_budget": "1MiB", "prefetch_bytes": "256KiB"},
    {},
])
async def test_member_checksums_are_each_files_md5_however_the_hashing_is_batched(
    tmp_path: Path, pipeline: dict[str, Any]
) -> None:
    import hashlib
    import random

    rng = random.Random(7)
    src = tmp_path / "src"
    src.mkdir()
    sizes = [0, 1, 63, 64, 65, 65_535, 65_536, 262_144, 300_001, 1_048_577, 2_500_000]
    sizes += [rng.choice([rng.randint(0, 4096), rng.randint(200_000, 2_200_000)]) for _ in range(40)]
    expected = {}
    for i, n in enumerate(sizes):
        data = rng.randbytes(n)
        (src / f"f{i:03d}.bin").write_bytes(data)
        expected[f"f{i:03d}.bin"] = hashlib.md5(data).hexdigest()
    async with App(make_settings(tmp_path, pipeline={"target_size": "8MiB", **pipeline})) as app:
        ds, source = await register_folder(app, src)
        result = await archive_dataset(app, ds.pid, source=source)
    got = {m.path: m.checksum for block in result.datablocks for m in block.members}
    assert got == expected


@pytest.mark.slow
async def test_round_trip_of_a_file_over_8_gib(tmp_path: Path) -> None:
    size = 8 * 2**30 + 12345
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "huge.bin", "wb") as f:  # sparse: costs no disk on the source side
        f.seek(size - 5)
        f.write(b"tail!")
    async with App(make_settings(tmp_path, pipeline={"chunk_size": "8MiB", "buffer_budget": "64MiB"})) as app:
        ds, source = await register_folder(app, src)
        result = await archive_dataset(app, ds.pid, source=source)
        assert result.datablocks[0].members[0].size == size
        tar = lts_tars(app)[0]
        listing = subprocess.run(["tar", "tvf", str(tar)], capture_output=True, text=True, check=True).stdout
        assert str(size) in listing
        await retrieve_dataset(app, ds.pid, app.local_folder(tmp_path / "out", "out", create=True))
        out = tmp_path / "out/huge.bin"
        assert out.stat().st_size == size
        with open(out, "rb") as f:
            f.seek(size - 5)
            assert f.read() == b"tail!"


async def test_two_schedulers_waiting_on_one_read_ahead_window_both_get_room() -> None:
    """A committed datablock that does not verify is written again out of turn, so two
    schedulers may wait on the dataset's one window at once: each release wakes them both."""
    import anyio

    from moverd.pipeline import ReadAhead

    window = ReadAhead(1, 1024)
    held = await window.acquire(10)
    got: list[str] = []

    async def scheduler(name: str) -> None:
        room = await window.acquire(10)
        got.append(name)
        await anyio.sleep(0.01)
        room.release()

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(scheduler, "a")
            tg.start_soon(scheduler, "b")
            await anyio.sleep(0.05)  # both wait now
            held.release()
    assert sorted(got) == ["a", "b"] and (window.files, window.bytes) == (1, 1024)


async def test_datablocks_take_their_streaming_turns_in_plan_order_whoever_asks_first() -> None:
    """A datablock's task may reach its turn before an earlier one does (each reads its index on
    the LTS first); a datablock that does not stream passes its turn."""
    import anyio

    from moverd.pipeline import ReadAhead
    from moverd.services.archive import _Turns

    turns, order = _Turns([0, 1, 2, 3], ReadAhead(4, 1024)), []

    async def stream(index: int, delay: float) -> None:
        await anyio.sleep(delay)
        async with turns.turn(index) as streamed:
            order.append(index)
            await anyio.sleep(0.01)
            streamed()

    async with anyio.create_task_group() as tg:
        tg.start_soon(stream, 3, 0.0)
        tg.start_soon(stream, 1, 0.0)
        tg.start_soon(stream, 0, 0.05)
        await anyio.sleep(0.02)
        turns.done(2)  # reused: never streams
    assert order == [0, 1, 3]


class _SlowStats:
    """A storage whose ``stat`` takes a while, counting how many run at once."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.running = self.peak = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def stat(self, key: str) -> Any:
        import anyio

        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            await anyio.sleep(0.02)
            return await self._inner.stat(key)
        finally:
            self.running -= 1


async def test_member_indexes_are_read_a_few_at_a_time_in_order(tmp_path: Path) -> None:
    """A retrieval, a verify and an archive's resume read every datablock's index first: a few
    at a time (two round trips each on S3), given back in the datablocks' order, a missing one
    as None."""
    from moverd.datablocks import INDEXES_AT_ONCE, read_indexes

    small_files_tree(tmp_path / "src", 40, size=100_000)
    async with App(make_settings(tmp_path, pipeline={"target_size": "200KiB"})) as app:
        ds, src = await register_folder(app, tmp_path / "src")
        result = await archive_dataset(app, ds.pid, source=src)
        ids = [b.archive_id for b in result.datablocks]
        assert len(ids) > INDEXES_AT_ONCE
        slow = _SlowStats(app.storage("lts"))
        got = await read_indexes(slow, [*ids, f"{ds.pid}/datablocks/none.tar"])  # type: ignore[arg-type]
        assert 1 < slow.peak <= INDEXES_AT_ONCE
        assert [b.archive_id if b else None for b in got] == [*ids, None]
        assert [b.members for b in got[:-1] if b] == [b.members for b in result.datablocks]
        # An index that cannot be read is the storage's error, not an exception group.
        from moverd.models import index_key

        damaged = tmp_path / "state" / "lts" / index_key(ids[3])
        damaged.unlink()
        damaged.mkdir()
        with pytest.raises(MoverdError) as raised:
            await read_indexes(app.storage("lts"), ids)
        assert not isinstance(raised.value, BaseExceptionGroup) and index_key(ids[3]) in str(raised.value)
