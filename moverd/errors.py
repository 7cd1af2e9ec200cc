"""The exceptions moverd raises.

Two families matter to callers: :class:`UserError` (the request or the data is wrong; retrying
will not help, the catalog is told ``missingFilesError``) and :class:`ServiceError` (a storage or
catalog failed; the job may be run again and resumes). Every error carries one clear line of text
so that the CLI and the catalog can show it as it is.
"""

from __future__ import annotations


class MoverdError(Exception):
    """Base class of every error moverd raises on purpose."""


class UserError(MoverdError):
    """The input is wrong: unsafe names, missing files, unknown datasets, bad requests."""


class UnsafePathError(UserError):
    """A key or path that could escape its root (``..``, absolute, NUL, outside symlink)."""


class MissingFileError(UserError):
    """A file the plan needs is absent from the source, or has another size than listed."""


class SourceChangedError(UserError):
    """A source file changed (grew, shrank, was rewritten or replaced) while it was being read.

    Nothing read from it is committed or registered: a microscope still writing a file must never
    have a truncated copy called archived. Archive again once the file is complete.
    """


class UnknownDatasetError(UserError):
    """The catalog has no dataset with this id."""


class UnknownJobError(UserError):
    """The catalog has no job with this id."""


class ConfigError(MoverdError):
    """The configuration is broken; the message lists every problem found."""


class ServiceError(MoverdError):
    """A storage, catalog or verification failure (SciCat's "system error"): the job can be run
    again and resumes."""


class StorageError(ServiceError):
    """A storage backend failed (I/O error, server error after retries, ...)."""


class NotFoundError(StorageError):
    """The key does not exist in the storage."""


class NotAFileError(StorageError):
    """Something that is not an object stands at the key (a directory on a file system): the
    key is taken, though there is nothing to read there."""


class NoSpaceError(StorageError):
    """The sink is full, or stayed below its free-space minimum for longer than allowed."""


class OfflineTimeoutError(StorageError):
    """An offline (HSM) file was not recalled within the configured timeout."""


class VerificationError(ServiceError):
    """Bytes read back do not match the checksums recorded when they were written."""

    def __init__(self, message: str, *, member: str | None = None) -> None:
        super().__init__(message)
        self.member = member


class CatalogError(ServiceError):
    """The catalog failed or refused a request."""


class PluginError(MoverdError):
    """A storage, catalog or checksum name that no loaded plugin provides."""


def root_cause(exc: BaseException) -> BaseException:
    """The first real error of a task group (anyio wraps them in exception groups)."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc
