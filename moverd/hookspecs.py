"""The hooks moverd's plugins implement (pluggy project name ``moverd``).

Two kinds, as in datasette and llm: *registration* hooks are called once when the plugin manager
starts and hand the plugin a ``register`` callback; *observer* hooks are called as transfers
happen, for metrics and notifications, and their return values are ignored. The built-in parts
(local catalog, checksum algorithms, the metrics observer) use these same hooks.

moverd calls every hook through ``pm.hook.<name>``, so pluggy's tracing shows each call
(``MOVERD_TRACE_PLUGINS=1``). The core calls observer hooks through
:class:`moverd.observers.Observers`, whose methods have these names and parameters: a misspelt
hook is an ``AttributeError`` (and a mypy error), never a silent log line.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

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
    """Register storage types.

    :param register: call it once per type: ``register(StorageType(name=..., options=...,
        create=...))``; ``create(instance_name, options, context)`` makes one storage. A name
        registered already (by an earlier plugin) keeps its first registration.
    """


@hookspec
def register_catalogs(register: Callable[[CatalogType], None]) -> None:
    """Register catalog types.

    :param register: call it once per type: ``register(CatalogType(name=..., options=...,
        create=...))``; ``create(options, context)`` makes the catalog.
    """


@hookspec
def register_checksums(register: Callable[[str, HasherFactory], None]) -> None:
    """Register checksum algorithms by name.

    :param register: ``register("sha256", hashlib.sha256)``: the name (as ``pipeline.checksum``
        and SciCat's ``chkAlg`` say it) and a factory of objects with ``update`` and
        ``hexdigest``.
    """


@hookspec
def transfer_started(transfer: Transfer) -> None:
    """An archive, retrieve or verify of one dataset began.

    :param transfer: the transfer's live counters (kind, dataset, bytes and files done and
        total), updated as it goes; read it, do not change it.
    """


@hookspec
def datablock_committed(transfer: Transfer, datablock: Datablock) -> None:
    """A datablock was written and published atomically on the sink (not yet verified).

    :param transfer: the transfer it belongs to.
    :param datablock: the datablock with its member index (archive id, sizes, checksums).
    """


@hookspec
def datablock_verified(transfer: Transfer, datablock: Datablock) -> None:
    """A datablock was read back from the sink, bypassing caches (or checksum-confirmed by the
    storage), and matched.

    :param transfer: the transfer it belongs to.
    :param datablock: the verified datablock.
    """


@hookspec
def transfer_finished(transfer: Transfer) -> None:
    """The transfer completed.

    :param transfer: its final counters; ``transfer.bytes_done`` is final.
    """


@hookspec
def transfer_failed(transfer: Transfer, error: BaseException) -> None:
    """The transfer failed; nothing it wrote is counted as archived.

    :param transfer: its counters as far as it got.
    :param error: why: a ``moverd.UserError`` for the request or data (missing or changing
        files, unsafe names), any other error for a storage, catalog or verification failure.
    """


@hookspec
def restore_changed(transfer: Transfer, storage: str, key: str, state: str) -> None:
    """A datablock's restore (tape-class LTS) or HSM recall (POSIX LTS) moved on. Called once per
    object and state: ``requested`` (moverd asked for it), ``in_progress`` (first seen running,
    also when another run had asked), ``available`` (readable), ``timed_out`` (not available
    within the storage's restore timeout: the transfer fails), ``failed`` (the recall itself
    failed). ``transfer.restores`` holds the counts per state.

    :param transfer: the retrieval (or verify) waiting for it; read it, do not change it.
    :param storage: the configured name of the storage (``lts``).
    :param key: the object's key (the datablock's archive id).
    :param state: ``requested``, ``in_progress``, ``available``, ``timed_out`` or ``failed``.
    """


@hookspec
def storage_space_wait(storage: str, needed: int, free: int, min_free: int, waited: float, waiting: bool) -> None:
    """A write started or stopped waiting for free space. Called at once when the wait starts,
    so that a full share shows in monitoring.

    :param storage: the configured name of the storage (``lts``).
    :param needed: bytes the write needs.
    :param free: bytes free for it (less what open writers announced).
    :param min_free: bytes that must stay free (the storage's ``min_free``).
    :param waited: seconds waited so far.
    :param waiting: True when the wait starts or goes on, False when it ends.
    """


__all__ = ["hookimpl", "hookspec"]
