"""The ``posix`` storage plugin against real directories, real mounts and real sparse files.

Faults are made for real: a 1 MiB tmpfs fills up (ENOSPC), a remount makes it read-only (EROFS), a
sparse file stands in for an HSM stub. We run as root, so permissions would not stop us; mounts do.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import anyio
import pytest
from moverd_storage_lts import PosixOptions, PosixStorage
from moverd_storage_lts.paths import TEMP_MARK, is_temp_name
from pydantic import ValidationError

from moverd import (
    ConfigError,
    Context,
    NoSpaceError,
    NotAFileError,
    NotFoundError,
    ObjectInfo,
    OfflineTimeoutError,
    StorageError,
    UnsafePathError,
    read_slot,
    write_slot,
)
from moverd.plugins import load_plugins
from moverd.registry import Registry
from tests.support.mounts import remount_read_only

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def make(root: Path, name: str = "lts", **opts: object) -> PosixStorage:
    return PosixStorage(name, PosixOptions.model_validate({"root": str(root), **opts}))


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "root"
    r.mkdir()
    return r


@pytest.fixture
def store(root: Path) -> PosixStorage:
    return make(root)


def files_in(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*"))


async def read_all(
    storage: PosixStorage,
    key: str,
    *,
    bufsize: int = 64 * 1024,
    offset: int = 0,
    length: int | None = None,
    uncached: bool = False,
) -> bytes:
    reader = await storage.open_reader(key, offset, length, uncached=uncached)
    buf = bytearray(bufsize)
    out = bytearray()
    try:
        while n := await reader.readinto(memoryview(buf)):
            out += buf[:n]
    finally:
        await reader.aclose()
    return bytes(out)


async def put(storage: PosixStorage, key: str, data: bytes) -> None:
    w = await storage.open_writer(key, len(data))
    await w.write(data)
    await w.commit()


async def collect(storage: PosixStorage, prefix: str = "") -> dict[str, ObjectInfo]:
    return {info.key: info async for info in storage.list(prefix)}


# -- registration and options ------------------------------------------------------------------


def test_registered_through_the_entry_point(tmp_path: Path) -> None:
    pm, report = load_plugins()
    assert "storage_lts" not in report.broken
    reg = Registry.from_plugins(pm)
    assert reg.storages["posix"].plugin == "storage_lts"
    storage = reg.create_storage(
        "posix", "lts", {"root": str(tmp_path), "read_limit": 2, "write_limit": 3}, Context(tmp_path)
    )
    assert isinstance(storage, PosixStorage)
    assert (storage.name, storage.type_name) == ("lts", "posix")
    assert storage.read_slots is not None and storage.write_slots is not None
    assert (storage.read_slots.name, storage.read_slots.limit) == ("lts.read", 2)
    assert (storage.write_slots.name, storage.write_slots.limit) == ("lts.write", 3)


def test_config_check_reports_a_missing_root(tmp_path: Path) -> None:
    reg = Registry.from_plugins(load_plugins()[0])
    missing = tmp_path / "not-mounted"
    with pytest.raises(ConfigError) as ei:
        reg.storage_options("posix", {"root": str(missing)}, "storages.lts")
    assert str(ei.value) == f"storages.lts.root: root '{missing}' does not exist"


def test_options_defaults_and_units(tmp_path: Path) -> None:
    o = PosixOptions.model_validate({"root": str(tmp_path)})
    assert (o.create, o.read_limit, o.write_limit, o.min_free, o.fsync) == (False, 4, 4, 0, True)
    assert (o.free_space_timeout, o.free_space_poll, o.offline_timeout, o.offline_poll) == (
        3600, 10, 3600, 5,
    )
    o = PosixOptions.model_validate(
        {"root": str(tmp_path), "min_free": "2GiB", "free_space_timeout": "5m", "offline_poll": "2s"}
    )
    assert (o.min_free, o.free_space_timeout, o.offline_poll) == (2 * 1024**3, 300, 2)


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        ({"bogus": 1}, "Extra inputs are not permitted"),
        ({"min_free": "20 potatoes"}, "not a size: '20 potatoes'"),
        ({"free_space_timeout": "soon"}, "not a duration: 'soon'"),
        ({"read_limit": 0}, "greater than or equal to 1"),
        ({"offline_poll": 0}, "greater than 0"),
    ],
)
def test_options_reject_bad_values(tmp_path: Path, extra: dict[str, object], needle: str) -> None:
    with pytest.raises(ValidationError) as ei:
        PosixOptions.model_validate({"root": str(tmp_path), **extra})
    assert needle in str(ei.value)
    assert ei.value.errors()[0]["loc"] == (next(iter(extra)),)


def test_options_root_must_exist_unless_created(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ValidationError) as ei:
        PosixOptions.model_validate({"root": str(missing)})
    assert f"root '{missing}' does not exist" in str(ei.value)
    a_file = tmp_path / "file"
    a_file.write_bytes(b"x")
    with pytest.raises(ValidationError, match="is not a directory"):
        PosixOptions.model_validate({"root": str(a_file)})
    with pytest.raises(ValidationError, match="root"):
        PosixOptions.model_validate({})


async def test_create_makes_the_root_on_first_use(tmp_path: Path) -> None:
    root = tmp_path / "new" / "lts"
    storage = make(root, create=True)
    assert not root.exists()  # validation and construction do no I/O
    await put(storage, "a/b.bin", b"hello")
    assert (root / "a" / "b.bin").read_bytes() == b"hello"


def test_describe(root: Path, store: PosixStorage) -> None:
    d = store.describe()
    assert d["type"] == "posix" and d["name"] == "lts" and d["root"] == str(root)
    assert (d["read_limit"], d["write_limit"]) == (4, 4)


async def test_slots_bound_concurrency(root: Path) -> None:
    storage = make(root, write_limit=2)
    running = peak = 0

    async def job() -> None:
        nonlocal running, peak
        async with write_slot(storage):
            running += 1
            peak = max(peak, running)
            await anyio.sleep(0.01)
            running -= 1

    async with anyio.create_task_group() as tg:
        for _ in range(6):
            tg.start_soon(job)
    assert peak == 2
    assert storage.write_slots is not None and storage.write_slots.peak_holders == 2
    async with read_slot(storage):
        assert storage.read_slots is not None and storage.read_slots.holders == 1


# -- writing -------------------------------------------------------------------------------------


async def test_round_trip_with_a_reused_buffer(root: Path, store: PosixStorage) -> None:
    chunks = [os.urandom(100_000) for _ in range(5)]
    buf = bytearray(100_000)
    w = await store.open_writer("ds/block-0001.tar", size_hint=500_000)
    for chunk in chunks:
        buf[:] = chunk
        await w.write(memoryview(buf))  # the writer must be done with buf when this returns
    await w.commit()
    expected = b"".join(chunks)
    assert await read_all(store, "ds/block-0001.tar", bufsize=7_777) == expected
    info = await store.stat("ds/block-0001.tar")
    st = os.stat(root / "ds" / "block-0001.tar")
    assert info == ObjectInfo(
        "ds/block-0001.tar", len(expected), st.st_mtime, st.st_mode & 0o7777, st.st_uid, st.st_gid,
        inode=st.st_ino,
    )
    assert files_in(root) == ["ds", "ds/block-0001.tar"]


async def test_nothing_visible_before_commit(root: Path, store: PosixStorage) -> None:
    w = await store.open_writer("x/data.bin")
    await w.write(b"partial")
    with pytest.raises(NotFoundError):
        await store.stat("x/data.bin")
    assert await collect(store) == {}  # the temp file is not an object
    [tmp] = os.listdir(root / "x")
    assert is_temp_name(tmp) and tmp.startswith(".data.bin" + TEMP_MARK)
    await w.commit()
    assert list(await collect(store)) == ["x/data.bin"]
    assert os.listdir(root / "x") == ["data.bin"]


async def test_abort_leaves_nothing(root: Path, store: PosixStorage) -> None:
    w = await store.open_writer("a/b/c.bin")
    await w.write(b"x" * 10_000)
    await w.abort()
    await w.abort()  # twice is fine
    assert [p for p in files_in(root) if p.endswith(".bin") or TEMP_MARK in p] == []
    with pytest.raises(StorageError, match="not open"):
        await w.write(b"more")
    with pytest.raises(StorageError, match="not open"):
        await w.commit()


async def test_abort_after_commit_keeps_the_file(root: Path, store: PosixStorage) -> None:
    w = await store.open_writer("f.bin")
    await w.write(b"kept")
    await w.commit()
    await w.abort()
    assert (root / "f.bin").read_bytes() == b"kept"


async def test_abort_works_inside_a_cancelled_scope(root: Path, store: PosixStorage) -> None:
    w = await store.open_writer("c.bin")
    await w.write(b"data")
    with anyio.CancelScope() as scope:
        scope.cancel()
        await w.abort()
    assert os.listdir(root) == []


async def test_cancelled_open_writer_leaves_nothing(root: Path, store: PosixStorage) -> None:
    with anyio.CancelScope() as scope:
        scope.cancel()
        await store.open_writer("ds/cancelled.bin")
    assert scope.cancelled_caught
    assert files_in(root) == ["ds"]


async def test_commit_replaces_atomically(root: Path, store: PosixStorage) -> None:
    await put(store, "db.tar", b"old contents")
    old_inode = os.stat(root / "db.tar").st_ino
    w = await store.open_writer("db.tar")
    await w.write(b"new contents, longer")
    assert await read_all(store, "db.tar") == b"old contents"  # the old object until commit
    await w.commit()
    assert await read_all(store, "db.tar") == b"new contents, longer"
    assert os.stat(root / "db.tar").st_ino != old_inode  # renamed over, never rewritten in place
    assert os.listdir(root) == ["db.tar"]


async def test_writing_onto_a_directory_fails_early(root: Path, store: PosixStorage) -> None:
    (root / "d").mkdir()
    with pytest.raises(StorageError, match="is a directory"):
        await store.open_writer("d")
    assert os.listdir(root / "d") == []


async def test_long_and_unicode_names(root: Path, store: PosixStorage) -> None:
    long_ascii = "L" * 255  # NAME_MAX: the temp name must be shortened to fit
    long_unicode = "é" * 127  # 254 bytes
    keys = [f"deep/{long_ascii}", f"{long_unicode}/ファイル 1.txt", "emoji/🧊🔬.dat"]
    for i, key in enumerate(keys):
        await put(store, key, f"payload {i}".encode())
    listed = await collect(store)
    assert sorted(listed) == sorted(keys)
    for i, key in enumerate(keys):
        assert await read_all(store, key) == f"payload {i}".encode()
    assert not any(TEMP_MARK in p for p in files_in(root))


# -- reading -------------------------------------------------------------------------------------


async def test_ranged_reads(store: PosixStorage) -> None:
    data = bytes(range(256)) * 1000
    await put(store, "r.bin", data)
    for offset, length in [(0, None), (0, 10), (1000, 5000), (255_990, None), (255_990, 100), (5, 0)]:
        got = await read_all(store, "r.bin", bufsize=4096, offset=offset, length=length)
        end = len(data) if length is None else offset + length
        assert got == data[offset:end], (offset, length)
    assert await read_all(store, "r.bin", offset=len(data) + 10) == b""
    with pytest.raises(ValueError, match="bad range"):
        await store.open_reader("r.bin", offset=-1)


async def test_readinto_fills_the_callers_buffer(store: PosixStorage) -> None:
    await put(store, "t.bin", b"0123456789")
    reader = await store.open_reader("t.bin", offset=2, length=5)
    backing = bytearray(b"\xff" * 16)
    view = memoryview(backing)
    assert await reader.readinto(view[4:]) == 5
    assert bytes(backing) == b"\xff" * 4 + b"23456" + b"\xff" * 7
    assert await reader.readinto(view) == 0
    assert await reader.readinto(view) == 0
    await reader.aclose()
    with pytest.raises(StorageError, match="closed"):
        await reader.readinto(view)


async def test_empty_file(store: PosixStorage, root: Path) -> None:
    (root / "empty").touch()
    assert await read_all(store, "empty") == b""
    assert (await store.stat("empty")).size == 0


async def test_missing_objects(root: Path, store: PosixStorage) -> None:
    with pytest.raises(NotFoundError, match="'nope/x' not found"):
        await store.stat("nope/x")
    reader = await store.open_reader("nope/x")  # lazy: the open happens in the first readinto
    with pytest.raises(NotFoundError, match="not found"):
        await reader.readinto(memoryview(bytearray(10)))
    await reader.aclose()
    (root / "dir").mkdir()
    with pytest.raises(NotAFileError, match="'dir' is a directory, not a file"):
        await store.stat("dir")
    assert await store.exists("dir")  # taken: nothing may be written there
    with pytest.raises(NotFoundError):
        await read_all(store, "dir")


def _resident_bytes(path: Path) -> int | None:
    if shutil.which("fincore") is None:
        return None
    out = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
        capture_output=True, text=True, check=False,
    )
    return int(out.stdout.strip()) if out.returncode == 0 and out.stdout.strip() else None


async def test_uncached_read_bypasses_the_page_cache(root: Path, store: PosixStorage) -> None:
    data = os.urandom(4 * 1024 * 1024)
    await put(store, "verify.tar", data)
    path = root / "verify.tar"
    assert await read_all(store, "verify.tar") == data  # warms the page cache
    warm = _resident_bytes(path)
    assert await read_all(store, "verify.tar", bufsize=1 << 20, uncached=True) == data
    cold = _resident_bytes(path)
    if warm is None or cold is None or warm == 0:
        pytest.skip("fincore cannot see page-cache residency here; bytes were checked")
    assert cold < len(data) // 8, (warm, cold)


# -- read-back while writing ---------------------------------------------------------------------


def _xxh3(data: bytes) -> str:
    import xxhash

    return xxhash.xxh3_128(data).hexdigest()


async def test_read_back_follows_the_writer(root: Path, store: PosixStorage) -> None:
    import xxhash
    from moverd_storage_lts.readback import SEGMENT

    data = os.urandom(SEGMENT + 3 * 1024 * 1024 + 123)
    hasher = xxhash.xxh3_128()
    w = await store.open_writer("ds/block.tar")
    assert w.read_back_into(hasher)
    view = memoryview(data)
    for i in range(0, len(data), 1 << 20):
        await w.write(view[i : i + (1 << 20)])
    # The first segment is read back before the commit, behind the writer.
    with anyio.fail_after(30):
        while w._read_back is None or w._read_back.done < SEGMENT:
            await anyio.sleep(0.02)
    assert not (root / "ds/block.tar").exists()
    await w.commit()
    assert hasher.hexdigest() == _xxh3(data)
    assert (root / "ds/block.tar").read_bytes() == data
    assert not [t for t in threading.enumerate() if t.name == "moverd-read-back"]


async def test_read_back_sees_what_the_medium_holds(root: Path, store: PosixStorage) -> None:
    import xxhash

    data = os.urandom(3 * 1024 * 1024)
    hasher = xxhash.xxh3_128()
    w = await store.open_writer("ds/block.tar")
    assert w.read_back_into(hasher)
    await w.write(data)
    tmp = next((root / "ds").iterdir())
    with open(tmp, "r+b") as f:  # the medium changes a byte after it was written
        f.seek(1_000_000)
        f.write(bytes([data[1_000_000] ^ 0x04]))
    await w.commit()
    assert hasher.hexdigest() != _xxh3(data)


async def test_read_back_is_offered_before_the_first_write_only(store: PosixStorage) -> None:
    import xxhash

    w = await store.open_writer("a.tar")
    await w.write(b"x")
    assert not w.read_back_into(xxhash.xxh3_128())
    await w.abort()


async def test_abort_stops_the_read_back(root: Path, store: PosixStorage) -> None:
    import xxhash
    from moverd_storage_lts.readback import SEGMENT

    w = await store.open_writer("ds/block.tar")
    assert w.read_back_into(xxhash.xxh3_128())
    await w.write(os.urandom(SEGMENT + 1))
    await w.abort()
    assert files_in(root) == ["ds"]
    assert not [t for t in threading.enumerate() if t.name == "moverd-read-back"]


async def test_big_writes_go_around_the_page_cache(root: Path, store: PosixStorage) -> None:
    import fcntl

    import xxhash
    from moverd_storage_lts.direct import DIRECT_MIN, STAGE_SIZE

    # Pieces of awkward sizes, as a tar stream has them; the file ends off any block boundary.
    pieces = [os.urandom(n) for n in (512, 1 << 20, 3, 700_001, STAGE_SIZE + 17, 4096, 12_345)] * 6
    data = b"".join(pieces)
    hasher = xxhash.xxh3_128()
    w = await store.open_writer("ds/big.tar", size_hint=DIRECT_MIN)
    assert w._fd is not None and fcntl.fcntl(w._fd, fcntl.F_GETFL) & os.O_DIRECT
    assert w.read_back_into(hasher)
    for piece in pieces:
        await w.write(memoryview(piece))
    await w.commit()
    assert (root / "ds/big.tar").read_bytes() == data
    assert hasher.hexdigest() == _xxh3(data)
    assert not [t for t in threading.enumerate() if t.name == "moverd-direct-write"]


async def test_abort_while_the_stage_writes_leaves_no_read_back_thread(root: Path, store: PosixStorage) -> None:
    import xxhash
    from moverd_storage_lts.direct import DIRECT_MIN, STAGE_SIZE
    from moverd_storage_lts.readback import SEGMENT

    w = await store.open_writer("ds/big.tar", size_hint=DIRECT_MIN)
    assert w.read_back_into(xxhash.xxh3_128()) and w._stage is not None
    stage = w._stage
    advance = stage._on_written
    assert advance is not None

    def late(on_disk: int) -> None:  # the stage's thread is still busy when the abort comes
        time.sleep(0.3)
        advance(on_disk)

    stage._on_written = late
    chunk = os.urandom(STAGE_SIZE)
    for _ in range(SEGMENT // STAGE_SIZE):  # the last buffer, still being written, ends a segment
        await w.write(chunk)
    await w.abort()
    time.sleep(0.1)
    assert not [t for t in threading.enumerate() if t.name in ("moverd-read-back", "moverd-direct-write")]
    assert files_in(root) == ["ds"]


def test_a_failure_in_the_stage_thread_reaches_the_writer(tmp_path: Path) -> None:
    from moverd_storage_lts.direct import STAGE_SIZE, Stage

    def boom(on_disk: int) -> None:
        raise RuntimeError("cannot start the read-back")

    stage = Stage(on_written=boom)
    fd = os.open(tmp_path / "f", os.O_CREAT | os.O_WRONLY)
    raised: list[BaseException] = []

    def fill() -> None:
        try:
            for _ in range(4):
                stage.put(fd, memoryview(bytes(STAGE_SIZE)))
            stage.finish(fd)
        except BaseException as exc:
            raised.append(exc)

    filler = threading.Thread(target=fill)
    filler.start()
    filler.join(timeout=30)
    assert not filler.is_alive(), "the writer's thread waits for a buffer the stage thread never gave back"
    assert raised and "cannot start the read-back" in str(raised[0])
    stage.close()  # every buffer is back: no BufferError
    os.close(fd)


async def test_direct_io_can_be_turned_off(root: Path) -> None:
    import fcntl

    from moverd_storage_lts.direct import DIRECT_MIN

    storage = make(root, direct_io=False)
    assert storage.describe()["direct_io"] is False
    w = await storage.open_writer("ds/big.tar", size_hint=DIRECT_MIN)
    assert w._fd is not None and not fcntl.fcntl(w._fd, fcntl.F_GETFL) & os.O_DIRECT
    await w.write(b"x" * 1000)
    await w.commit()
    assert (root / "ds/big.tar").read_bytes() == b"x" * 1000


async def test_small_writes_use_the_page_cache(store: PosixStorage) -> None:
    import fcntl

    w = await store.open_writer("ds/small.bin", size_hint=1 << 20)
    assert w._fd is not None and not fcntl.fcntl(w._fd, fcntl.F_GETFL) & os.O_DIRECT
    await w.abort()


async def test_direct_write_on_a_full_file_system_leaves_nothing(small_fs: Path) -> None:
    from moverd_storage_lts.direct import DIRECT_MIN

    storage = make(small_fs, fsync=True)
    w = await storage.open_writer("ds/too-big.tar", size_hint=DIRECT_MIN)
    with pytest.raises(NoSpaceError, match="no space left"):
        for _ in range(40):  # 10 MiB into 1 MiB: fails when a staging buffer goes out
            await w.write(os.urandom(256 * 1024))
        await w.commit()
    assert files_in(small_fs) == ["ds"]
    assert not [t for t in threading.enumerate() if t.name == "moverd-direct-write"]


async def test_a_file_system_refusing_direct_io_gets_the_page_cache(no_direct_io_fs: Path) -> None:
    import fcntl

    import xxhash
    from moverd_storage_lts.direct import DIRECT_MIN, STAGE_SIZE

    with pytest.raises(OSError):  # the fault is real: this file system refuses O_DIRECT
        os.close(os.open(no_direct_io_fs / "probe", os.O_CREAT | os.O_WRONLY | os.O_DIRECT))
    storage = make(no_direct_io_fs, fsync=True)
    pieces = [os.urandom(n) for n in (512, STAGE_SIZE + 17, 3, 700_001)]
    data = b"".join(pieces)
    hasher = xxhash.xxh3_128()
    w = await storage.open_writer("ds/big.tar", size_hint=DIRECT_MIN)
    assert w._fd is not None and not fcntl.fcntl(w._fd, fcntl.F_GETFL) & os.O_DIRECT
    assert w.read_back_into(hasher)  # reads back through the page cache
    for piece in pieces:
        await w.write(memoryview(piece))
    await w.commit()
    assert (no_direct_io_fs / "ds/big.tar").read_bytes() == data
    assert hasher.hexdigest() == _xxh3(data)


async def test_read_back_on_tmpfs(small_fs: Path) -> None:
    import xxhash

    storage = make(small_fs, fsync=True)
    data = os.urandom(600 * 1024)
    hasher = xxhash.xxh3_128()
    w = await storage.open_writer("ds/small.tar")
    assert w.read_back_into(hasher)
    await w.write(data)
    await w.commit()
    assert hasher.hexdigest() == _xxh3(data)


async def test_read_back_on_a_full_file_system_leaves_nothing(small_fs: Path) -> None:
    import xxhash

    storage = make(small_fs, fsync=True)
    w = await storage.open_writer("ds/too-big.tar")
    assert w.read_back_into(xxhash.xxh3_128())
    with pytest.raises(NoSpaceError):
        for _ in range(16):
            await w.write(os.urandom(256 * 1024))
        await w.commit()
    assert files_in(small_fs) == ["ds"]


# -- listing -------------------------------------------------------------------------------------


async def test_list_nested_with_metadata(root: Path, store: PosixStorage) -> None:
    (root / "ds1" / "raw" / "run 1").mkdir(parents=True)
    (root / "ds1" / "raw" / "run 1" / "a.mrc").write_bytes(b"a" * 10)
    (root / "ds1" / "meta.json").write_bytes(b"{}")
    (root / "ds1" / "empty.txt").touch()
    os.chmod(root / "ds1" / "meta.json", 0o640)
    (root / "ds1" / f".meta.json{TEMP_MARK}0123456789ab").write_bytes(b"tmp")
    os.mkfifo(root / "ds1" / "fifo")
    (root / "ds2").mkdir()
    (root / "ds2" / "b").write_bytes(b"bb")
    (root / "ds10").mkdir()
    (root / "ds10" / "c").write_bytes(b"c")

    everything = await collect(store)
    assert sorted(everything) == [
        "ds1/empty.txt", "ds1/meta.json", "ds1/raw/run 1/a.mrc", "ds10/c", "ds2/b",
    ]
    meta = everything["ds1/meta.json"]
    assert (meta.size, meta.mode, meta.uid, meta.gid) == (2, 0o640, os.getuid(), os.getgid())
    assert everything["ds1/empty.txt"].size == 0
    assert sorted(await collect(store, "ds1")) == ["ds1/empty.txt", "ds1/meta.json", "ds1/raw/run 1/a.mrc"]
    assert sorted(await collect(store, "ds1/raw/")) == ["ds1/raw/run 1/a.mrc"]
    assert await collect(store, "missing") == {}
    assert await collect(store, "ds2/b") == {}  # a prefix is a folder; a file is not under itself


async def test_list_many_files(root: Path, store: PosixStorage) -> None:
    n = 5000
    for d in range(10):
        (root / f"d{d}").mkdir()
    for i in range(n):
        (root / f"d{i % 10}" / f"f{i:05d}").write_bytes(b"")
    start = time.monotonic()
    keys = [info.key async for info in store.list()]
    elapsed = time.monotonic() - start
    assert len(keys) == n and len(set(keys)) == n
    assert elapsed < 5, f"listing {n} files took {elapsed:.1f} s"


async def test_list_stops_early_without_leaking(root: Path, store: PosixStorage) -> None:
    for d in range(3):
        (root / f"d{d}").mkdir()
        for i in range(1000):
            (root / f"d{d}" / f"f{i}").touch()
    fds_before = len(os.listdir("/proc/self/fd"))
    gen = store.list()
    seen = 0
    async for _ in gen:
        seen += 1
        if seen == 1500:  # past the first batch, in the middle of the walk
            break
    await gen.aclose()  # type: ignore[attr-defined]
    assert seen == 1500
    assert len(os.listdir("/proc/self/fd")) == fds_before


# -- root confinement ----------------------------------------------------------------------------


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    out = tmp_path / "outside"
    out.mkdir()
    (out / "secret").write_bytes(b"do not archive me")
    return out


async def test_symlinked_directory_leading_outside_is_refused(
    root: Path, store: PosixStorage, outside: Path
) -> None:
    (root / "ds").mkdir()
    (root / "ds" / "ok").write_bytes(b"ok")
    (root / "ds" / "escape").symlink_to(outside)
    with pytest.raises(UnsafePathError, match="'ds/escape' is a symlink leading outside"):
        await collect(store)
    with pytest.raises(UnsafePathError, match="outside the root"):
        await collect(store, "ds/escape")
    with pytest.raises(UnsafePathError, match="outside the root"):
        await store.stat("ds/escape/secret")
    with pytest.raises(UnsafePathError, match="outside the root"):
        await read_all(store, "ds/escape/secret")
    with pytest.raises(UnsafePathError, match="outside the root"):
        await store.open_writer("ds/escape/planted")
    with pytest.raises(UnsafePathError, match="outside the root"):
        await store.open_writer("ds/escape/new-dir/planted")
    with pytest.raises(UnsafePathError):
        await store.ensure_online("ds/escape/secret")
    with pytest.raises(UnsafePathError):
        await store.delete("ds/escape/secret")
    with pytest.raises(UnsafePathError):
        await store.delete_prefix("ds/escape")
    assert sorted(os.listdir(outside)) == ["secret"]
    assert (outside / "secret").read_bytes() == b"do not archive me"


async def test_symlinked_file_leading_outside_is_refused(
    root: Path, store: PosixStorage, outside: Path
) -> None:
    (root / "link").symlink_to(outside / "secret")
    with pytest.raises(UnsafePathError, match="'link' is a symlink leading outside"):
        await collect(store)
    with pytest.raises(UnsafePathError):
        await store.stat("link")
    with pytest.raises(UnsafePathError):
        await read_all(store, "link")
    with pytest.raises(UnsafePathError, match="'link' is a symlink leading outside"):
        await store.open_writer("link")
    (root / "dangling").symlink_to(outside / "does-not-exist")
    (root / "link").unlink()
    with pytest.raises(UnsafePathError):
        await collect(store)
    assert (outside / "secret").read_bytes() == b"do not archive me"


async def test_symlinks_inside_the_root_are_followed(root: Path, store: PosixStorage) -> None:
    (root / "real").mkdir()
    (root / "real" / "f").write_bytes(b"12345")
    (root / "alias").symlink_to("real")  # a directory link, relative
    (root / "real" / "g").symlink_to(root / "real" / "f")  # a file link, absolute
    (root / "real" / "loop").symlink_to("..")  # a cycle: must not recurse forever
    (root / "broken").symlink_to("nowhere")  # dangling inside: not an object
    listed = await collect(store)
    assert sorted(listed) == ["alias/f", "alias/g", "real/f", "real/g"]
    assert listed["real/g"].size == 5
    assert await read_all(store, "alias/g") == b"12345"
    assert (await store.stat("alias/f")).size == 5
    await put(store, "alias/new", b"via link")
    assert (root / "real" / "new").read_bytes() == b"via link"


@pytest.mark.parametrize("key", ["../x", "a/../../x", "/etc/passwd", "a\x00b", "a\nb", ""])
async def test_unsafe_keys_are_refused(store: PosixStorage, key: str) -> None:
    with pytest.raises(UnsafePathError):
        await store.stat(key)
    with pytest.raises(UnsafePathError):
        await store.open_reader(key)
    with pytest.raises(UnsafePathError):
        await store.open_writer(key)
    with pytest.raises(UnsafePathError):
        await store.delete(key)
    with pytest.raises(UnsafePathError):
        await store.ensure_online(key)
    if key:  # an empty prefix is the whole root, which is allowed
        with pytest.raises(UnsafePathError):
            await collect(store, key)
        with pytest.raises(UnsafePathError):
            await store.delete_prefix(key)


# -- deleting ------------------------------------------------------------------------------------


async def test_delete(root: Path, store: PosixStorage) -> None:
    await put(store, "a/b", b"1")
    await store.delete("a/b")
    await store.delete("a/b")  # missing is fine
    await store.delete("never/existed")
    assert not (root / "a" / "b").exists()
    (root / "dir").mkdir()
    with pytest.raises(StorageError, match="is a directory"):
        await store.delete("dir")


async def test_delete_prefix(root: Path, store: PosixStorage, outside: Path) -> None:
    for key in ["ds/a", "ds/sub/b", "ds/sub/deeper/c", "ds2/keep"]:
        await put(store, key, b"x")
    (root / "ds" / f".a{TEMP_MARK}0123456789ab").write_bytes(b"t")
    (root / "ds" / "sub" / "out").symlink_to(outside)  # removed as a link, never followed
    assert await store.delete_prefix("ds") == 3
    assert files_in(root) == ["ds2", "ds2/keep"]
    assert (outside / "secret").exists()
    assert await store.delete_prefix("ds") == 0
    assert await store.delete_prefix("") == 1
    assert os.listdir(root) == []  # the root itself stays


async def test_remove_stale_temp_files(root: Path, store: PosixStorage) -> None:
    # A writer of a process that died left its temp file unlocked (the kernel dropped the lock).
    (root / "ds").mkdir()
    crashed = root / "ds" / f".block.tar{TEMP_MARK}0123456789ab"
    crashed.write_bytes(b"half a datablock")
    recent = root / "ds" / f".recent.tar{TEMP_MARK}0123456789ab"
    recent.write_bytes(b"died a minute ago")
    old = time.time() - 7200
    os.utime(crashed, (old, old))
    # A live writer that paused for two hours keeps its file: it holds the lock.
    paused = await store.open_writer("ds/paused.tar")
    await paused.write(b"still being written")
    [paused_tmp] = [p for p in (root / "ds").iterdir() if p.name.startswith(".paused.tar")]
    os.utime(paused_tmp, (old, old))
    (root / "ds" / "innocent.moverd-tmp-notours").write_bytes(b"")
    assert await store.remove_stale_temp_files(3600) == 1
    assert not crashed.exists() and recent.exists() and paused_tmp.exists()
    assert await store.remove_stale_temp_files(0) == 1  # the recent dead one; the paused one stays
    assert paused_tmp.exists()
    await paused.commit()
    assert sorted(p.name for p in (root / "ds").iterdir()) == ["innocent.moverd-tmp-notours", "paused.tar"]


async def test_remove_all_temp_files_of_a_prefix(root: Path, store: PosixStorage) -> None:
    # older_than=0: "nothing is live under this prefix", even with an mtime in the future.
    (root / "ds1").mkdir()
    (root / "ds2").mkdir()
    future = time.time() + 3600
    for d in ("ds1", "ds2"):
        tmp = root / d / f".x{TEMP_MARK}0123456789ab"
        tmp.write_bytes(b"")
        os.utime(tmp, (future, future))
    assert await store.remove_stale_temp_files(0, prefix="ds1") == 1
    assert await store.remove_stale_temp_files(0, prefix="never-written") == 0
    assert files_in(root) == ["ds1", "ds2", f"ds2/.x{TEMP_MARK}0123456789ab"]


async def test_set_metadata(root: Path, store: PosixStorage) -> None:
    await put(store, "out/f.txt", b"retrieved")
    await store.set_metadata("out/f.txt", mtime=1_600_000_000.5, mode=0o4750)
    st = os.stat(root / "out" / "f.txt")
    assert st.st_mtime == 1_600_000_000.5
    assert st.st_mode & 0o7777 == 0o750  # no setuid from an archive
    await store.set_metadata("out/f.txt")  # nothing to do
    with pytest.raises(NotFoundError):
        await store.set_metadata("out/missing", mode=0o644)


# -- faults on a real small file system ---------------------------------------------------------


async def test_enospc_raises_no_space_and_leaves_nothing(small_fs: Path) -> None:
    storage = make(small_fs, fsync=True)
    chunk = memoryview(os.urandom(256 * 1024))
    w = await storage.open_writer("ds/too-big.tar")
    with pytest.raises(NoSpaceError) as ei:
        for _ in range(16):  # 4 MiB into 1 MiB
            await w.write(chunk)
        await w.commit()
    msg = str(ei.value)
    assert "no space left on device" in msg and str(small_fs / "ds" / "too-big.tar") in msg
    assert "\n" not in msg
    assert files_in(small_fs) == ["ds"]  # no partial file, no temp file
    await w.abort()  # already cleaned up: a no-op that does not raise
    # The space is back: a file that fits goes through.
    await put(storage, "ds/fits.bin", b"y" * 1000)
    assert files_in(small_fs) == ["ds", "ds/fits.bin"]


async def test_free_space_and_wait_for_space(small_fs: Path) -> None:
    storage = make(small_fs, min_free="512KiB", free_space_timeout=0.3, free_space_poll=0.05)
    free = await storage.free_space()
    assert 900 * 1024 <= free <= 1024 * 1024
    await storage.wait_for_space(100 * 1024)  # 100 KiB leaves > 512 KiB: at once
    (small_fs / "filler").write_bytes(b"x" * (200 * 1024))
    start = time.monotonic()
    with pytest.raises(NoSpaceError) as ei:  # 450 KiB + 512 KiB would fit the empty 1 MiB: a wait
        await storage.wait_for_space(450 * 1024)
    waited = time.monotonic() - start
    assert 0.25 <= waited < 2
    msg = str(ei.value)
    for part in (str(small_fs), "free", "450.0 KiB needed", "min_free 512.0 KiB", "waited", "0.3 s"):
        assert part in msg, (part, msg)


async def test_wait_for_space_returns_when_space_is_freed(small_fs: Path) -> None:
    storage = make(small_fs, min_free="256KiB", free_space_timeout=5, free_space_poll=0.05)
    filler = small_fs / "filler"
    filler.write_bytes(b"f" * 700 * 1024)

    def free_later() -> None:
        time.sleep(0.3)
        filler.unlink()

    t = threading.Thread(target=free_later)
    t.start()
    start = time.monotonic()
    try:
        await storage.wait_for_space(300 * 1024)
    finally:
        t.join()
    assert 0.25 <= time.monotonic() - start < 3


async def test_wait_for_space_counts_open_writers(small_fs: Path) -> None:
    storage = make(small_fs, free_space_timeout=0.2, free_space_poll=0.05)
    other = await storage.open_writer("a.tar", size_hint=800 * 1024)
    await other.write(b"z" * 100 * 1024)  # 700 KiB of its hint still to come
    assert storage.pending_bytes() == 700 * 1024
    with pytest.raises(NoSpaceError, match=r"700\.0 KiB of it promised to open writers"):
        await storage.wait_for_space(300 * 1024)
    await other.abort()
    assert storage.pending_bytes() == 0
    await storage.wait_for_space(300 * 1024)  # at once now


async def test_read_only_file_system(small_fs: Path) -> None:
    storage = make(small_fs)
    await put(storage, "existing.bin", b"readable")
    remount_read_only(small_fs)
    with pytest.raises(StorageError, match="read-only file system") as ei:
        await storage.open_writer("new.bin")
    assert not isinstance(ei.value, NoSpaceError)
    with pytest.raises(StorageError, match="read-only file system"):
        await storage.delete("existing.bin")
    assert await read_all(storage, "existing.bin", uncached=True) == b"readable"
    assert files_in(small_fs) == ["existing.bin"]


# -- HSM (offline files) -------------------------------------------------------------------------


def _sparse(path: Path, size: int) -> None:
    """An HSM stub: the full size, no data block on disk."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        os.truncate(f.fileno(), size)
    st = os.stat(path)
    if st.st_blocks != 0:
        pytest.skip("this file system allocates blocks for sparse files: cannot fake an offline file")


