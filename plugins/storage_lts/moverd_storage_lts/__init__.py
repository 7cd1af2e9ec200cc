"""moverd storage plugin ``posix``: a directory tree (the LTS share, or a local landing folder).

One storage type serves both roles. It publishes atomically (temp file + fsync + rename + directory
fsync), bounds LTS concurrency with ``read_slots``/``write_slots`` (``read_limit``/``write_limit``),
waits for free space (``min_free``) and for HSM recalls (offline files), and never reads or writes
outside its root, symlinks included. See ``docs/storage-posix.md``.

Besides the :class:`moverd.Storage` contract, :class:`PosixStorage` offers
``remove_stale_temp_files(older_than, prefix="")``: writers that crashed leave
``.<name>.moverd-tmp-<hex>`` files behind; a re-run and the daemon's housekeeping remove those no
live writer holds locked (and, with ``older_than``, not touched for that long).

This plugin registers the type the core uses for local folders (``moverd.LOCAL_STORAGE_TYPE``)
and ships inside moverd's own distribution, so that a plain ``pip install moverd`` has its
embedded default; it is still a plugin: an entry point, and moverd's public names only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from moverd import LOCAL_STORAGE_TYPE, Context, StorageType, hookimpl

from .options import PosixOptions
from .storage import PosixStorage

__all__ = ["PosixOptions", "PosixStorage", "register_storages"]


def _create(name: str, options: Any, context: Context) -> PosixStorage:
    if not isinstance(options, PosixOptions):
        options = PosixOptions.model_validate(options)
    storage = PosixStorage(name, options)
    if context.observers is not None:
        storage.observe = context.observers.storage_space_wait
    return storage


@hookimpl
def register_storages(register: Callable[[StorageType], None]) -> None:
    register(
        StorageType(
            name=LOCAL_STORAGE_TYPE,
            options=PosixOptions,
            create=_create,
            description="a POSIX directory: the LTS share (atomic publish, limits, HSM wait) or a folder",
        )
    )
