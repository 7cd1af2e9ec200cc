"""Retrieve a dataset, or some of its files, from the LTS into a storage.

Every member is read through its byte range in the tar (the member index says where), so a
partial retrieval reads only the requested files, and every byte is checked against the member's
recorded checksum while it streams: a file is published only once it matched.

:func:`retrieve_dataset` never replaces what is already in the target unless asked: before the
first byte is written it looks at every file it is going to write. A file there with the member's
checksum is skipped (as rsync would), one that differs is a conflict, and any conflict refuses the
whole retrieval. Then it removes the temp files an earlier, killed retrieval left in the folders it
is going to write (never those of a writer still running; the storage tells them apart), so a
re-run after a crash both completes the work and leaves nothing behind.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import anyio

from ..app import App
from ..buffers import fill
from ..datablocks import checksum_range, copy_range_verified, read_indexes
from ..errors import NotAFileError, NotFoundError, ServiceError, StorageError, UserError, VerificationError
from ..events import Transfer
from ..keys import safe_key
from ..models import Datablock, Member
from ..restores import restore_datablocks
from ..storage import Storage
from .observed import observed

MEMBER_CONCURRENCY = 4
CHECK_CONCURRENCY = 8
"""Existing files looked at (stat, and hashed when the size matches) at a time."""
SHOWN_CONFLICTS = 5


@dataclass
class RetrieveResult:
    pid: str
    files: list[Member] = field(default_factory=list)
    """Members written."""
    skipped: list[Member] = field(default_factory=list)
    """Members already in the target with their recorded checksum: not written again."""
    removed_temp_files: int = 0
    """Temp files of earlier, dead writers removed from the folders written to."""

    @property
    def size(self) -> int:
        return sum(m.size for m in self.files)


class ExistingFilesError(UserError):
    """Files to retrieve are already in the target with other contents, or their paths are
    taken by something that is not a file (``blocked``: ``--overwrite`` replaces files only)."""

    def __init__(self, where: str, conflicts: Sequence[str], *, blocked: bool = False) -> None:
        self.conflicts = sorted(conflicts)
        self.blocked = blocked
        shown = ", ".join(repr(c) for c in self.conflicts[:SHOWN_CONFLICTS])
        more = len(self.conflicts) - SHOWN_CONFLICTS
        listed = f"{shown}{f' and {more} more' if more > 0 else ''}; nothing was written"
        if blocked:
            message = (
                f"{len(self.conflicts)} path(s) to retrieve are taken in {where} by something that is not a "
                f"file (a directory): {listed} (move them away; --overwrite replaces files only)"
            )
        else:
            message = (
                f"{len(self.conflicts)} file(s) to retrieve already exist in {where} and differ from the "
                f"dataset's (or cannot be read to compare): {listed} (retrieve with --overwrite to replace them)"
            )
        super().__init__(message)


async def load_indexes(app: App, pid: str) -> list[Datablock]:
    """The dataset's datablocks with their member index (offsets) read from the LTS."""
    lts = app.storage("lts")
    out = []
    blocks = await app.catalog.list_datablocks(pid)
    for block, index in zip(blocks, await read_indexes(lts, [b.archive_id for b in blocks]), strict=True):
        if index is None:
            raise ServiceError(f"member index of datablock {block.archive_id!r} is missing on {lts.name!r}")
        index.catalog_id = block.catalog_id
        out.append(index)
    return out


def select_members(blocks: Sequence[Datablock], files: Sequence[str] | None) -> list[tuple[Datablock, list[Member]]]:
    """The members to retrieve per datablock; every requested path must exist."""
    if not files:
        return [(b, list(b.members)) for b in blocks]
    wanted = {safe_key(f) for f in files}
    out = []
    for b in blocks:
        chosen = [m for m in b.members if m.path in wanted]
        wanted -= {m.path for m in chosen}
        if chosen:
            out.append((b, chosen))
    if wanted:
        shown = ", ".join(repr(w) for w in sorted(wanted)[:10])
        raise UserError(f"{len(wanted)} requested file(s) are not in the dataset: {shown}")
    return out


