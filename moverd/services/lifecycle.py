"""The one owner of a dataset's archive lifecycle in the catalog, for jobs and the CLI alike.

``started`` → archive → landing zone deleted → ``datasetOnArchiveDisk``; on failure this attempt's
registrations are rolled back and the dataset gets SciCat's user-error or system-error status.
A user error (missing or changing files) also removes the datablocks this attempt wrote on the
LTS: they hold data the source no longer has, so no resume could reuse them. A system error keeps
them, so that running the job again resumes from what is committed.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable

import anyio

from ..app import App
from ..errors import MoverdError, UserError, root_cause
from ..events import Transfer
from ..models import ArchiveStatus, LifecycleUpdate, index_key
from .archive import ArchiveResult, BlockRunner, archive_dataset
from .archive import _direct as _direct_block
from .folders import dataset_source

log = logging.getLogger(__name__)


async def archive_with_lifecycle(
    app: App, pid: str, *, transfer: Transfer | None = None, block_runner: BlockRunner = _direct_block,
    result: ArchiveResult | None = None,
) -> ArchiveResult:
    """Archive catalogued dataset ``pid`` from where its files are, recording every step.

    Raises what the archive raised, after the catalog was told and this attempt rolled back.
    """
    catalog = app.catalog
    result = result or ArchiveResult(pid=pid)
    try:
        source, prefix, is_landing = dataset_source(app, await catalog.get_dataset(pid))
        await catalog.update_lifecycle(pid, LifecycleUpdate(archive_status=ArchiveStatus.started, archivable=False))
        files = await catalog.list_files(pid)
        await archive_dataset(
            app, pid, source=source, prefix=prefix, files=files, transfer=transfer, result=result,
            block_runner=block_runner,
        )
        if is_landing and app.settings.archive.delete_landing:
            # Only now: every datablock is committed, verified and registered.
            deleted = await source.delete_prefix(prefix)
            log.info("deleted %d landing-zone object(s) of %s", deleted, pid)
        await catalog.update_lifecycle(pid, LifecycleUpdate(
            archive_status=ArchiveStatus.on_archive_disk, archivable=False, retrievable=True))
        return result
    except Exception as exc:
        # Judge and name the error itself, not a task group around it; some errors have no message.
        cause = root_cause(exc)
        user_error = isinstance(cause, UserError)
        log.warning("archiving %s failed (%s): %s", pid, "user error" if user_error else "system error",
                    str(cause) or type(cause).__name__)
        with anyio.CancelScope(shield=True):
            await rollback(app, pid, result, remove_written=user_error)
            status = ArchiveStatus.missing_files if user_error else ArchiveStatus.failed
            await best_effort(catalog.update_lifecycle(pid, LifecycleUpdate(
                archive_status=status, archivable=False, retrievable=False)), f"lifecycle of {pid}")
        raise


async def rollback(app: App, pid: str, result: ArchiveResult, *, remove_written: bool) -> None:
    """Delete the catalog datablocks this attempt registered, and with ``remove_written`` the
    tars (and member indexes) it wrote on the LTS."""
    for catalog_id in result.registered:
        await best_effort(app.catalog.delete_datablock(pid, catalog_id), f"datablock {catalog_id} of {pid}")
    if remove_written:
        lts = app.storage("lts")
        for archive_id in result.written_ids:
            for key in (archive_id, index_key(archive_id)):
                await best_effort(lts.delete(key), f"{key!r} on {lts.name!r}")


async def best_effort(op: Awaitable[None], what: str) -> None:
    try:
        await op
    except MoverdError as exc:
        log.error("could not update %s: %s", what, exc)
