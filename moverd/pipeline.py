"""The single pass: source files → tar members → sink, hashed on the way.

One datablock is written by two kinds of tasks under one task group:

* a *scheduler* walks the plan in order, reserves slabs for each file from the shared
  :class:`~moverd.buffers.SlabPool` and starts a *reader* per file (at most ``prefetch_files`` at
  once), so that S3 request latency does not serialise small files;
* the *consumer* (this function's body) takes the files in plan order, writes each header, then
  each chunk: the per-file checksum and the whole-datablock checksum are computed in a worker
  thread while the sink writes the same buffer, then the slab goes back to its reader.

Nothing is staged: the only bytes held are the slabs in flight.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import anyio
import anyio.abc
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from .buffers import SlabPool, fill
from .checksums import DATABLOCK_CHECKSUM, THREAD_HASH_MIN, Hasher
from .errors import MissingFileError, NotFoundError
from .events import Transfer
from .keys import join_key
from .models import Datablock, FileEntry, Member
from .planner import DatablockPlan
from .storage import Storage, Writer
from .tarframe import end_of_archive, member_header, padding

COALESCE_SIZE = 256 * 1024


@dataclass
class PipelineContext:
    """What the pipeline shares across datablocks and datasets in one process."""

    pool: SlabPool
    hasher: Callable[[str], Hasher]
    checksum: str = "md5"
    prefetch_files: int = 32

    def slabs_for(self, size: int) -> int:
        """Slabs one file may hold: enough for the whole file, at most a quarter of the pool."""
        if size == 0:
            return 0
        return max(1, min(math.ceil(size / self.pool.chunk_size), self.pool.capacity // 4))


@dataclass(eq=False)
class _FileStream:
    entry: FileEntry
    slabs: list[bytearray]
    chunks: MemoryObjectReceiveStream[tuple[bytearray, int]]
    give_back: MemoryObjectSendStream[bytearray]
    file_hash: Hasher
    """Updated by the file's reader as chunks arrive, so that files hash in parallel."""
    returned: bool = False


class TarSink:
    """Frames bytes into the sink writer: coalesces small pieces, passes big chunks through."""

    def __init__(self, writer: Writer, block_hash: Hasher) -> None:
        self.writer = writer
        self.block_hash = block_hash
        self.offset = 0
        self._buf = bytearray(COALESCE_SIZE)
        self._view = memoryview(self._buf)
        self._fill = 0

    async def put_small(self, data: bytes | memoryview) -> None:
        n = len(data)
        if self._fill + n > COALESCE_SIZE:
            await self.flush()
        if n >= COALESCE_SIZE:
            self.block_hash.update(data)
            await self.writer.write(data)
        else:
            self._view[self._fill : self._fill + n] = data
            self._fill += n
        self.offset += n

    async def put_chunk(self, view: memoryview) -> None:
        """Write one data chunk straight from its slab (the file's checksum is already done)."""
        await self.flush()
        self.block_hash.update(view)  # xxh3: some 20 us per MiB, cheaper than a thread hop
        await self.writer.write(view)
        self.offset += len(view)

    async def flush(self) -> None:
        if self._fill:
            data = self._view[: self._fill]
            self.block_hash.update(data)
            await self.writer.write(data)
            self._fill = 0


async def _read_file(
    source: Storage, key: str, entry: FileEntry, send: MemoryObjectSendStream[tuple[bytearray, int]],
    free: MemoryObjectReceiveStream[bytearray], limiter: anyio.CapacityLimiter, file_hash: Hasher,
) -> None:
    """Read one file into its slabs and hash each chunk as it arrives, as fast as the consumer
    gives slabs back. Hashing here, not in the consumer, is what lets several files' checksums
    run at once on both cores while the consumer only writes."""
    try:
        async with send:
            reader = None
            try:
                reader = await source.open_reader(key)
                remaining = entry.size
                while remaining > 0:
                    slab = await free.receive()
                    want = min(remaining, len(slab))
                    view = memoryview(slab)[:want]
                    n = await fill(reader, view)
                    if n < want:
                        raise MissingFileError(
                            f"{key!r} in {source.name!r} has {entry.size - remaining + n} bytes, "
                            f"expected {entry.size} (it changed while being archived)"
                        )
                    if n >= THREAD_HASH_MIN:
                        await anyio.to_thread.run_sync(file_hash.update, view)
                    else:
                        file_hash.update(view)
                    remaining -= n
                    await send.send((slab, n))
            except NotFoundError:
                # Storages may open lazily, so a vanished file shows up on open or first read.
                raise MissingFileError(f"{key!r} vanished from {source.name!r} before it was archived") from None
            finally:
                if reader is not None:
                    await reader.aclose()
    finally:
        limiter.release_on_behalf_of(send)