async def test_resident_file_is_online_at_once(root: Path) -> None:
    storage = make(root, offline_timeout=5, offline_poll=1)
    (root / "f").write_bytes(b"data")
    (root / "empty").touch()
    start = time.monotonic()
    await storage.ensure_online("f")
    await storage.ensure_online("empty")  # size 0: nothing to recall
    assert time.monotonic() - start < 0.5
    with pytest.raises(NotFoundError):
        await storage.ensure_online("missing")


async def test_offline_file_waits_for_recall(root: Path) -> None:
    storage = make(root, offline_timeout=5, offline_poll=0.05)
    stub = root / "ds" / "movie.mrc"
    _sparse(stub, 64 * 1024)

    def recall() -> None:
        time.sleep(0.3)
        fd = os.open(stub, os.O_WRONLY)
        try:
            os.pwrite(fd, b"m" * 64 * 1024, 0)
            os.fsync(fd)
        finally:
            os.close(fd)

    t = threading.Thread(target=recall)
    t.start()
    start = time.monotonic()
    try:
        await storage.ensure_online("ds/movie.mrc")
    finally:
        t.join()
    assert 0.25 <= time.monotonic() - start < 3
    assert await read_all(storage, "ds/movie.mrc") == b"m" * 64 * 1024


async def test_offline_file_times_out(root: Path) -> None:
    storage = make(root, offline_timeout=0.3, offline_poll=0.05)
    _sparse(root / "ds" / "stub.mrc", 1_000_000)
    start = time.monotonic()
    with pytest.raises(OfflineTimeoutError) as ei:
        await storage.ensure_online("ds/stub.mrc")
    assert 0.25 <= time.monotonic() - start < 2
    msg = str(ei.value)
    assert "'ds/stub.mrc'" in msg and str(root / "ds" / "stub.mrc") in msg and "0.3 s" in msg


def test_errno_mapping_messages() -> None:
    from moverd_storage_lts.oserrors import map_os_error

    def err(code: int) -> Exception:
        exc = OSError(code, os.strerror(code))
        mapped: Exception = map_os_error(exc, "/lts/x", "write", "posix storage 'lts'")
        return mapped

    assert isinstance(err(errno.ENOSPC), NoSpaceError)
    assert isinstance(err(errno.EDQUOT), NoSpaceError)
    assert str(err(errno.EDQUOT)).endswith("no space left on device (disk quota exceeded)")
    assert str(err(errno.EROFS)) == "posix storage 'lts': cannot write /lts/x: read-only file system"
    assert str(err(errno.EACCES)) == "posix storage 'lts': cannot write /lts/x: Permission denied"
    assert isinstance(err(errno.ENOENT), NotFoundError)
    assert type(err(errno.EIO)) is StorageError
