"""``moverd config check`` and ``config show``: every problem at once, secrets never shown."""

from __future__ import annotations

import functools
import json
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import pluggy
from pydantic import ValidationError
from pydantic_settings import SettingsError

from .config import Settings, config_path, load_settings, read_toml
from .errors import ConfigError
from .plugins import LoadReport, load_plugins
from .registry import Registry

if TYPE_CHECKING:
    from .app import App


PluginManagerFor = Callable[[Any], tuple[pluggy.PluginManager, LoadReport]]


def check_config(
    path: str | Path | None, cls: type[Settings] = Settings, plugins: PluginManagerFor | None = None
) -> tuple[list[str], str]:
    """All problems of the configuration read as ``cls`` (empty when fine) and a word on where
    it came from; ``plugins(settings)`` gives the plugin manager the installation runs with (so
    that the check sees the same registry), else the installed plugins."""
    file = config_path(path)
    where = str(file) if file else "embedded default"
    problems: list[str] = []
    loaded = True
    try:
        settings: Settings | None = load_settings(path, cls)
    except ConfigError as exc:
        # Go on with the sections the plugins own, so that one run finds every problem.
        problems.extend(str(exc).splitlines())
        settings = _plugin_sections(file)
        loaded = False
    pm, report = load_plugins()
    if plugins is not None and loaded:
        try:
            pm, report = plugins(settings)
        except ConfigError as exc:
            problems.extend(str(exc).splitlines())
    problems += [f"plugin {name!r} is broken: {why}" for name, why in report.broken.items()]
    if settings is not None:
        problems += settings_problems(settings, Registry.from_plugins(pm))
    return problems, where


def _plugin_sections(file: Path | None) -> Settings | None:
    """Settings of only the storages and the catalog (and where state lives) when the rest is
    broken; None when those are broken too (their problems are reported already)."""
    try:
        data = read_toml(file) if file else {}
    except ConfigError:
        return None
    sections = {k: data[k] for k in ("state_dir", "storages", "catalog") if k in data}
    # With the environment's overrides if they parse; else without (their problems are reported).
    for prefix in ("MOVERD_", "MOVERD_IGNORED_WHILE_CHECKING_"):
        try:
            return Settings(**sections, _env_prefix=prefix)
        except (ValidationError, SettingsError):
            continue
    return None


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


async def connect_checks(app: App) -> list[tuple[str, str | None]]:
    """Reach every remote part the configuration names: ``(what, None)`` when it answered as it
    must, ``(what, error)`` when not. Storages are listed and written to (a probe object, deleted
    again), the catalog logs in, and Prefect's API answers its health check."""
    out: list[tuple[str, str | None]] = []

    async def probe(what: str, check: Callable[[], Awaitable[None]]) -> None:
        try:
            with anyio.fail_after(60):
                await check()
        except TimeoutError:
            out.append((what, "no answer within 60 s"))
        except Exception as exc:
            out.append((what, f"{type(exc).__name__}: {exc}" if not str(exc) else str(exc)))
        else:
            out.append((what, None))

    catalog_type = app.settings.catalog_options()[0]
    await probe(f"catalog ({catalog_type}): reachable, logged in", lambda: app.catalog.check())
    for name in sorted(app.settings.storages):
        await probe(f"storage {name} ({app.settings.storage_options(name)[0]}): listed, writable",
                    functools.partial(_probe_storage, app, name))
    url = os.environ.get("PREFECT_API_URL")
    if url:
        await probe(f"Prefect API {url}: healthy", functools.partial(_probe_prefect, url))
    else:
        out.append(("Prefect: no PREFECT_API_URL; each job run starts a temporary local server", None))
    return out


async def _probe_storage(app: App, name: str) -> None:
    storage = app.storage(name)
    async for _ in storage.list(""):
        break
    key = f".moverd-check-{socket.gethostname()}-{os.getpid()}"
    await storage.put(key, b"written by moverd config check --connect\n")
    await storage.delete(key)


async def _probe_prefect(url: str) -> None:
    import httpx

    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.get(url.rstrip("/") + "/health")
    if response.status_code != 200:
        raise ConfigError(f"GET /health answered {response.status_code}")


def effective_config(path: str | Path | None, cls: type[Settings] = Settings, *, as_toml: bool = False) -> str:
    """The configuration read as ``cls``, as JSON (or TOML), with every secret masked."""
    settings = load_settings(path, cls)
    reg = Registry.from_plugins(load_plugins()[0])
    data: dict[str, Any] = settings.model_dump(mode="json", exclude={"storages", "catalog"})
    data["storages"] = {}
    for name in sorted(settings.storages):
        type_name, options = settings.storage_options(name)
        opts = reg.storage_options(type_name, options, f"storages.{name}")
        data["storages"][name] = {"type": type_name, **opts.model_dump(mode="json")}
    type_name, options = settings.catalog_options()
    data["catalog"] = {"type": type_name, **reg.catalog_options(type_name, options).model_dump(mode="json")}
    if as_toml:
        import tomli_w

        return tomli_w.dumps(_without_none(data)).rstrip("\n")
    return json.dumps(data, indent=2, sort_keys=True)


def _without_none(data: dict[str, Any]) -> dict[str, Any]:
    """TOML has no null: a key left out means its default, which is what None stands for here."""
    return {k: _without_none(v) if isinstance(v, dict) else v for k, v in sorted(data.items()) if v is not None}
