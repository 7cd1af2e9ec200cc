"""A source file that changes while it is archived is never archived as verified.

Real files change under the real pipeline: the ``datablock_committed`` hook of a plugin changes a
file of the folder once the first tar is committed (the moment a detector still writing would),
and the reader test appends to a file between two reads of it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from moverd import ObjectInfo, SourceChangedError, hookimpl
from moverd.app import App
from moverd.models import ArchiveStatus
from moverd.plugins import load_plugins
from moverd.services.folders import dataset_for_folder
from moverd.services.lifecycle import archive_with_lifecycle
from tests.support.apps import make_settings

MiB = 1024**2


def make_folder(root: Path, n: int = 6, size: int = MiB) -> dict[str, bytes]:
    root.mkdir(parents=True)
    files = {f"f{i:02d}.bin": os.urandom(size) for i in range(n)}
    for name, data in files.items():
        (root / name).write_bytes(data)
    return files


class OnFirstCommit:
    """Runs ``change`` once, when the first datablock is committed."""

    def __init__(self, change: Callable[[], None]) -> None:
        self.change = change
        self.done = False

    @hookimpl
    def datablock_committed(self, transfer: Any, datablock: Any) -> None:
        if not self.done:
            self.done = True
            self.change()


def app_with(tmp_path: Path, change: Callable[[], None]) -> tuple[App, OnFirstCommit]:
    pm, report = load_plugins()
    hook = OnFirstCommit(change)
    pm.register(hook, name="changer")
    # One datablock at a time, one file per datablock: the last file is read after the first commit.
    settings = make_settings(tmp_path, pipeline={"target_size": "1MiB", "datablock_concurrency": 1})
    return App(settings, pm, report), hook


def append(path: Path, n: int = 4096) -> Callable[[], None]:
    def change() -> None:
        with path.open("ab") as f:
            f.write(b"x" * n)

    return change


def rewrite_same_size(path: Path) -> Callable[[], None]:
    def change() -> None:
        data = bytearray(path.read_bytes())
        data[100] ^= 0xFF
        st = path.stat()
        path.write_bytes(bytes(data))
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # a coarse clock still ticks

    return change


def replace_same_size_and_time(path: Path) -> Callable[[], None]:
    def change() -> None:
        st = path.stat()
        other = path.with_name(path.name + ".new")
        other.write_bytes(os.urandom(st.st_size))
        os.utime(other, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size and mtime: only the inode differs
        other.replace(path)

    return change


@pytest.mark.anyio
@pytest.mark.parametrize("how", ["grows", "rewritten", "replaced", "shrinks"])
async def test_a_file_changed_before_it_is_read_fails_the_archive(tmp_path: Path, how: str) -> None:
    src = tmp_path / "src"
    make_folder(src)
    last = src / "f05.bin"
    change = {
        "grows": append(last),
        "rewritten": rewrite_same_size(last),
        "replaced": replace_same_size_and_time(last),
        "shrinks": lambda: os.truncate(last, MiB // 2),
    }[how]
    app, hook = app_with(tmp_path, change)
    async with app:
        found = await dataset_for_folder(app, src)
        with pytest.raises(SourceChangedError) as err:
            await archive_with_lifecycle(app, found.dataset.pid)
        assert hook.done
        assert "'f05.bin'" in str(err.value) and "changed while" in str(err.value)
        pid = found.dataset.pid
        # Nothing registered, the dataset has the user-error status, and no tar is left on the LTS
        # (what was written holds data the source no longer has).
        assert await app.catalog.list_datablocks(pid) == []
        ds = await app.catalog.get_dataset(pid)
        assert ds.lifecycle["archive_status"] == ArchiveStatus.missing_files.value
        lts = Path(app.settings.storages["lts"]["root"])
        assert [p for p in lts.rglob("*") if p.is_file()] == []


@pytest.mark.anyio
async def test_a_file_that_grows_after_it_was_read_fails_the_archive(tmp_path: Path) -> None:
    """The first file is in the first datablock, already committed when it grows: its copy is
    consistent but incomplete, and the second listing at the end catches it."""
    src = tmp_path / "src"
    make_folder(src)
    app, hook = app_with(tmp_path, append(src / "f00.bin"))
    async with app:
        found = await dataset_for_folder(app, src)
        with pytest.raises(SourceChangedError, match="'f00.bin'"):
            await archive_with_lifecycle(app, found.dataset.pid)
        assert hook.done
        assert await app.catalog.list_datablocks(found.dataset.pid) == []
        lts = Path(app.settings.storages["lts"]["root"])
        assert [p for p in lts.rglob("*") if p.is_file()] == []


@pytest.mark.anyio
async def test_the_reader_sees_a_file_grow_or_get_rewritten_between_its_reads(tmp_path: Path, app: App) -> None:
    src = tmp_path / "src"
    make_folder(src, n=2, size=4 * MiB)
    folder = app.local_folder(src, "source")
    for name, change in (("f00.bin", append(src / "f00.bin")), ("f01.bin", rewrite_same_size(src / "f01.bin"))):
        listed: ObjectInfo = await folder.stat(name)
        reader = await folder.open_reader(name, expect=listed)
        buf = memoryview(bytearray(MiB))
        assert await reader.readinto(buf) == MiB
        change()
        with pytest.raises(SourceChangedError, match=f"'{name}' changed while it was being read"):
            while await reader.readinto(buf):
                pass
        await reader.aclose()
    # Unchanged, the same pinned read goes through.
    listed = await folder.stat("f01.bin")
    reader = await folder.open_reader("f01.bin", expect=listed)
    total = 0
    while n := await reader.readinto(buf):
        total += n
    await reader.aclose()
    assert total == 4 * MiB


def test_the_cli_exits_2_naming_the_file_and_archives_it_once_complete(tmp_path: Path) -> None:
    """The campaign's case through the command: 12 files of 1 MiB, 1 MiB datablocks; the last file
    grows by 4 KiB once the first tar is committed, by an installed plugin's hook (a real
    distribution with a ``moverd.plugins`` entry point, on the command's PYTHONPATH)."""
    src = tmp_path / "src"
    make_folder(src, n=12)
    site = tmp_path / "site"
    dist = site / "grow_plugin-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: grow-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[moverd.plugins]\ngrow = grow_plugin_mod\n")
    (site / "grow_plugin_mod.py").write_text(
        "import os\n"
        "from moverd import hookimpl\n"
        "@hookimpl\n"
        "def datablock_committed(transfer, datablock):\n"
        "    once = os.environ.get('GROW_ONCE')\n"
        "    if once and not os.path.exists(once):\n"
        "        open(once, 'w').close()\n"
        "        with open(os.environ['GROW_FILE'], 'ab') as f:\n"
        "            f.write(b'x' * 4096)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOVERD_")}
    env.update(MOVERD_STATE_DIR=str(tmp_path / "state"), MOVERD_PIPELINE__TARGET_SIZE="1MiB",
               MOVERD_PIPELINE__DATABLOCK_CONCURRENCY="1", PYTHONPATH=str(site), GROW_FILE=str(src / "f11.bin"),
               GROW_ONCE=str(tmp_path / "grown"))
    p = subprocess.run([sys.executable, "-m", "moverd", "archive", str(src), "--json"], env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    assert "'f11.bin'" in p.stderr and "changed while" in p.stderr
    assert p.stdout == ""
    assert (src / "f11.bin").stat().st_size == MiB + 4096
    # Complete now (the plugin grew it once): the folder, whose file list changed, archives as a
    # new dataset, verified.
    p = subprocess.run([sys.executable, "-m", "moverd", "archive", str(src), "--json"], env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)
    assert res["written"] == 12 and not res["resumed"]
    out = tmp_path / "out"
    subprocess.run([sys.executable, "-m", "moverd", "retrieve", res["dataset"], "--to", str(out)], env=env,
                   check=True, capture_output=True, timeout=120)
    assert (out / "f11.bin").stat().st_size == MiB + 4096
