"""The running moverd: configuration, plugins, storages, catalog and buffers in one place.

Services, the CLI, the daemon and the Prefect flows all work through an :class:`App`; it creates
storages and the catalog lazily from the configuration, through the plugin registry.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import anyio
import pluggy

from .buffers import SlabPool
from .catalog import Catalog
from .config import Settings, load_settings
from .configcheck import settings_problems
from .errors import ConfigError, ServiceError
from .limits import Slots
from .observers import Observers
from .pipeline import PipelineContext
from .plugins import LoadReport, load_plugins
from .registry import Context, Registry
from .storage import LOCAL_STORAGE_TYPE, Storage, read_slot, write_slot

log = logging.getLogger(__name__)


GlobalSlots = Callable[[str], contextlib.AbstractAsyncContextManager[Any]]
"""Given ``<storage>-read``/``<storage>-write``, a bound held across every process and host (the
Prefect layer's global concurrency limits)."""
GlobalLocks = Callable[[str, float], contextlib.AbstractAsyncContextManager[Any]]
"""Given a name and how long to wait at most, a lock held across every process and host (raises
``TimeoutError`` when the wait runs out)."""


class App:
    """Built once from its settings with everything it needs; nothing patches it afterwards."""

    def __init__(
        self, settings: Settings, pm: pluggy.PluginManager | None = None, report: LoadReport | None = None, *,
        global_slots: GlobalSlots | None = None, global_locks: GlobalLocks | None = None,
    ) -> None:
        if pm is None:
            pm, report = load_plugins(modules=settings.plugins)
        self.settings = settings
        self.pm = pm
        self.load_report = report or LoadReport()
        self.registry = Registry.from_plugins(pm)
        self.observers = Observers(pm)
        """The observer hooks, typed (``app.observers.datablock_committed(...)``)."""
        self.context = Context(state_dir=settings.state_dir, observers=self.observers)
        if problems := settings_problems(settings, self.registry):
            raise ConfigError("\n".join(problems))
        p = settings.pipeline
        self.pool = SlabPool(p.chunk_size, p.buffer_budget)
        self.pipeline = PipelineContext(
            pool=self.pool, hasher=self.registry.hasher, checksum=p.checksum, prefetch_files=p.prefetch_files,
            prefetch_bytes=p.prefetch_bytes,
        )
        self._storages: dict[str, Storage] = {}
        self._adhoc: list[Storage] = []
        self._catalog: Catalog | None = None
        self._locks: dict[str, anyio.Lock] = {}
        self.global_slots = global_slots
        """Limits named ``<storage>-read``/``<storage>-write`` that hold across every process and
        host sharing the Prefect server (None: this process's semaphores are the bound)."""
        self.global_locks = global_locks
        """Locks that hold across processes and hosts (one retrieval of a dataset at a time);
        None: only this process's."""

    @classmethod
    def load(cls, config: str | Path | None = None) -> App:
        return cls(load_settings(config))

    def storage(self, name: str) -> Storage:
        """The configured storage ``name`` (``landing``, ``lts``, ``retrieval`` or another)."""
        if name not in self._storages:
            if name not in self.settings.storages:
                raise ConfigError(
                    f"no storage named {name!r} is configured; configured: {', '.join(sorted(self.settings.storages))}"
                )
            type_name, options = self.settings.storage_options(name)
            self._storages[name] = self.registry.create_storage(type_name, name, options, self.context)
        return self._storages[name]

    def local_folder(self, path: Path, name: str, *, create: bool = False, **options: Any) -> Storage:
        """A storage over a local folder (the folder ``moverd archive`` reads, ``retrieve --to``)."""
        storage = self.registry.create_storage(
            LOCAL_STORAGE_TYPE, name, {"root": str(path), "create": create, **options}, self.context
        )
        self._adhoc.append(storage)
        return storage

    @property
    def catalog(self) -> Catalog:
        if self._catalog is None:
            type_name, options = self.settings.catalog_options()
            self._catalog = self.registry.create_catalog(type_name, options, self.context)
        return self._catalog

    def bounded_slots(self) -> list[tuple[str, Literal["read", "write"], Slots]]:
        """(storage name, kind, semaphore) of every configured storage with LTS-style bounds:
        what metrics report and what the Prefect global limits are named after."""
        out: list[tuple[str, Literal["read", "write"], Slots]] = []
        for name in sorted(self.settings.storages):
            try:
                storage = self.storage(name)
            except Exception:
                continue
            if storage.write_slots is not None:
                out.append((name, "write", storage.write_slots))
            if storage.read_slots is not None:
                out.append((name, "read", storage.read_slots))
        return out

    @contextlib.asynccontextmanager
    async def slot(self, storage: Storage, kind: Literal["read", "write"]) -> AsyncIterator[None]:
        """Hold the storage's own read/write semaphore and, with a Prefect server, the global one."""
        local = read_slot(storage) if kind == "read" else write_slot(storage)
        async with local:
            has_limit = (storage.read_slots if kind == "read" else storage.write_slots) is not None
            if self.global_slots is not None and has_limit:
                async with self.global_slots(f"{storage.name}-{kind}"):
                    yield
            else:
                yield

    @contextlib.asynccontextmanager
    async def retrieval_lock(self, pid: str) -> AsyncIterator[None]:
        """One retrieval of a dataset at a time, in this process and, with global locks, across
        every daemon: a second job for the same dataset waits (at most ``retrieve.wait_timeout``
        in all) and then reuses the first one's copy."""
        async with self.cross_host_lock(f"retrieve {pid}", f"retrieval of {pid!r}",
                                        wait=self.settings.retrieve.wait_timeout):
            yield

    @contextlib.asynccontextmanager
    async def cross_host_lock(self, name: str, what: str, *, wait: float) -> AsyncIterator[None]:
        """The lock ``name``, held in this process and, with global locks, across every daemon;
        :class:`~moverd.ServiceError` naming ``what`` after ``wait`` seconds of waiting."""
        timeout = wait
        lock = self._locks.setdefault(name, anyio.Lock())
        deadline = anyio.current_time() + timeout
        with anyio.move_on_after(timeout) as scope:
            await lock.acquire()
        if scope.cancelled_caught:
            raise ServiceError(f"waited {timeout:.0f} s for another {what} to finish")
        try:
            async with contextlib.AsyncExitStack() as held:
                if self.global_locks is not None:
                    left = max(0.0, deadline - anyio.current_time())
                    try:
                        await held.enter_async_context(self.global_locks(name, left))
                    except TimeoutError:
                        raise ServiceError(f"waited {timeout:.0f} s for another daemon's {what} to finish") from None
                yield
        finally:
            lock.release()
            if not lock.locked() and lock.statistics().tasks_waiting == 0:
                # One lock per name would pile up (a restore's is per datablock): nobody holds
                # this one (a waiter it was handed to would) or waits for it.
                self._locks.pop(name, None)

    async def aclose(self) -> None:
        for storage in [*self._storages.values(), *self._adhoc]:
            try:
                await storage.aclose()
            except Exception:
                log.exception("closing storage %s failed", storage.name)
        self._storages.clear()
        self._adhoc.clear()
        if self._catalog is not None:
            await self._catalog.aclose()
            self._catalog = None

    async def __aenter__(self) -> App:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()