async def retrieve_member(
    app: App, lts: Storage, block: Datablock, member: Member, target: Storage,
    transfer: Transfer | None = None, *, key: str | None = None,
) -> None:
    """Copy one member out of its datablock to ``key`` (default: its own path) of ``target``,
    publishing it only if its checksum matched."""
    key = key or member.path
    await copy_range_verified(
        lts, block.archive_id, member.offset, member.size, target, key, alg=block.checksum_alg,
        expected=member.checksum, hasher=app.registry.hasher, pool=app.pool,
        what=f"member {member.path!r} of datablock {block.archive_id!r}", member=member.path, transfer=transfer,
    )
    await target.set_metadata(key, mtime=member.mtime, mode=member.mode)
    if transfer is not None:
        transfer.files_done += 1


SMALL_MEMBER = 256 * 1024
"""Members up to this size are read in batches (one ranged read per run) and written with one
``put`` each; bigger ones stream through :func:`retrieve_member`."""
MAX_GAP = 64 * 1024
"""Unrequested bytes a batch may read through rather than starting another read."""


def plan_reads(members: Sequence[Member], span: int) -> list[list[Member]]:
    """Group members in tar order: small neighbours into runs whose byte span fits one slab, big
    members alone. Reading a run costs one request instead of one per file."""
    out: list[list[Member]] = []
    for m in sorted(members, key=lambda m: m.offset):
        if m.size > SMALL_MEMBER:
            out.append([m])
            continue
        run = out[-1] if out and out[-1][0].size <= SMALL_MEMBER else None
        if run is not None:
            end = run[-1].offset + run[-1].size
            if m.offset - end <= MAX_GAP and m.offset + m.size - run[0].offset <= span:
                run.append(m)
                continue
        out.append([m])
    return out


async def retrieve_run(
    app: App, lts: Storage, block: Datablock, run: Sequence[Member], target: Storage,
    transfer: Transfer | None = None, *, key_of: Callable[[Member], str] | None = None,
) -> None:
    """Retrieve small neighbouring members with one ranged read into a slab, each checked
    against its checksum before it is published with one ``put``."""
    start = run[0].offset
    length = run[-1].offset + run[-1].size - start
    (slab,) = await app.pool.acquire(1)
    ok = False
    try:
        view = memoryview(slab)[:length]
        if length:
            reader = await lts.open_reader(block.archive_id, start, length)
            try:
                got = await fill(reader, view)
            finally:
                await reader.aclose()
            if got < length:
                raise VerificationError(
                    f"datablock {block.archive_id!r} ends early: expected {length} bytes at offset {start}"
                )
        for m in run:
            data = view[m.offset - start : m.offset - start + m.size]
            h = app.registry.hasher(block.checksum_alg)
            h.update(data)
            if h.hexdigest() != m.checksum:
                raise VerificationError(
                    f"member {m.path!r} of datablock {block.archive_id!r} is corrupt: "
                    f"{block.checksum_alg} {h.hexdigest()} != {m.checksum}",
                    member=m.path,
                )
            await target.put(key_of(m) if key_of else m.path, data, mtime=m.mtime, mode=m.mode)
            if transfer is not None:
                transfer.bytes_done += m.size
                transfer.files_done += 1
        ok = True
    finally:
        (app.pool.release if ok else app.pool.discard)([slab])


async def retrieve_members(
    app: App, lts: Storage, block: Datablock, members: Sequence[Member], target: Storage,
    transfer: Transfer | None = None, *, key_of: Callable[[Member], str] | None = None,
) -> None:
    """Retrieve members of one datablock into ``target`` (at ``key_of(member)``, default their
    path), a few reads at a time. The caller holds the LTS read slot."""
    limiter = anyio.CapacityLimiter(MEMBER_CONCURRENCY)

    async def one(run: list[Member]) -> None:
        async with limiter:
            if len(run) == 1 and run[0].size > SMALL_MEMBER:
                m = run[0]
                await retrieve_member(app, lts, block, m, target, transfer, key=key_of(m) if key_of else None)
            else:
                await retrieve_run(app, lts, block, run, target, transfer, key_of=key_of)

    async with anyio.create_task_group() as tg:
        for run in plan_reads(members, app.pool.chunk_size):
            tg.start_soon(one, run)


