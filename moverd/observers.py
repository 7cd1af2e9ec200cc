"""Typed calls of the observer hooks, each through ``pm.hook`` and each fault-isolated.

An observer (metrics, a notification plugin) must never fail a transfer: its exception is logged
with the hook's name and the transfer goes on. A hook name is a method here, not a string, so a
typo fails at once (mypy, and ``AttributeError`` at run time); ``tests/test_hooks.py`` checks
that every observer hookspec has a method with the same parameters.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from .events import Transfer
    from .models import Datablock

log = logging.getLogger(__name__)


class Observers:
    """The observer hooks of one plugin manager."""

    def __init__(self, pm: pluggy.PluginManager) -> None:
        self._hook = pm.hook

    def _call(self, name: str, **kwargs: Any) -> None:
        caller = getattr(self._hook, name)  # outside the try: a hook that does not exist raises
        try:
            caller(**kwargs)
        except Exception:
            log.exception("observer hook %s failed", name)

    def transfer_started(self, transfer: Transfer) -> None:
        self._call("transfer_started", transfer=transfer)

    def datablock_committed(self, transfer: Transfer, datablock: Datablock) -> None:
        self._call("datablock_committed", transfer=transfer, datablock=datablock)

    def datablock_verified(self, transfer: Transfer, datablock: Datablock) -> None:
        self._call("datablock_verified", transfer=transfer, datablock=datablock)

    def transfer_finished(self, transfer: Transfer) -> None:
        self._call("transfer_finished", transfer=transfer)

    def transfer_failed(self, transfer: Transfer, error: BaseException) -> None:
        self._call("transfer_failed", transfer=transfer, error=error)

    def restore_changed(self, transfer: Transfer, storage: str, key: str, state: str) -> None:
        self._call("restore_changed", transfer=transfer, storage=storage, key=key, state=state)

    def storage_space_wait(
        self, storage: str, needed: int, free: int, min_free: int, waited: float, waiting: bool
    ) -> None:
        self._call("storage_space_wait", storage=storage, needed=needed, free=free, min_free=min_free,
                   waited=waited, waiting=waiting)
