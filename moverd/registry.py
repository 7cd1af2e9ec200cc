"""What plugins registered: storage types, catalog types, checksum algorithms.

The registry is filled once from the registration hooks and is the only way the core turns a
type name from the configuration into an object, so the core never imports a plugin.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pluggy
from pydantic import BaseModel, ValidationError

from .errors import ConfigError, PluginError

if TYPE_CHECKING:
    from .catalog import Catalog
    from .checksums import Hasher, HasherFactory
    from .observers import Observers
    from .storage import Storage


@dataclass(frozen=True)
class Context:
    """What a plugin may need from moverd besides its own options."""

    state_dir: Path
    observers: Observers | None = None
    """The observer hooks, for a plugin that has something to report (a storage waiting for free
    space calls ``observers.storage_space_wait``); None outside an App."""


@dataclass(frozen=True)
class StorageType:
    name: str
    options: type[BaseModel]
    create: Callable[[str, Any, Context], Storage]
    """``create(instance_name, validated_options, context)``."""
    description: str = ""
    plugin: str = ""
    url_scheme: str = ""
    """Optional: a URL scheme (``s3``) by which the command line names this type's locations,
    ``<scheme>://<bucket>/<prefix>``. The type's options then have ``bucket`` and may have a
    ``prefix``: a URL names the configured storage whose bucket and prefix it lies in."""


@dataclass(frozen=True)
class CatalogType:
    name: str
    options: type[BaseModel]
    create: Callable[[Any, Context], Catalog]
    description: str = ""
    plugin: str = ""


def format_validation_error(prefix: str, exc: ValidationError, model: type[BaseModel] | None = None) -> list[str]:
    """One line per problem, each naming the full key (``storages.lts.root: ...``).

    With ``model`` (the class that was validated), an unknown key gets the nearest known one
    ("did you mean 'write_limit'?"); a value that came from the environment names the variable.
    """
    lines = []
    for err in exc.errors():
        parts = [str(p) for p in (*prefix.split("."), *err["loc"]) if p != ""]
        loc = ".".join(parts)
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
            known = _fields_at(model, [str(p) for p in err["loc"][:-1]]) if model is not None else []
            if near := difflib.get_close_matches(str(err["loc"][-1]), known, n=1, cutoff=0.6):
                msg += f"; did you mean {near[0]!r}?"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        if var := _env_var(parts):
            msg += f" (from the environment variable {var})"
        lines.append(f"{loc}: {msg}" if loc else msg)
    return lines


def _fields_at(model: type[BaseModel], path: list[str]) -> list[str]:
    """The keys a section accepts: the fields of the model found by following ``path``."""
    for part in path:
        field = model.model_fields.get(part)
        annotation = field.annotation if field is not None else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def _env_var(parts: list[str]) -> str | None:
    """The ``MOVERD_*`` variable that sets the key at ``parts``, if one is set."""
    if not parts:
        return None
    wanted = "MOVERD_" + "__".join(parts).upper()
    return next((k for k in os.environ if k.upper() == wanted), None)


@dataclass
class Registry:
    storages: dict[str, StorageType] = field(default_factory=dict)
    catalogs: dict[str, CatalogType] = field(default_factory=dict)
    checksums: dict[str, HasherFactory] = field(default_factory=dict)

    @classmethod
    def from_plugins(cls, pm: pluggy.PluginManager) -> Registry:
        """Call the registration hooks plugin by plugin, in the order they were registered (so the
        built-ins come first and keep their names), each through pluggy, so that tracing shows
        every call: a one-plugin subset of the hook knows whose registration it receives."""
        reg = cls()
        plugins = pm.list_name_plugin()
        adders: dict[str, Callable[..., None]] = {
            "register_storages": reg._add_storage,
            "register_catalogs": reg._add_catalog,
            "register_checksums": reg._add_checksum,
        }
        for name, plugin in plugins:
            others = [p for _, p in plugins if p is not plugin]
            for hook, add in adders.items():
                caller = pm.subset_hook_caller(hook, remove_plugins=others)
                caller(register=lambda item, *rest, _p=name, _a=add: _a(_p, item, *rest))
        return reg

    def _add_storage(self, plugin: str, st: StorageType) -> None:
        self.storages.setdefault(st.name, StorageType(**{**st.__dict__, "plugin": plugin}))

    def _add_catalog(self, plugin: str, ct: CatalogType) -> None:
        self.catalogs.setdefault(ct.name, CatalogType(**{**ct.__dict__, "plugin": plugin}))

    def _add_checksum(self, plugin: str, name: str, factory: HasherFactory) -> None:
        self.checksums.setdefault(name, factory)

    def hasher(self, name: str) -> Hasher:
        try:
            return self.checksums[name]()
        except KeyError:
            raise PluginError(
                f"unknown checksum algorithm {name!r}; known: {', '.join(sorted(self.checksums))}"
            ) from None

    def storage_options(self, type_name: str, options: dict[str, Any], where: str) -> BaseModel:
        st = self._storage_type(type_name, where)
        try:
            return st.options.model_validate(options)
        except ValidationError as exc:
            raise ConfigError("\n".join(format_validation_error(where, exc, st.options))) from None

    def create_storage(self, type_name: str, name: str, options: dict[str, Any], ctx: Context) -> Storage:
        st = self._storage_type(type_name, f"storages.{name}")
        opts = self.storage_options(type_name, options, f"storages.{name}")
        storage = st.create(name, opts, ctx)
        storage.name = name
        storage.type_name = type_name
        return storage

    def catalog_options(self, type_name: str, options: dict[str, Any]) -> BaseModel:
        try:
            ct = self.catalogs[type_name]
        except KeyError:
            raise ConfigError(
                f"catalog.type: unknown catalog type {type_name!r}; "
                f"known: {', '.join(sorted(self.catalogs)) or 'none'}"
            ) from None
        try:
            return ct.options.model_validate(options)
        except ValidationError as exc:
            raise ConfigError("\n".join(format_validation_error("catalog", exc, ct.options))) from None

    def create_catalog(self, type_name: str, options: dict[str, Any], ctx: Context) -> Catalog:
        opts = self.catalog_options(type_name, options)
        catalog = self.catalogs[type_name].create(opts, ctx)
        catalog.type_name = type_name
        return catalog

    def _storage_type(self, type_name: str, where: str) -> StorageType:
        try:
            return self.storages[type_name]
        except KeyError:
            raise ConfigError(
                f"{where}.type: unknown storage type {type_name!r}; "
                f"known: {', '.join(sorted(self.storages)) or 'none (are the plugins installed?)'}"
            ) from None
