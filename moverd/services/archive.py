"""Archive one dataset: plan, stream each datablock to the LTS, verify it, register it.

Resumable by construction: archive ids are deterministic, so a datablock the catalog already has
is skipped, and one that is committed on the LTS (tar + member index) but not yet registered is
verified and reused instead of written again.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import anyio

from ..app import App
from ..datablocks import read_index, read_indexes, verify_datablock, write_index
from ..errors import MissingFileError, ServiceError, SourceChangedError, VerificationError
from ..events import Transfer
from ..keys import join_key
from ..models import Datablock, FileEntry
from ..pipeline import ReadAhead, write_datablock
from ..planner import DatablockPlan, check_file_list, dataset_folder, plan_datablocks
from ..restores import restore_datablocks
from ..storage import ObjectInfo, Storage
from .observed import observed

log = logging.getLogger(__name__)


BlockRunner = Callable[[DatablockPlan, Callable[[], Awaitable[Datablock]]], Awaitable[Datablock]]
"""Wraps the work on one datablock (the Prefect layer runs it as a task); default: just await."""


async def _direct(plan: DatablockPlan, work: Callable[[], Awaitable[Datablock]]) -> Datablock:
    return await work()


@dataclass
class ArchiveResult:
    pid: str
    datablocks: list[Datablock] = field(default_factory=list)
    written: int = 0
    reused: int = 0
    registered: list[str] = field(default_factory=list)
    """Catalog ids this call registered (a failed job deletes them again)."""
    written_ids: list[str] = field(default_factory=list)
    """Archive ids of the datablocks this call wrote (not reused) on the LTS."""

    @property
    def size(self) -> int:
        return sum(d.size for d in self.datablocks)


async def list_relative(source: Storage, prefix: str) -> dict[str, ObjectInfo]:
    """Every object under the folder ``prefix``, by its path relative to it (a dataset's paths)."""
    strip = len(prefix.rstrip("/")) + 1 if prefix.strip("/") else 0
    return {info.key[strip:]: info async for info in source.list(prefix)}


async def check_source(
    source: Storage, prefix: str, files: Sequence[FileEntry]
) -> tuple[list[FileEntry], dict[str, ObjectInfo]]:
    """Check every listed file is in the source with the listed size, before anything is written.

    Returns the files completed with what the source knows and the list did not say (mode,
    owner, mtime), and the source's listing of each by path: the pipeline reads every file
    pinned to that listing, so a file that changes from here on is caught. Missing or resized
    files are a user error that names them.
    """
    found = await list_relative(source, prefix)
    problems: list[str] = []
    out: list[FileEntry] = []
    listed: dict[str, ObjectInfo] = {}
    for f in check_file_list(files):
        if f.path not in found:
            problems.append(f"{f.path!r} is missing")
            continue
        info = found[f.path]
        if info.size != f.size:
            problems.append(f"{f.path!r} has {info.size} bytes, the catalog lists {f.size}")
            continue
        listed[f.path] = info
        out.append(f.model_copy(update={
            "mtime": f.mtime or info.mtime,
            "mode": f.mode if f.mode is not None else info.mode,
            "uid": f.uid if f.uid is not None else info.uid,
            "gid": f.gid if f.gid is not None else info.gid,
        }))
    if problems:
        shown = "; ".join(problems[:10]) + (f"; and {len(problems) - 10} more" if len(problems) > 10 else "")
        where = f"{source.name!r}" + (f" under {prefix!r}" if prefix else "")
        raise MissingFileError(f"{len(problems)} file(s) of the dataset not found as listed in {where}: {shown}")
    return out, listed


class _Turns:
    """The datablocks' turns to start reading, in plan order (the order their tasks reach the
    point of streaming is not it: each reads its index on the LTS first), in one read-ahead
    window: a turn ends once the datablock's last file has its room in it, so the next one's
    files follow on without a pause. A datablock that does not stream (registered already, or
    its committed tar reused) passes its turn; each passes it once."""

    def __init__(self, indexes: Sequence[int], read_ahead: ReadAhead) -> None:
        self.read_ahead = read_ahead
        self._order = sorted(indexes)
        self._next = 0
        self._passed: set[int] = set()
        self._changed = anyio.Event()

    def _is_turn_of(self, index: int) -> bool:
        return index in self._passed or (self._next < len(self._order) and self._order[self._next] == index)

    def done(self, index: int) -> None:
        if index in self._passed:
            return
        self._passed.add(index)
        while self._next < len(self._order) and self._order[self._next] in self._passed:
            self._next += 1
        self._changed.set()
        self._changed = anyio.Event()

    @asynccontextmanager
    async def turn(self, index: int) -> AsyncIterator[Callable[[], None]]:
        """Wait for the datablock's turn; yields the call that ends it early (once its files are
        scheduled), which leaving the block does otherwise."""
        while not self._is_turn_of(index):
            await self._changed.wait()
        try:
            yield lambda: self.done(index)
        finally:
            self.done(index)


def _same_content(block: Datablock, plan: DatablockPlan) -> bool:
    return [(m.path, m.size) for m in block.members] == [(f.path, f.size) for f in plan.files]


async def archive_dataset(
    app: App, pid: str, *, source: Storage, prefix: str = "", files: Sequence[FileEntry] | None = None,
    transfer: Transfer | None = None, result: ArchiveResult | None = None, block_runner: BlockRunner = _direct,
) -> ArchiveResult:
    """Archive dataset ``pid`` from ``source`` (under ``prefix``) to the ``lts`` storage.

    Only a datablock that was read back from the LTS and matched is registered in the catalog.
    On failure in-flight writes are aborted and the error propagates; pass ``result`` to learn
    which datablocks this call registered before it failed (a failed job deletes them again).
    """
    transfer = transfer or Transfer(kind="archive", dataset=pid)
    result = result or ArchiveResult(pid=pid)
    with observed(app, transfer):
        await _archive(app, pid, source, prefix, files, transfer, result, block_runner)
    return result


async def _archive(
    app: App, pid: str, source: Storage, prefix: str, files: Sequence[FileEntry] | None, transfer: Transfer,
    result: ArchiveResult, block_runner: BlockRunner,
) -> None:
    catalog = app.catalog
    lts = app.storage("lts")
    listed = list(files) if files is not None else await catalog.list_files(pid)
    checked, on_source = await check_source(source, prefix, listed)
    plans = plan_datablocks(pid, checked, app.settings.pipeline.target_size)
    transfer.bytes_total = sum(p.size for p in plans)
    transfer.files_total = len(checked)
    transfer.datablocks_total = len(plans)
    blocks: list[Datablock | None] = [None] * len(plans)
    registered = {d.archive_id: d for d in await catalog.list_datablocks(pid)}
    committed: dict[str, Datablock | None] = {}
    # A landing zone in a cold class (the ingestor's uploads in GLACIER): restored before read,
    # only the files still to be read (a resume reads none of a registered or committed block's).
    to_read = await _blocks_to_read(lts, plans, registered, committed) if source.needs_restore else plans
    await restore_datablocks(app, source, [join_key(prefix, f.path) for plan in to_read for f in plan.files],
                             transfer, locked=False)
    # One archiver per dataset at a time (the catalog's ``archivable`` flag and the job dedup make
    # sure of it), so any temporary file under the dataset's folder is from a crashed attempt.
    removed = await lts.remove_stale_temp_files(0, prefix=dataset_folder(pid))
    if removed:
        log.info("removed %d temporary file(s) of an interrupted attempt on %s", removed, pid)
    limiter = anyio.CapacityLimiter(app.settings.pipeline.datablock_concurrency)
    # The datablocks read from the source one after another, in plan order and in one read-ahead
    # window (the next one's first files take room as the last of the one before are read); the
    # others in flight commit, verify and register meanwhile. Two streaming at once shared the
    # same CPU and source and then finished together, leaving both tails (the disk catching up,
    # the read-back, the catalog) with nothing to overlap.
    turns = _Turns([plan.index for plan in plans], app.pipeline.read_ahead())

    async def one(plan: DatablockPlan) -> None:
        async def work() -> Datablock:
            return await _archive_block(
                app, pid, plan, source, prefix, lts, registered, committed, transfer, result, on_source, turns
            )

        try:
            async with limiter:
                block = await block_runner(plan, work)
        finally:
            turns.done(plan.index)
        blocks[plan.index] = block
        transfer.datablocks_done += 1

    async with anyio.create_task_group() as tg:
        for plan in plans:
            tg.start_soon(one, plan)
    result.datablocks = [b for b in blocks if b is not None]
    if source.files_change_in_place:
        await check_unchanged(source, prefix, on_source)


async def check_unchanged(source: Storage, prefix: str, listed: dict[str, ObjectInfo]) -> None:
    """List the source again: every file must still be as it was listed before the archive.

    Each read is pinned to the first listing, so no datablock holds a torn file; this catches a
    file that changed after it was read (a detector still writing the end of its files), whose
    archived copy is consistent but incomplete. It runs before the dataset is called archived
    and before its source is deleted.
    """
    now = await list_relative(source, prefix)
    changed = [path for path, info in listed.items() if not _same_version(info, now.get(path))]
    if changed:
        shown = ", ".join(repr(p) for p in sorted(changed)[:10]) + (
            f" and {len(changed) - 10} more" if len(changed) > 10 else ""
        )
        raise SourceChangedError(
            f"{len(changed)} file(s) of {source.name!r} changed while the dataset was being archived: {shown}. "
            "The dataset is not archived; archive it again once its files are complete"
        )


def _same_version(a: ObjectInfo, b: ObjectInfo | None) -> bool:
    return b is not None and (a.size, a.mtime, a.inode, a.etag) == (b.size, b.mtime, b.inode, b.etag)


async def _blocks_to_read(
    lts: Storage, plans: Sequence[DatablockPlan], registered: dict[str, Datablock],
    committed: dict[str, Datablock | None],
) -> list[DatablockPlan]:
    """The plans whose files the archive will read from the source: neither registered nor
    committed on the LTS with the planned files. The indexes read here land in ``committed``
    for :func:`_archive_block` (not read twice)."""
    unregistered = [plan for plan in plans if plan.archive_id not in registered]
    indexes = await read_indexes(lts, [plan.archive_id for plan in unregistered])
    committed.update(zip((plan.archive_id for plan in unregistered), indexes, strict=True))
    return [plan for plan in unregistered if not _reusable(committed[plan.archive_id], plan)]


def _reusable(block: Datablock | None, plan: DatablockPlan) -> bool:
    return block is not None and _same_content(block, plan)


async def _archive_block(
    app: App, pid: str, plan: DatablockPlan, source: Storage, prefix: str, lts: Storage,
    registered: dict[str, Datablock], committed: dict[str, Datablock | None], transfer: Transfer,
    result: ArchiveResult, on_source: dict[str, ObjectInfo], turns: _Turns,
) -> Datablock:
    known = registered.get(plan.archive_id)
    if known is not None:
        turns.done(plan.index)
        if not _same_content(known, plan):
            raise ServiceError(
                f"datablock {plan.archive_id!r} is registered with other files than planned now "
                "(did target_size change?); delete its catalog entry to archive again"
            )
        result.reused += 1
        transfer.bytes_done += plan.size
        transfer.files_done += len(plan.files)
        return known
    block = committed[plan.archive_id] if plan.archive_id in committed else await read_index(lts, plan.archive_id)
    reused = _reusable(block, plan)
    if block is not None and reused:
        turns.done(plan.index)  # verified, not written (if it does not verify, it streams out of turn)
        try:
            async with app.slot(lts, "read"):
                await verify_datablock(lts, block, app.registry.hasher, app.pool)
            log.info("reusing committed datablock %s", plan.archive_id)
            result.reused += 1
            transfer.bytes_done += plan.size
            transfer.files_done += len(plan.files)
        except VerificationError as exc:
            log.warning("committed datablock %s does not verify (%s); writing it again", plan.archive_id, exc)
            block = None
    else:
        block = None
    if block is None:
        if reused:  # a committed block that did not verify: its files were not restored up front
            await restore_datablocks(app, source, [join_key(prefix, f.path) for f in plan.files], transfer,
                                     locked=False)
        async with turns.turn(plan.index) as scheduled, app.slot(lts, "write"):
            await lts.wait_for_space(plan.packed_size_estimate)
            written = await write_datablock(
                plan, source, prefix, lts, app.pipeline, transfer, on_source, turns.read_ahead, scheduled
            )
            block = written.datablock
            # A tar without its index would be written again on resume: never stop in between.
            with anyio.CancelScope(shield=True):
                await write_index(lts, block)
        app.observers.datablock_committed(transfer=transfer, datablock=block)
        if written.read_back is not True:
            # Not read back while written, or read back wrong: read it back now (this also
            # names the damaged member).
            async with app.slot(lts, "read"):
                await verify_datablock(lts, block, app.registry.hasher, app.pool)
            if written.read_back is False:
                raise VerificationError(
                    f"datablock {plan.archive_id!r} read back differently while it was written, though "
                    "a second read matched: the LTS returns inconsistent data"
                )
        result.written += 1
        result.written_ids.append(plan.archive_id)
    app.observers.datablock_verified(transfer=transfer, datablock=block)
    block.catalog_id = await app.catalog.register_datablock(pid, block)
    result.registered.append(block.catalog_id)
    return block
