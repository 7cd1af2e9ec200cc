"""moverd: a plugin-based data mover for scientific archives.

This module is the public API that plugins and tools use; everything not exported here may change.
"""

from __future__ import annotations

from .catalog import Catalog
from .checksums import Hasher, HasherFactory
from .errors import (
    CatalogError,
    ConfigError,
    MissingFileError,
    MoverdError,
    NoSpaceError,
    NotAFileError,
    NotFoundError,
    OfflineTimeoutError,
    PluginError,
    ServiceError,
    SourceChangedError,
    StorageError,
    UnknownDatasetError,
    UnknownJobError,
    UnsafePathError,
    UserError,
    VerificationError,
)
from .events import Transfer
from .hookspecs import hookimpl
from .keys import join_key, path_safe_id, safe_key
from .limits import Slots
from .models import (
    ArchiveStatus,
    Datablock,
    Dataset,
    Download,
    FileEntry,
    Job,
    JobDataset,
    JobOwner,
    JobStatus,
    JobType,
    LifecycleUpdate,
    Member,
    RetrieveStatus,
)
from .observers import Observers
from .options import Options, read_secret_file
from .registry import CatalogType, Context, StorageType
from .retry import retry_async, retry_blocking
from .storage import (
    LOCAL_STORAGE_TYPE,
    VERIFY_READ_BACK,
    VERIFY_SERVER_CHECKSUM,
    BlockingReads,
    BlockingWrites,
    DirectUploads,
    ObjectInfo,
    OpenUpload,
    Reader,
    RestorePolicy,
    RestoreState,
    Storage,
    UploadedPart,
    Writer,
    read_slot,
    write_slot,
)
from .units import ByteSize, Duration, PositiveDuration, format_size, parse_duration, parse_size

__version__ = "0.1.0"

__all__ = [
    "LOCAL_STORAGE_TYPE", "VERIFY_READ_BACK", "VERIFY_SERVER_CHECKSUM", "ArchiveStatus", "BlockingReads",
    "BlockingWrites", "ByteSize", "Catalog", "CatalogError", "CatalogType", "ConfigError", "Context", "Datablock",
    "Dataset", "DirectUploads", "Download", "Duration", "FileEntry", "Hasher", "HasherFactory", "Job", "JobDataset",
    "JobOwner", "JobStatus", "JobType", "LifecycleUpdate", "Member", "MissingFileError", "MoverdError",
    "NoSpaceError", "NotAFileError", "NotFoundError", "ObjectInfo", "Observers", "OfflineTimeoutError", "OpenUpload",
    "Options", "PluginError", "PositiveDuration", "Reader", "RestorePolicy", "RestoreState", "RetrieveStatus",
    "ServiceError", "Slots",
    "SourceChangedError", "Storage", "StorageError", "StorageType", "Transfer", "UnknownDatasetError",
    "UnknownJobError", "UnsafePathError", "UploadedPart", "UserError", "VerificationError", "Writer", "format_size",
    "hookimpl", "join_key", "parse_duration", "parse_size", "path_safe_id", "read_secret_file", "read_slot",
    "retry_async", "retry_blocking", "safe_key", "write_slot",
]
