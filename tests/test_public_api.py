"""moverd's public API is exactly what ``moverd.__all__`` says (as httpx pins its exports): a
name added or dropped is a decision, made here on purpose."""

from __future__ import annotations

import moverd

PUBLIC = {
    "ArchiveStatus", "BlockingReads", "BlockingWrites", "ByteSize", "Catalog", "CatalogError", "CatalogType",
    "ConfigError", "Context", "Datablock", "Dataset", "DirectUploads", "Download", "Duration", "FileEntry",
    "Hasher", "HasherFactory", "Job", "JobDataset", "JobOwner", "JobStatus", "JobType", "LOCAL_STORAGE_TYPE",
    "LifecycleUpdate", "Member", "MissingFileError", "MoverdError", "NoSpaceError", "NotAFileError", "NotFoundError",
    "ObjectInfo", "Observers", "OfflineTimeoutError", "OpenUpload", "Options", "PluginError", "PositiveDuration",
    "Reader", "RestorePolicy",
    "RestoreState", "RetrieveStatus", "ServiceError", "Slots", "SourceChangedError", "Storage", "StorageError",
    "StorageType", "Transfer", "UnknownDatasetError", "UnknownJobError", "UnsafePathError", "UploadedPart",
    "UserError", "VERIFY_READ_BACK", "VERIFY_SERVER_CHECKSUM", "VerificationError", "Writer", "format_size",
    "hookimpl", "join_key", "parse_duration", "parse_size", "path_safe_id", "read_secret_file", "read_slot",
    "retry_async", "retry_blocking", "safe_key", "write_slot",
}


def test_public_api_is_exactly_all() -> None:
    assert set(moverd.__all__) == PUBLIC
    assert len(moverd.__all__) == len(PUBLIC)  # no duplicates
    for name in moverd.__all__:
        assert hasattr(moverd, name), name


def test_no_other_public_name_leaks() -> None:
    leaked = {n for n in vars(moverd) if not n.startswith("_")} - PUBLIC - {"annotations", "__version__"}
    # submodules are reachable as attributes once imported; they are not public names
    leaked = {n for n in leaked if not isinstance(getattr(moverd, n), type(moverd))}
    assert leaked == set()
