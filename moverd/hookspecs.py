"""The hooks moverd's plugins implement (pluggy project name ``moverd``).

Two kinds, as in datasette and llm: *registration* hooks are called once when the plugin manager
starts and hand the plugin a ``register`` callback; *observer* hooks are called as transfers
happen, for metrics and notifications, and their return values are ignored. The built-in parts
(local catalog, checksum algorithms, the metrics observer) use these same hooks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from .checksums import HasherFactory
    from .events import Transfer
    from .models import Datablock
    from .registry import CatalogType, StorageType

hookspec = pluggy.HookspecMarker("moverd")
hookimpl = pluggy.HookimplMarker("moverd")


@hookspec
def register_storages(register: Callable[[StorageType], None]) -> None:
    """Register storage types (``register(StorageType(name=..., options=..., create=...))``)."""


@hookspec
def register_catalogs(register: Callable[[CatalogType], None]) -> None:
    """Register catalog types (``register(CatalogType(name=..., options=..., create=...))``)."""


@hookspec
def register_checksums(register: Callable[[str, HasherFactory], None]) -> None:
    """Register checksum algorithms by name (``register("sha256", hashlib.sha256)``)."""


@hookspec
def transfer_started(transfer: Transfer) -> None:
    """An archive, retrieve or verify of one dataset began."""


@hookspec
def datablock_committed(transfer: Transfer, datablock: Datablock) -> None:
    """A datablock was written and published atomically on the sink (not yet verified)."""


@hookspec
def datablock_verified(transfer: Transfer, datablock: Datablock) -> None:
    """A datablock was read back from the sink, bypassing caches, and matched."""


@hookspec
def transfer_finished(transfer: Transfer) -> None:
    """The transfer completed; ``transfer.bytes_done`` is final."""


@hookspec
def transfer_failed(transfer: Transfer, error: BaseException) -> None:
    """The transfer failed with ``error``; nothing it wrote is counted as archived."""


@hookspec
def storage_space_wait(storage: str, needed: int, free: int, min_free: int, waited: float, waiting: bool) -> None:
    """A write to ``storage`` started (``waiting``) or stopped waiting for free space: it needs
    ``needed`` bytes and ``min_free`` to stay free, ``free`` are free for it (less what open
    writers announced); ``waited`` seconds so far. Called at once, so that a full share shows."""


__all__ = ["Any", "hookimpl", "hookspec"]
