"""Restores of objects in a cold storage class (GLACIER, DEEP_ARCHIVE): their state from HEAD.

A HEAD answers ``x-amz-restore: ongoing-request="true"`` while a restore runs and
``ongoing-request="false", expiry-date="..."`` once the copy is readable; without the header no
restore was requested (or the restored copy expired). An object in a class that is not cold is
readable as it is.
"""

from __future__ import annotations

from moverd import RestoreState


def state_of(restore_header: str | None, storage_class: str | None, cold_classes: list[str]) -> RestoreState:
    """The restore state HEAD describes (its ``Restore`` and ``StorageClass`` fields)."""
    if (storage_class or "STANDARD").upper() not in {c.upper() for c in cold_classes}:
        return RestoreState.available
    if not restore_header:
        return RestoreState.archived
    if 'ongoing-request="true"' in restore_header.replace(" ", ""):
        return RestoreState.in_progress
    return RestoreState.available
