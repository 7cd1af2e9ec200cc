"""The running moverd: configuration, plugins, storages, catalog and buffers in one place.

Services, the CLI, the daemon and the Prefect flows all work through an :class:`App`; it creates
storages and the catalog lazily from the configuration, through the plugin registry.
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import TracebackType
from typing import Any

import pluggy

from .buffers import SlabPool
from .catalog import Catalog
from .config import Settings, load_settings
from .errors import ConfigError
from .pipeline import PipelineContext
from .plugins import LoadReport, load_plugins
from .registry import Context, Registry
from .storage import Storage

log = logging.getLogger(__name__)


class App:
    def __init__(
        self, settings: Settings, pm: pluggy.PluginManager | None = None, report: LoadReport | None = None
    ) -> None:
        if pm is None:
            pm, report = load_plugins()
        self.settings = settings
        self.pm = pm
        self.load_report = report or LoadReport()
        self.registry = Registry.from_plugins(pm)
        self.context = Context(state_dir=settings.state_dir)
        p = settings.pipeline
        self.registry.hasher(p.checksum)  # fail early on an unknown algorithm
        self.pool = SlabPool(p.chunk_size, p.buffer_budget)
        self.pipeline = PipelineContext(
            pool=self.pool, hasher=self.registry.hasher, checksum=p.checksum, prefetch_files=p.prefetch_files
        )
        self._storages: dict[str, Storage] = {}
        self._adhoc: list[Storage] = []
        self._catalog: Catalog | None = None

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
            "posix", name, {"root": str(path), "create": create, **options}, self.context
        )
        self._adhoc.append(storage)
        return storage

    @property
    def catalog(self) -> Catalog:
        if self._catalog is None:
            type_name, options = self.settings.catalog_options()
            self._catalog = self.registry.create_catalog(type_name, options, self.context)
        return self._catalog

    def notify(self, hook: str, **kwargs: Any) -> None:
        """Call an observer hook; an observer's failure is logged, never fatal to a transfer."""
        try:
            getattr(self.pm.hook, hook)(**kwargs)
        except Exception:  # noqa: BLE001
            log.exception("observer hook %s failed", hook)

    async def aclose(self) -> None:
        for storage in [*self._storages.values(), *self._adhoc]:
            try:
                await storage.aclose()
            except Exception:  # noqa: BLE001
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