async def find_existing(
    app: App, target: Storage, chosen: Sequence[tuple[Datablock, Sequence[Member]]],
) -> tuple[set[str], list[str], list[str]]:
    """``(identical, conflicts, blocked)``: member paths already in ``target`` with the member's
    checksum, those there with other contents, and those taken by something that is not a file
    (the target's ``stat`` raises :class:`~moverd.NotAFileError`). Only a file of the member's
    size is read and hashed."""
    identical: set[str] = set()
    conflicts: list[str] = []
    blocked: list[str] = []
    limiter = anyio.CapacityLimiter(CHECK_CONCURRENCY)

    async def one(block: Datablock, m: Member) -> None:
        async with limiter:
            try:
                info = await target.stat(m.path)
            except NotFoundError:
                return
            except NotAFileError:
                blocked.append(m.path)
                return
            try:
                if info.size != m.size:
                    conflicts.append(m.path)
                    return
                got = await checksum_range(target, m.path, 0, m.size, block.checksum_alg, app.registry.hasher,
                                           app.pool)
            except NotFoundError:
                return
            except (VerificationError, StorageError):  # shrank while read, unreadable: not proven equal
                conflicts.append(m.path)
                return
            (identical.add if got == m.checksum else conflicts.append)(m.path)

    async with anyio.create_task_group() as tg:
        for block, members in chosen:
            for m in members:
                tg.start_soon(one, block, m)
    return identical, conflicts, blocked


def folders_written(members: Sequence[Member]) -> list[str]:
    """The topmost folders (keys, '' for the root) that hold the members: each one's subtree
    covers every folder the retrieval writes into, and no folder is swept twice."""
    dirs = {m.path.rpartition("/")[0] for m in members}
    if "" in dirs:
        return [""]
    out: set[str] = set()
    for d in sorted(dirs, key=lambda d: d.count("/")):  # ancestors first
        parts = d.split("/")
        if not any("/".join(parts[:i]) in out for i in range(1, len(parts) + 1)):
            out.add(d)
    return sorted(out)


async def retrieve_dataset(
    app: App, pid: str, target: Storage, *, files: Sequence[str] | None = None,
    transfer: Transfer | None = None, overwrite: bool = False, check_existing: bool = True,
) -> RetrieveResult:
    """Copy the dataset's files (or only ``files``) from the LTS into ``target``, verified.

    Files already in ``target`` with the member's checksum are skipped (their mtime and mode are
    set, which a killed retrieval may not have done yet); any other existing file raises
    :class:`ExistingFilesError` before anything is written, unless ``overwrite``. A file that
    appears after that check is protected only by the target itself (a ``posix`` storage with
    ``overwrite = false`` refuses to publish over it). Then the temp files of dead writers in
    the folders it writes into go. ``check_existing=False`` is for a caller who knows the target
    was empty: it saves a stat per file and the sweep.
    """
    lts = app.storage("lts")
    transfer = transfer or Transfer(kind="retrieve", dataset=pid)
    result = RetrieveResult(pid=pid)
    with observed(app, transfer):
        chosen = select_members(await load_indexes(app, pid), files)
        if check_existing:
            identical, conflicts, blocked = await find_existing(app, target, chosen)
            where = target.describe().get("root") or f"storage {target.name!r}"
            if blocked:
                raise ExistingFilesError(str(where), blocked, blocked=True)
            if conflicts and not overwrite:
                raise ExistingFilesError(str(where), conflicts)
            # Every folder of the selection, skipped files' too: an earlier run may have left a
            # temp file next to a file that a later run then completed.
            for prefix in folders_written([m for _, ms in chosen for m in ms]):
                result.removed_temp_files += await target.remove_stale_temp_files(0, prefix=prefix)
            skipped = [(b, m) for b, ms in chosen for m in ms if m.path in identical]
            chosen = [(b, [m for m in ms if m.path not in identical]) for b, ms in chosen]
            chosen = [(b, ms) for b, ms in chosen if ms]
            for _, m in skipped:
                await target.set_metadata(m.path, mtime=m.mtime, mode=m.mode)
            result.skipped = [m for _, m in skipped]
        transfer.bytes_total = sum(m.size for _, ms in chosen for m in ms)
        transfer.files_total = sum(len(ms) for _, ms in chosen)
        transfer.datablocks_total = len(chosen)
        await restore_datablocks(app, lts, [b.archive_id for b, _ in chosen], transfer)
        for block, members in chosen:
            async with app.slot(lts, "read"):
                await lts.ensure_online(block.archive_id)
                await retrieve_members(app, lts, block, members, target, transfer)
            result.files.extend(members)
            transfer.datablocks_done += 1
    return result
