"""Datablocks at rest: their member index, read-back verification, and byte-range streaming.

The member index (``<archive id>.index.json``) is written beside each tar right after the tar is
committed. It is moverd's own record of where every member's bytes are, whatever the catalog can
store (SciCat has no offsets), and together with the tar it marks a datablock as committed: a
re-run finds both, verifies the tar against the index, and reuses it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import anyio
from pydantic import ValidationError

from .buffers import SlabPool, fill, fill_and_hash
from .checksums import THREAD_HASH_MIN, Hasher
from .errors import NotFoundError, VerificationError, root_cause
from .events import Transfer
from .models import Datablock, Member, index_key
from .storage import VERIFY_READ_BACK, VERIFY_SERVER_CHECKSUM, BlockingReads, Reader, Storage


async def write_index(sink: Storage, datablock: Datablock) -> None:
    await sink.put_index(index_key(datablock.archive_id), datablock.model_dump_json(exclude={"catalog_id"}).encode())


async def read_index(storage: Storage, archive_id: str) -> Datablock | None:
    """The stored member index, or None when there is none (or it is unreadable)."""
    key = index_key(archive_id)
    try:
        info = await storage.stat(key)
        buf = bytearray(info.size)
        reader = await storage.open_reader(key)
        try:
            n = await fill(reader, memoryview(buf))
        finally:
            await reader.aclose()
        return Datablock.model_validate(json.loads(buf[:n]))
    except NotFoundError:
        return None
    except (ValueError, ValidationError):
        return None


INDEXES_AT_ONCE = 16
"""Member indexes read at once: a dataset of a thousand datablocks on S3 is a thousand index
reads of two round trips each, a minute one after another."""


async def read_indexes(storage: Storage, archive_ids: Sequence[str]) -> list[Datablock | None]:
    """:func:`read_index` of each of ``archive_ids``, in their order, a few at a time."""
    out: list[Datablock | None] = [None] * len(archive_ids)
    limiter = anyio.CapacityLimiter(INDEXES_AT_ONCE)

    async def one(i: int, archive_id: str) -> None:
        async with limiter:
            out[i] = await read_index(storage, archive_id)

    try:
        async with anyio.create_task_group() as tg:
            for i, archive_id in enumerate(archive_ids):
                tg.start_soon(one, i, archive_id)
    except BaseExceptionGroup as group:  # the storage's error, not "unhandled errors in a TaskGroup"
        raise root_cause(group) from None
    return out


def _ends_early(storage: Storage, key: str, offset: int, length: int, got: int) -> VerificationError:
    return VerificationError(
        f"{key!r} on {storage.name!r} ends early: expected {length} bytes from offset {offset}, got {got}"
    )


async def stream_range(
    storage: Storage, key: str, offset: int, length: int, pool: SlabPool,
    consume: Callable[[memoryview], Coroutine[Any, Any, None]], *, uncached: bool = False,
) -> None:
    """Read ``length`` bytes at ``offset`` and hand them to ``consume`` chunk by chunk.

    Two slabs alternate so the next read overlaps the consumer's work on the previous chunk.
    """
    if length == 0:
        return
    await _stream(await storage.open_reader(key, offset, length, uncached=uncached), storage, key, offset,
                  length, pool, consume)


async def _stream(
    reader: Reader, storage: Storage, key: str, offset: int, length: int, pool: SlabPool,
    consume: Callable[[memoryview], Coroutine[Any, Any, None]],
) -> None:
    """:func:`stream_range` on an open reader, which it closes."""
    try:
        slabs = await pool.acquire(2)
    except BaseException:
        with anyio.CancelScope(shield=True):
            await reader.aclose()
        raise
    ok = False
    try:
        try:
            remaining = length
            pending: tuple[bytearray, int] | None = None
            i = 0
            while remaining > 0 or pending:
                async with anyio.create_task_group() as tg:
                    if pending:
                        tg.start_soon(consume, memoryview(pending[0])[: pending[1]])
                    nxt: tuple[bytearray, int] | None = None
                    if remaining > 0:
                        slab = slabs[i % 2]
                        i += 1
                        want = min(remaining, len(slab))
                        n = await fill(reader, memoryview(slab)[:want])
                        if n < want:
                            raise _ends_early(storage, key, offset, length, length - remaining + n)
                        remaining -= n
                        nxt = (slab, n)
                pending = nxt
        finally:
            await reader.aclose()
        ok = True
    finally:
        (pool.release if ok else pool.discard)(slabs)


async def _hash_into(hashers: list[Hasher], view: memoryview) -> None:
    def run() -> None:
        for h in hashers:
            h.update(view)

    if len(view) >= THREAD_HASH_MIN:
        await anyio.to_thread.run_sync(run)
    else:
        run()


async def copy_range_verified(
    source: Storage, key: str, offset: int, length: int, target: Storage, target_key: str, *,
    alg: str, expected: str, hasher: Callable[[str], Hasher], pool: SlabPool, what: str,
    member: str | None = None, transfer: Transfer | None = None,
) -> None:
    """Stream a byte range of ``source`` into a new object of ``target``, hashing it on the way
    (in a worker thread, beside the write, for big chunks); the object is published only if the
    checksum matched, else nothing is left and :class:`VerificationError` names ``what``."""
    h = hasher(alg)
    writer = await target.open_writer(target_key, size_hint=length)

    async def consume(view: memoryview) -> None:
        if len(view) >= THREAD_HASH_MIN:
            async with anyio.create_task_group() as tg:
                tg.start_soon(anyio.to_thread.run_sync, h.update, view)
                await writer.write(view)
        else:
            h.update(view)
            await writer.write(view)
        if transfer is not None:
            transfer.bytes_done += len(view)

    try:
        await stream_range(source, key, offset, length, pool, consume)
        got = h.hexdigest()
        if got != expected:
            raise VerificationError(f"{what} is corrupt: {alg} {got} != {expected}", member=member)
        await writer.commit()
    except BaseException:
        with anyio.CancelScope(shield=True):
            await writer.abort()
        raise


async def checksum_range(
    storage: Storage, key: str, offset: int, length: int, alg: str, hasher: Callable[[str], Hasher],
    pool: SlabPool, *, uncached: bool = False, transfer: Transfer | None = None,
) -> str:
    h = hasher(alg)
    if length == 0:
        return h.hexdigest()
    reader = await storage.open_reader(key, offset, length, uncached=uncached)
    if isinstance(reader, BlockingReads):
        try:
            await _checksum_blocking(reader, key, storage, offset, length, h, pool, transfer)
        finally:
            await reader.aclose()
        return h.hexdigest()

    async def consume(view: memoryview) -> None:
        await _hash_into([h], view)
        if transfer is not None:
            transfer.bytes_done += len(view)

    await _stream(reader, storage, key, offset, length, pool, consume)
    return h.hexdigest()


async def _checksum_blocking(
    reader: BlockingReads, key: str, storage: Storage, offset: int, length: int, h: Hasher, pool: SlabPool,
    transfer: Transfer | None,
) -> None:
    """Read and hash each chunk in one worker-thread call (readers that block anyway: files)."""
    slabs = await pool.acquire(1)
    ok = False
    try:
        view = memoryview(slabs[0])
        remaining = length
        while remaining > 0:
            want = min(remaining, len(view))
            n = await anyio.to_thread.run_sync(fill_and_hash, reader.readinto_blocking, view[:want], h)
            if n < want:
                raise _ends_early(storage, key, offset, length, length - remaining + n)
            remaining -= n
            if transfer is not None:
                transfer.bytes_done += n
        ok = True
    finally:
        (pool.release if ok else pool.discard)(slabs)


async def verify_datablock(
    storage: Storage, datablock: Datablock, hasher: Callable[[str], Hasher], pool: SlabPool,
    transfer: Transfer | None = None,
) -> str:
    """Read the tar back around the page cache and compare it with its recorded checksum.

    On a mismatch the members are checked one by one so that the error names the damaged file.
    A storage that verifies by server checksum (objects unreadable until restored) is not read:
    the checksum it reports for the object must be the one recorded when it was streamed.
    Returns how it was verified (:data:`~moverd.storage.VERIFY_READ_BACK` or
    :data:`~moverd.storage.VERIFY_SERVER_CHECKSUM`). The caller holds the storage's read slot.
    """
    alg, _, expected = datablock.datablock_checksum.partition(":")
    key = datablock.archive_id
    try:
        if storage.verification != VERIFY_SERVER_CHECKSUM:
            await storage.ensure_online(key)
        info = await storage.stat(key)
    except NotFoundError:
        raise VerificationError(f"datablock {key!r} is missing from {storage.name!r}") from None
    if info.size != datablock.packed_size:
        raise VerificationError(
            f"datablock {key!r} has {info.size} bytes on {storage.name!r}, expected {datablock.packed_size}"
        )
    if storage.verification == VERIFY_SERVER_CHECKSUM:
        await _compare_stored_checksum(storage, datablock)
        return VERIFY_SERVER_CHECKSUM
    actual = await checksum_range(
        storage, key, 0, info.size, alg, hasher, pool, uncached=True, transfer=transfer
    )
    if actual == expected:
        return VERIFY_READ_BACK
    member = await _find_damaged_member(storage, datablock, hasher, pool)
    where = f" in member {member.path!r}" if member else " (in tar headers or padding)"
    raise VerificationError(
        f"datablock {key!r} on {storage.name!r} is corrupt{where}: {alg} {actual} != {expected}",
        member=member.path if member else None,
    )


async def _compare_stored_checksum(storage: Storage, datablock: Datablock) -> None:
    key = datablock.archive_id
    if not datablock.object_checksum:
        raise VerificationError(
            f"datablock {key!r} on {storage.name!r} cannot be read back without a restore and has no "
            "recorded object checksum to compare with the storage's"
        )
    reported = await storage.stored_checksum(key)
    if reported != datablock.object_checksum:
        raise VerificationError(
            f"datablock {key!r} on {storage.name!r} does not match the checksum computed while it was "
            f"written: the storage reports {reported or 'none'}, moverd computed {datablock.object_checksum}"
        )


async def _find_damaged_member(
    storage: Storage, datablock: Datablock, hasher: Callable[[str], Hasher], pool: SlabPool
) -> Member | None:
    for m in datablock.members:
        got = await checksum_range(
            storage, datablock.archive_id, m.offset, m.size, datablock.checksum_alg, hasher, pool, uncached=True
        )
        if got != m.checksum:
            return m
    return None


async def discard_unindexed(storage: Storage, folder: str) -> list[str]:
    """Remove the tars under ``folder`` (a dataset's) that were committed without their member
    index, and return their keys.

    A datablock's tar is published first, then its index, in one write section; an archive
    cancelled between the two leaves a whole tar that is not a datablock (never verified nor
    registered, and a resume writes it again). Nothing of an aborted archive may look half-done on
    the LTS, so those tars go.
    """
    keys = {info.key async for info in storage.list(folder)}
    orphans = sorted(k for k in keys if k.endswith(".tar") and index_key(k) not in keys)
    for key in orphans:
        await storage.delete(key)
    return orphans