async def _schedule(
    plan: DatablockPlan, source: Storage, prefix: str, ctx: PipelineContext,
    files: MemoryObjectSendStream[_FileStream], tg: anyio.abc.TaskGroup, taken: set[_FileStream],
) -> None:
    prefetch = anyio.CapacityLimiter(ctx.prefetch_files)
    async with files:
        for entry in plan.files:
            slabs = await ctx.pool.acquire(ctx.slabs_for(entry.size))
            chunks_send, chunks_recv = anyio.create_memory_object_stream[tuple[bytearray, int]](len(slabs) or 1)
            free_send, free_recv = anyio.create_memory_object_stream[bytearray](len(slabs) or 1)
            for slab in slabs:
                free_send.send_nowait(slab)
            fs = _FileStream(entry, slabs, chunks_recv, free_send, ctx.hasher(ctx.checksum))
            taken.add(fs)
            if entry.size:
                await prefetch.acquire_on_behalf_of(chunks_send)
                tg.start_soon(
                    _read_file, source, join_key(prefix, entry.path), entry, chunks_send, free_recv, prefetch,
                    fs.file_hash,
                )
            else:
                chunks_send.close()
            await files.send(fs)


async def write_datablock(
    plan: DatablockPlan, source: Storage, prefix: str, sink: Storage, ctx: PipelineContext,
    transfer: Transfer | None = None,
) -> Datablock:
    """Stream the plan's files from ``source`` into one tar on ``sink`` and commit it.

    Returns the datablock with its member index. On any error the sink writer is aborted, so
    nothing is left under the archive id or in temporary files.
    """
    writer = await sink.open_writer(plan.archive_id, size_hint=plan.packed_size_estimate)
    block_hash = ctx.hasher(DATABLOCK_CHECKSUM)
    members: list[Member] = []
    taken: set[_FileStream] = set()  # files whose slabs are out: only those in flight
    try:
        out = TarSink(writer, block_hash)
        async with anyio.create_task_group() as tg:
            files_send, files_recv = anyio.create_memory_object_stream[_FileStream](ctx.prefetch_files)
            tg.start_soon(_schedule, plan, source, prefix, ctx, files_send, tg, taken)
            async with files_recv:
                async for fs in files_recv:
                    members.append(await _consume_file(fs, out, ctx, transfer))
                    taken.discard(fs)
        await out.put_small(end_of_archive(out.offset))
        await out.flush()
        await writer.commit()
    except BaseException:
        with anyio.CancelScope(shield=True):
            await writer.abort()
        # A cancelled reader's worker thread may still be filling its slab: never reuse those.
        for fs in taken:
            if not fs.returned:
                fs.returned = True
                ctx.pool.discard(fs.slabs)
        raise
    return Datablock(
        archive_id=plan.archive_id, index=plan.index, size=plan.size, packed_size=out.offset,
        checksum_alg=ctx.checksum, datablock_checksum=f"{DATABLOCK_CHECKSUM}:{block_hash.hexdigest()}",
        members=members,
    )


async def _consume_file(
    fs: _FileStream, out: TarSink, ctx: PipelineContext, transfer: Transfer | None
) -> Member:
    entry = fs.entry
    header_offset = out.offset
    await out.put_small(
        member_header(entry.path, entry.size, mtime=entry.mtime, mode=entry.mode, uid=entry.uid, gid=entry.gid)
    )
    data_offset = out.offset
    async with fs.chunks, fs.give_back:
        async for slab, n in fs.chunks:
            view = memoryview(slab)[:n]
            if n >= THREAD_HASH_MIN:
                await out.put_chunk(view)
            else:
                await out.put_small(view)
            if transfer is not None:
                transfer.bytes_done += n
            fs.give_back.send_nowait(slab)
    fs.returned = True
    ctx.pool.release(fs.slabs)
    await out.put_small(padding(entry.size))
    if transfer is not None:
        transfer.files_done += 1
    return Member(
        path=entry.path, size=entry.size, offset=data_offset, header_offset=header_offset,
        mtime=int(entry.mtime), mode=entry.mode, uid=entry.uid, gid=entry.gid,
        checksum=fs.file_hash.hexdigest(),
    )
