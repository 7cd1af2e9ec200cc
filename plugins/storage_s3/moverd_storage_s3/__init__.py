"""moverd storage plugin ``s3``: buckets on MinIO, AWS or any S3-compatible server.

Registered through the ``moverd.plugins`` entry point like any third-party plugin; it uses only
moverd's public API. See ``docs/storage-s3.md`` for the options.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .storage import S3Storage

from moverd import Context, StorageType, hookimpl

from .options import S3Options

__all__ = ["S3Options", "S3Storage", "register_storages"]


def _create(name: str, options: Any, context: Context) -> S3Storage:
    # Imported here, not when plugins load: every moverd command (and a daemon that never uses
    # S3) would pay for the storage's modules. aioboto3 itself (most of a second) is imported
    # later still, only when an operation the lean client does not cover needs it.
    from .storage import S3Storage

    return S3Storage(name, options, context)


@hookimpl
def register_storages(register: Callable[[StorageType], None]) -> None:
    """Offer the ``s3`` storage type."""
    register(
        StorageType(
            name="s3",
            options=S3Options,
            create=_create,
            description="S3 bucket (MinIO, AWS, ...): streaming multipart upload, resumable ranged "
            "reads, presigned URLs",
            url_scheme="s3",
        )
    )


def __getattr__(name: str) -> Any:
    if name == "S3Storage":  # the heavy module, on first use
        from .storage import S3Storage

        return S3Storage
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
