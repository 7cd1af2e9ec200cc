"""Every hook of moverd.hookspecs, exercised through a plugin as a third party would write it."""

from __future__ import annotations

import inspect
import re
import sys
import textwrap
import zlib
from pathlib import Path
from typing import Any

import pytest

from moverd import (
    CatalogType,
    Datablock,
    MissingFileError,
    MoverdError,
    Options,
    StorageType,
    Transfer,
    VerificationError,
    hookimpl,
    hookspecs,
)
from moverd.app import App
from moverd.builtin.local_catalog import LocalCatalog
from moverd.plugins import describe_plugins, load_plugins
from moverd.services import archive_dataset, verify_dataset
from moverd.services.folders import register_folder
from tests.support.apps import make_settings
from tests.support.trees import awkward_tree

ROOT = Path(__file__).resolve().parents[1]
HOOKS = sorted(name for name, fn in inspect.getmembers(hookspecs, inspect.isfunction) if hasattr(fn, "moverd_spec"))


class Crc32:
    """A checksum a plugin adds: zlib's crc32 behind the hashlib interface."""

    def __init__(self) -> None:
        self.value = 0

    def update(self, data: bytes | memoryview) -> None:
        self.value = zlib.crc32(data, self.value)

    def hexdigest(self) -> str:
        return f"{self.value:08x}"


