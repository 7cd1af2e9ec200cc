"""The App of an installation, built once, the same way for the daemon and every command.

Its plugin manager is the installed plugins plus the ``plugins`` setting: modules to load as
plugins without packaging them (a site's own observer, a storage wrapper). With ``prefect.global_limits``
its LTS sections also hold the Prefect global concurrency limits, which the Prefect layer
provides. ``moverd serve``, ``moverd archive`` and ``config check`` therefore see one registry.
"""

from __future__ import annotations

from collections.abc import Sequence

import pluggy

from moverd.app import App
from moverd.plugins import LoadReport, load_plugins

from .settings import DaemonSettings


def plugin_manager(settings: DaemonSettings) -> tuple[pluggy.PluginManager, LoadReport]:
    return load_plugins(modules=settings.plugins)


def build_app(settings: DaemonSettings, *, observers: Sequence[object] = ()) -> App:
    """The App for ``settings``: every plugin (and ``observers``, registered as plugins too) and,
    with ``prefect.global_limits``, the cross-host LTS limits and locks."""
    pm, report = plugin_manager(settings)
    for plugin in observers:
        pm.register(plugin)
    if not settings.prefect.global_limits:
        return App(settings, pm, report)
    # Imported only then: Prefect costs a second of start-up that most commands never need.
    from moverd_flows.limits import global_locks, global_slots

    return App(settings, pm, report, global_slots=global_slots(settings), global_locks=global_locks(settings))
