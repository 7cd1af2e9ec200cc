"""The plugin manager of an installation: the installed plugins plus ``server.plugins``.

``server.plugins`` names modules to load as plugins without packaging them (a site's own observer,
a storage wrapper). The daemon and ``moverd prefect setup`` both load them, so that both see the
same storage types.
"""

from __future__ import annotations

import importlib

import pluggy

from ..config import Settings
from ..errors import ConfigError
from ..plugins import LoadReport, load_plugins


def plugin_manager(settings: Settings) -> tuple[pluggy.PluginManager, LoadReport]:
    pm, report = load_plugins()
    for name in settings.server.plugins:
        if pm.has_plugin(name):
            continue
        try:
            pm.register(importlib.import_module(name), name=name)
            pm.check_pending()
        except Exception as exc:
            raise ConfigError(f"server.plugins: cannot load {name!r}: {type(exc).__name__}: {exc}") from None
    return pm, report