class Recorder:
    """Observer and registration hooks of a third-party plugin."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []

    @hookimpl
    def register_checksums(self, register: Any) -> None:
        register("crc32", Crc32)

    @hookimpl
    def register_storages(self, register: Any) -> None:
        class Opts(Options):
            root: str

        def create(name: str, o: Opts, ctx: Any) -> Any:
            posix = self._posix  # type: ignore[attr-defined]
            return posix.create(name, posix.options(root=o.root), ctx)

        register(StorageType(name="mirror", options=Opts, create=create))

    @hookimpl
    def register_catalogs(self, register: Any) -> None:
        class Opts(Options):
            file: str

        register(CatalogType(name="sqlite-at", options=Opts, create=lambda o, ctx: LocalCatalog(Path(o.file))))

    @hookimpl
    def transfer_started(self, transfer: Transfer) -> None:
        self.events.append(("transfer_started", transfer.dataset))

    @hookimpl
    def datablock_committed(self, transfer: Transfer, datablock: Datablock) -> None:
        self.events.append(("datablock_committed", datablock.archive_id))

    @hookimpl
    def datablock_verified(self, transfer: Transfer, datablock: Datablock) -> None:
        self.events.append(("datablock_verified", datablock.archive_id))

    @hookimpl
    def transfer_finished(self, transfer: Transfer) -> None:
        self.events.append(("transfer_finished", transfer.bytes_done))

    @hookimpl
    def transfer_failed(self, transfer: Transfer, error: BaseException) -> None:
        self.events.append(("transfer_failed", str(error)))


@pytest.fixture
def recorder_app(tmp_path: Path):
    pm, report = load_plugins()
    rec = Recorder()
    # The "mirror" storage type builds on the posix type another plugin registered.
    rec._posix = None  # type: ignore[attr-defined]
    pm.register(rec, name="recorder")
    app = App(make_settings(tmp_path, pipeline={"checksum": "crc32"}), pm, report)
    rec._posix = app.registry.storages["posix"]  # type: ignore[attr-defined]
    return app, rec


@pytest.mark.anyio
async def test_observer_hooks_see_a_transfer(recorder_app, tmp_path: Path) -> None:
    app, rec = recorder_app
    async with app:
        awkward_tree(tmp_path / "src")
        ds, src = await register_folder(app, tmp_path / "src")
        result = await archive_dataset(app, ds.pid, source=src)
        ids = [d.archive_id for d in result.datablocks]
        names = [e[0] for e in rec.events]
        assert names[0] == "transfer_started" and names[-1] == "transfer_finished"
        assert sorted(a for n, a in rec.events if n == "datablock_committed") == sorted(ids)
        assert sorted(a for n, a in rec.events if n == "datablock_verified") == sorted(ids)
        for archive_id in ids:  # each datablock is verified only after it was committed
            assert rec.events.index(("datablock_committed", archive_id)) < rec.events.index(
                ("datablock_verified", archive_id))
        assert rec.events[-1][1] == result.size
        # a failing transfer
        (tmp_path / "src/exec.sh").unlink()
        ds2, src2 = await register_folder(app, tmp_path / "src")
        (tmp_path / "src/empty.txt").unlink()
        with pytest.raises(MissingFileError):
            await archive_dataset(app, ds2.pid, source=src2)
        assert rec.events[-2][0] == "transfer_started" and rec.events[-1][0] == "transfer_failed"
        assert "'empty.txt' is missing" in rec.events[-1][1]


@pytest.mark.anyio
async def test_observer_hooks_see_a_verify_end_either_way(recorder_app, tmp_path: Path) -> None:
    """Damaged datablocks (a flipped byte, a tar gone) are reported in the result and to the
    observers; a storage's refusal ends the verify, and the observers hear of that too."""
    app, rec = recorder_app
    async with app:
        awkward_tree(tmp_path / "src")
        ds, src = await register_folder(app, tmp_path / "src")
        blocks = (await archive_dataset(app, ds.pid, source=src)).datablocks
        assert len(blocks) > 1
        rec.events.clear()
        assert not (await verify_dataset(app, ds.pid)).failed
        assert rec.events == [("transfer_started", ds.pid)] + [("datablock_verified", b.archive_id) for b in blocks] + [
            ("transfer_finished", sum(b.packed_size for b in blocks))]
        block = blocks[-1]
        victim = next(m for m in block.members if m.size > 100)
        tar = Path(app.settings.storages["lts"]["root"]) / block.archive_id
        data = bytearray(tar.read_bytes())
        data[victim.offset + victim.size // 2] ^= 0x01
        tar.write_bytes(bytes(data))
        rec.events.clear()
        result = await verify_dataset(app, ds.pid)
        assert list(result.failed) == [block.archive_id]
        assert rec.events[-1] == ("transfer_failed", result.failed[block.archive_id])
        # a tar gone is damage like any other: reported, and the other datablocks still checked
        tar.unlink()
        rec.events.clear()
        result = await verify_dataset(app, ds.pid)
        assert list(result.failed) == [block.archive_id] and "is missing" in result.failed[block.archive_id]
        assert len(result.ok) == len(blocks) - 1
        assert rec.events[-1] == ("transfer_failed", result.failed[block.archive_id])
        # a storage that refuses to read one (a symbolic link planted in the LTS) ends the verify
        first = Path(app.settings.storages["lts"]["root"]) / blocks[0].archive_id
        first.unlink()
        first.symlink_to(first.name)
        rec.events.clear()
        with pytest.raises(MoverdError) as caught:
            await verify_dataset(app, ds.pid)
        assert not isinstance(caught.value, VerificationError)
        assert "is a symlink (refused)" in str(caught.value) and blocks[0].archive_id in str(caught.value)
        ends = [e for e in rec.events if e[0] != "datablock_verified"]
        assert ends == [("transfer_started", ds.pid), ("transfer_failed", str(caught.value))]


@pytest.mark.anyio
async def test_registration_hooks_add_checksums_storages_and_catalogs(recorder_app, tmp_path: Path) -> None:
    app, _rec = recorder_app
    async with app:
        files = awkward_tree(tmp_path / "src")
        ds, src = await register_folder(app, tmp_path / "src")
        result = await archive_dataset(app, ds.pid, source=src)
        member = next(m for d in result.datablocks for m in d.members if m.path == "exec.sh")
        assert member.checksum == f"{zlib.crc32(files['exec.sh']):08x}"
        assert result.datablocks[0].checksum_alg == "crc32"
        mirror = app.registry.create_storage("mirror", "m", {"root": str(tmp_path / "src")}, app.context)
        assert sorted([i.key async for i in mirror.list("")]) == sorted(files)
        cat = app.registry.create_catalog("sqlite-at", {"file": str(tmp_path / "other.sqlite")}, app.context)
        await cat.check()
        await cat.aclose()
        assert (tmp_path / "other.sqlite").exists()


def test_a_broken_plugin_is_a_warning_naming_it(tmp_path: Path, monkeypatch, caplog) -> None:
    # A real installed distribution with a moverd.plugins entry point whose module fails on import.
    dist = tmp_path / "broken_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[moverd.plugins]\nbroken = broken_plugin_mod\n")
    (tmp_path / "broken_plugin_mod.py").write_text("raise RuntimeError('this plugin is broken on purpose')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    pm, report = load_plugins()
    assert "broken" in report.broken and "broken on purpose" in report.broken["broken"]
    assert "plugin 'broken'" in caplog.text
    assert not pm.has_plugin("broken")
    assert {"storage_lts", "storage_s3"} <= {p.name for p in describe_plugins(pm)}


def test_plugins_command_lists_versions_and_hooks() -> None:
    import subprocess

    out = subprocess.run([sys.executable, "-m", "moverd", "plugins", "--json"], capture_output=True, text=True,
                         check=True).stdout
    import json

    data = json.loads(out)
    by_name = {p["name"]: p for p in data["plugins"]}
    assert by_name["storage_lts"]["version"] == "0.1.0" and "register_storages" in by_name["storage_lts"]["hooks"]
    assert {"posix", "s3"} <= set(data["storages"]) and {"local", "scicat"} <= set(data["catalogs"])
    assert "md5" in data["checksums"]


def test_every_hook_is_documented_and_tested() -> None:
    """The meta-test: a new hook without a section in docs/plugins.md or a test here fails."""
    docs = (ROOT / "docs/plugins.md").read_text()
    me = Path(__file__).read_text()
    for name in HOOKS:
        assert re.search(rf"^###\s+`{name}`", docs, re.M), f"hook {name} has no section in docs/plugins.md"
        assert f"def {name}(" in me, f"hook {name} has no implementation exercised in tests/test_hooks.py"
    assert HOOKS, textwrap.dedent("no hooks found")


class SpaceWatcher:
    """An observer of free-space waits, as a monitoring plugin would write it."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, bool, int]] = []

    @hookimpl
    def storage_space_wait(
        self, storage: str, needed: int, free: int, min_free: int, waited: float, waiting: bool
    ) -> None:
        self.calls.append((storage, waiting, needed))


@pytest.mark.anyio
async def test_storage_space_wait_reaches_observers(small_fs: Path, tmp_path: Path) -> None:
    """A posix storage below its min_free tells the hook at once, and again when space appears."""
    import anyio

    pm, report = load_plugins()
    watcher = SpaceWatcher()
    pm.register(watcher, name="space-watcher")
    app = App(make_settings(tmp_path), pm, report)
    # The storage reports through the observers its App handed it (Context.observers).
    lts = app.local_folder(small_fs, "lts", min_free=700 * 1024, free_space_poll=0.05, free_space_timeout=10)
    (small_fs / "filler").write_bytes(b"x" * (500 * 1024))
    async with app, anyio.create_task_group() as tg:
        tg.start_soon(lts.wait_for_space, 100 * 1024)
        await anyio.sleep(0.2)
        assert watcher.calls == [("lts", True, 100 * 1024)]
        (small_fs / "filler").unlink()
        with anyio.fail_after(2):
            while len(watcher.calls) < 2:
                await anyio.sleep(0.05)
    assert watcher.calls[-1] == ("lts", False, 100 * 1024)


def test_every_hook_documents_its_parameters_as_its_spec_has_them() -> None:
    """The docs show each hook's call with the spec's parameters, the spec documents each one,
    and the core's typed caller (moverd.observers.Observers) has the same parameters."""
    from moverd.observers import Observers

    docs = (ROOT / "docs/plugins.md").read_text()
    for name in HOOKS:
        spec = getattr(hookspecs, name)
        params = list(inspect.signature(spec).parameters)
        section = re.search(rf"^###\s+`{name}`\s*\n+`{name}\(([^)]*)\)`", docs, re.M)
        assert section, f"docs/plugins.md: the section of {name} does not start with `{name}(...)`"
        assert [p.strip() for p in section.group(1).split(",") if p.strip()] == params, name
        doc = inspect.getdoc(spec) or ""
        for p in params:
            assert f":param {p}:" in doc, f"hookspec {name} does not document its parameter {p!r}"
        if name.startswith("register_"):
            continue
        method = getattr(Observers, name, None)
        assert method is not None, f"moverd.observers.Observers has no method for the observer hook {name}"
        assert list(inspect.signature(method).parameters)[1:] == params, name


def test_a_failing_observer_is_logged_and_a_misspelt_hook_fails(tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    from moverd.observers import Observers

    class Broken:
        @hookimpl
        def transfer_started(self, transfer: Transfer) -> None:
            raise RuntimeError("observer bug")

    pm, _ = load_plugins()
    pm.register(Broken(), name="broken-observer")
    observers = Observers(pm)
    observers.transfer_started(Transfer(kind="archive", dataset="x"))
    assert "observer hook transfer_started failed" in caplog.text and "observer bug" in caplog.text
    with pytest.raises(AttributeError):
        observers._call("datablock_comitted", transfer=None, datablock=None)


def test_tracing_plugins_writes_every_hook_call() -> None:
    import subprocess

    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("MOVERD_")}
    p = subprocess.run([sys.executable, "-m", "moverd", "plugins", "--json"], capture_output=True, text=True,
                       env={**env, "MOVERD_TRACE_PLUGINS": "1"}, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "register_storages" in p.stderr and "finish register_storages" in p.stderr


class RestoreWatcher:
    """An observer of restores and recalls, as a monitoring plugin would write it."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str, dict[str, int]]] = []

    @hookimpl
    def restore_changed(self, transfer: Transfer, storage: str, key: str, state: str) -> None:
        self.calls.append((storage, key, state, dict(transfer.restores)))


@pytest.mark.anyio
async def test_restore_changed_reaches_observers(tmp_path: Path) -> None:
    """An HSM recall (the posix storage's recall command) is told as a restore, with its counts."""
    import os

    from moverd.restores import restore_datablocks

    pm, report = load_plugins()
    watcher = RestoreWatcher()
    pm.register(watcher, name="restore-watcher")
    app = App(make_settings(tmp_path), pm, report)
    root = tmp_path / "hsm"
    root.mkdir()
    with open(root / "block.tar", "wb") as f:
        os.truncate(f.fileno(), 4096)  # offline: the full size, no block on disk
    if (root / "block.tar").stat().st_blocks:
        pytest.skip("this file system allocates blocks for sparse files: cannot fake an offline file")
    lts = app.local_folder(root, "lts", recall_command=["sh", "-c", 'printf data > "$0"', "{path}"],
                           offline_poll=0.05, offline_timeout=5)
    transfer = Transfer(kind="retrieve", dataset="p")
    async with app:
        await restore_datablocks(app, lts, ["block.tar"], transfer)
    assert [c[2] for c in watcher.calls] == ["requested", "available"]
    assert watcher.calls[0][:2] == ("lts", "block.tar")
    assert watcher.calls[-1][3] == {"requested": 0, "in_progress": 0, "available": 1}


def test_the_plugins_setting_gives_every_layer_the_same_registry(tmp_path: Path) -> None:
    """``plugins = [...]`` loads a module as a plugin for the daemon and the commands
    (``build_app``) and for a flow run on a worker that was handed no App (its own ``App``)."""
    from moverd_flows.jobs import _load

    from moverd.config import load_settings
    from moverd.errors import ConfigError
    from moverd_daemon.installation import build_app
    from moverd_daemon.settings import DaemonSettings

    config = tmp_path / "moverd.toml"
    config.write_text(f'state_dir = "{tmp_path / "state"}"\nplugins = ["tests.support.ltswatch"]\n')
    for app in (build_app(load_settings(config, DaemonSettings)), _load(str(config))):
        assert app.pm.has_plugin("tests.support.ltswatch")
        assert app.registry.storages["watched-posix"].plugin == "tests.support.ltswatch"
    config.write_text(f'state_dir = "{tmp_path / "state"}"\nplugins = ["no_such_module_here"]\n')
    with pytest.raises(ConfigError, match="plugins: cannot load 'no_such_module_here': ModuleNotFoundError"):
        _load(str(config))
    config.write_text(f'state_dir = "{tmp_path / "state"}"\n[server]\nplugins = ["tests.support.ltswatch"]\n')
    with pytest.raises(ConfigError, match="plugins is a top-level setting now"):
        load_settings(config, DaemonSettings)
