"""The plugin manager: built-in defaults first, then every ``moverd.plugins`` entry point.

A plugin that fails to import or to register is reported with its name and skipped, so one broken
third-party package cannot take the daemon down. ``MOVERD_DISABLE_PLUGINS`` (comma-separated entry
point names) skips plugins without uninstalling them; ``MOVERD_TRACE_PLUGINS=1`` writes every
hook call, with its arguments and results, to stderr (pluggy's tracing, as datasette's
``DATASETTE_TRACE_PLUGINS``).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

import pluggy

from . import hookspecs
from .errors import ConfigError

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "moverd.plugins"

DEFAULT_PLUGINS = (
    "moverd.builtin.checksums",
    "moverd.builtin.local_catalog",
)


@dataclass
class PluginInfo:
    name: str
    version: str | None
    hooks: list[str]
    builtin: bool


@dataclass
class LoadReport:
    broken: dict[str, str] = field(default_factory=dict)
    """Entry point name → one line saying why it was not loaded."""


def _new_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager("moverd")
    pm.add_hookspecs(hookspecs)
    if os.environ.get("MOVERD_TRACE_PLUGINS", "").strip() not in ("", "0"):
        pm.trace.root.setwriter(lambda text: sys.stderr.write(text))
        pm.enable_tracing()
    return pm


def load_plugins(
    *, entry_points: bool = True, modules: Sequence[str] = ()
) -> tuple[pluggy.PluginManager, LoadReport]:
    """Build a plugin manager with the defaults, (unless disabled) the installed plugins, and
    ``modules`` (the ``plugins`` setting). An installed plugin that fails to load is reported and
    left out; a module the configuration names is a configuration error."""
    pm = _new_manager()
    report = LoadReport()
    for modname in DEFAULT_PLUGINS:
        pm.register(importlib.import_module(modname), name=modname)
    if entry_points:
        _load_entry_points(pm, report)
    for name in modules:
        if pm.has_plugin(name):
            continue
        try:
            pm.register(importlib.import_module(name), name=name)
            pm.check_pending()
        except Exception as exc:
            raise ConfigError(f"plugins: cannot load {name!r}: {type(exc).__name__}: {exc}") from None
    return pm, report


def _load_entry_points(pm: pluggy.PluginManager, report: LoadReport) -> None:
    disabled = {s.strip() for s in os.environ.get("MOVERD_DISABLE_PLUGINS", "").split(",") if s.strip()}
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in disabled or pm.has_plugin(ep.name):
            continue
        try:
            plugin = ep.load()
            pm.register(plugin, name=ep.name)
            pm.check_pending()
        except Exception as exc:
            if pm.has_plugin(ep.name):
                pm.unregister(name=ep.name)
            why = f"{type(exc).__name__}: {exc}"
            report.broken[ep.name] = why
            log.warning("plugin %r (%s) was not loaded: %s", ep.name, ep.value, why)
            continue
        dist = ep.dist
        if dist is not None:
            _versions[ep.name] = dist.version


_versions: dict[str, str] = {}


def describe_plugins(pm: pluggy.PluginManager) -> list[PluginInfo]:
    """What ``moverd plugins`` prints: each plugin, its version and the hooks it implements."""
    from . import __version__

    out = []
    for name, plugin in pm.list_name_plugin():
        hooks = sorted(h.name for h in pm.get_hookcallers(plugin) or [])
        builtin = name in DEFAULT_PLUGINS
        version = __version__ if builtin else _versions.get(name)
        out.append(PluginInfo(name=name, version=version, hooks=hooks, builtin=builtin))
    return sorted(out, key=lambda p: (not p.builtin, p.name))
