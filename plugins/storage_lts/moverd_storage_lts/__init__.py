"""moverd storage plugin ``posix``: a directory tree (the LTS share, or a local landing folder).

One storage type serves both roles. It publishes atomically (temp file + fsync + rename + directory
fsync), bounds LTS concurrency with ``read_slots``/``write_slots`` (``read_limit``/``write_limit``),
waits for free space (``min_free``) and for HSM recalls (offline files), and never reads or writes
outside its root, symlinks included. See ``docs/storage-posix.md``.

Besides the :class:`moverd.Storage` contract, :class:`PosixStorage` offers
``remove_stale_temp_files(older_than, prefix="")``: writers that crashed leave
``.<name>.moverd-tmp-<hex>`` files behind; a re-run and the daemon's housekeeping remove those not
touched for ``older_than`` seconds.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from moverd import Context, StorageType, hookimpl

from .options import PosixOptions
from .storage import PosixStorage

__all__ = ["PosixOptions", "PosixStorage", "register_storages"]


def _create(name: str, options: Any, context: Context) -> PosixStorage:
    if not isinstance(options, PosixOptions):
        options = PosixOptions.model_validate(options)
    return PosixStorage(name, options)


@hookimpl
def register_storages(register: Callable[[StorageType], None]) -> None:
    register(
        StorageType(
            name="posix",
            options=PosixOptions,
            create=_create,
            description="a POSIX directory: the LTS share (atomic publish, limits, HSM wait) or a folder",
        )
    )
