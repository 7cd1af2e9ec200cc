"""Turning ``OSError`` into the moverd errors the core tells apart.

The core decides between "wait / retry later" (:class:`~moverd.NoSpaceError`), "the object is not
there" (:class:`~moverd.NotFoundError`) and a plain storage failure from the exception class alone,
so the errno must be mapped here, once, with a message an operator can act on.
"""

from __future__ import annotations

import errno

from moverd import NoSpaceError, NotFoundError, StorageError, UnsafePathError


def map_os_error(exc: OSError, path: str, action: str, where: str) -> StorageError | UnsafePathError:
    """The moverd error for ``exc``, raised while ``action`` (a verb) on ``path``.

    ``where`` names the storage (``posix storage 'lts'``) so that a message read in the catalog
    or a log says which share failed.
    """
    code = exc.errno
    if code == errno.ENOENT:
        return NotFoundError(f"{where}: {path}: not found")
    if code == errno.ENOSPC:
        return NoSpaceError(f"{where}: cannot {action} {path}: no space left on device")
    if code == errno.EDQUOT:
        return NoSpaceError(f"{where}: cannot {action} {path}: no space left on device (disk quota exceeded)")
    if code == errno.EROFS:
        return StorageError(f"{where}: cannot {action} {path}: read-only file system")
    if code == errno.ELOOP:
        # Only O_NOFOLLOW produces this on our resolved paths: a symlink appeared after the check.
        return UnsafePathError(f"{where}: {path}: is a symlink (refused)")
    reason = exc.strerror or str(exc)
    return StorageError(f"{where}: cannot {action} {path}: {reason}")
