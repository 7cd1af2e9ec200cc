"""``moverd config check`` and ``config show``: every problem at once, secrets never shown."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .config import Settings, config_path, load_settings
from .errors import ConfigError
from .plugins import load_plugins
from .registry import Registry


def check_config(path: str | Path | None) -> tuple[list[str], str]:
    """All problems of the configuration (empty when fine) and a word on where it came from."""
    file = config_path(path)
    where = str(file) if file else "embedded default"
    try:
        settings = load_settings(path)
    except ConfigError as exc:
        return str(exc).splitlines(), where
    pm, report = load_plugins()
    problems = [f"plugin {name!r} is broken: {why}" for name, why in report.broken.items()]
    return problems + settings_problems(settings, Registry.from_plugins(pm)), where


def settings_problems(settings: Settings, reg: Registry) -> list[str]:
    """What the plugins find wrong in the sections they own (storages, catalog, checksum).

    :class:`~moverd.app.App` refuses to start on any of them, so that a typo in a storage is
    reported before anything is registered or written, not when that storage is first used.
    """
    problems: list[str] = []
    for name in sorted(settings.storages):
        type_name, options = settings.storage_options(name)
        try:
            reg.storage_options(type_name, options, f"storages.{name}")
        except ConfigError as exc:
            problems.extend(str(exc).splitlines())
    try:
        reg.catalog_options(*settings.catalog_options())
    except ConfigError as exc:
        problems.extend(str(exc).splitlines())
    if settings.pipeline.checksum not in reg.checksums:
        problems.append(
            f"pipeline.checksum: unknown algorithm {settings.pipeline.checksum!r}; "
            f"known: {', '.join(sorted(reg.checksums))}"
        )
    return problems


def effective_config(path: str | Path | None) -> str:
    """The configuration as moverd sees it, as JSON, with every secret masked."""
    settings = load_settings(path)
    reg = Registry.from_plugins(load_plugins()[0])
    data: dict[str, Any] = settings.model_dump(mode="json", exclude={"storages", "catalog"})
    data["storages"] = {}
    for name in sorted(settings.storages):
        type_name, options = settings.storage_options(name)
        opts = reg.storage_options(type_name, options, f"storages.{name}")
        data["storages"][name] = {"type": type_name, **opts.model_dump(mode="json")}
    type_name, options = settings.catalog_options()
    data["catalog"] = {"type": type_name, **reg.catalog_options(type_name, options).model_dump(mode="json")}
    return json.dumps(data, indent=2, sort_keys=True)
