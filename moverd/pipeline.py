"""The single pass: source files → tar members → sink, hashed on the way.

One datablock is written by three kinds of tasks under one task group:

* a *scheduler* walks the plan in order, reserves slabs for each file from the shared
  :class:`~moverd.buffers.SlabPool` and starts a *reader* per file (at most ``prefetch_files``
  files and ``prefetch_bytes`` of them at once, see :class:`ReadAhead`), so that S3 request
  latency does not serialise small files; each reader hashes its
  file's chunks as they arrive (in the same worker-thread call that reads them, where the reader
  blocks anyway), so several files' checksums run at once on both cores — unless the checksum
  hashes many streams at once (multi-buffer md5, :func:`~moverd.checksums.hashes_together`):
  then the drain hashes every file's chunks of a batch in one call;
* the *consumer* (this module's :func:`write_datablock`) takes the files in plan order and frames
  them as tar members: headers and small pieces are coalesced, big chunks pass through as views
  of their slabs;
* the *drain* (:class:`TarSink`) writes what the consumer framed, in order, behind it: all the
  chunks waiting when it comes round go out in one worker-thread call (with the datablock's
  checksum), so the consumer never waits for a thread hop per chunk, and a chunk's slab goes back
  to its reader once written.

Nothing is staged: the only bytes held are the slabs in flight.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

import anyio
import anyio.abc
import anyio.lowlevel
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from .buffers import SlabPool, fill, fill_many_and_hash
from .checksums import (
    DATABLOCK_CHECKSUM,
    HASH_LANES,
    MULTI_BUFFER_MD5,
    THREAD_HASH_MIN,
    Hasher,
    hashes_together,
    update_many,
)
from .errors import MissingFileError, NotFoundError, SourceChangedError
from .events import Transfer
from .keys import join_key
from .models import Datablock, FileEntry, Member
from .planner import DatablockPlan
from .storage import BlockingWrites, ObjectInfo, Storage, Writer
from .tarframe import end_of_archive, member_header, padding

T = TypeVar("T")


async def _send(stream: MemoryObjectSendStream[T], item: T) -> None:
    """``stream.send(item)`` without its checkpoint when there is room: every checkpoint is one
    more turn of the event loop, and the pipeline sends and receives about ten items per file
    (a 1 GiB archive of 2 MiB files spent ~5,600 loop turns on them alone).

    A closed other end is raised only after a pending cancellation: ``send()`` checks for one
    first, and a peer that stopped because the job is being cancelled must not turn that
    cancellation into an error (a failed archive and its rollback, instead of one that resumes)."""
    try:
        stream.send_nowait(item)
    except anyio.WouldBlock:
        await stream.send(item)
    except (anyio.BrokenResourceError, anyio.ClosedResourceError):
        await anyio.lowlevel.checkpoint_if_cancelled()
        raise


async def _receive(stream: MemoryObjectReceiveStream[T]) -> T:
    """``stream.receive()`` without its checkpoint when an item waits (see :func:`_send`);
    raises :class:`anyio.EndOfStream` as it does, and only after a pending cancellation."""
    try:
        return stream.receive_nowait()
    except anyio.WouldBlock:
        return await stream.receive()
    except (anyio.EndOfStream, anyio.ClosedResourceError):
        await anyio.lowlevel.checkpoint_if_cancelled()
        raise


COALESCE_SIZE = 256 * 1024


@dataclass
class PipelineContext:
    """What the pipeline shares across datablocks and datasets in one process."""

    pool: SlabPool
    hasher: Callable[[str], Hasher]
    checksum: str = "md5"
    prefetch_files: int = 32
    prefetch_bytes: int = 32 * 1024**2

    def file_hasher(self) -> Hasher:
        """A new file's checksum: md5 hashes many files at once where the CPU allows (the drain
        does it, see :func:`~moverd.checksums.hashes_together`); every other algorithm, and md5
        elsewhere, is the registry's."""
        if self.checksum == "md5" and MULTI_BUFFER_MD5 is not None:
            return MULTI_BUFFER_MD5()
        return self.hasher(self.checksum)

    def read_ahead(self) -> ReadAhead:
        """A new read-ahead window of this context's size (one per dataset archive)."""
        return ReadAhead(self.prefetch_files, self.prefetch_bytes)

    def slabs_for(self, size: int) -> int:
        """Slabs one file may hold: enough for the whole file, at most a quarter of the pool."""
        if size == 0:
            return 0
        return max(1, min(math.ceil(size / self.pool.chunk_size), self.pool.capacity // 4))


class ReadAhead:
    """How many files, and how many of their bytes, are read at once: one window for all the
    datablocks of a dataset, which stream one after another (see :func:`write_datablock`).

    The file count hides request latency for small files. The bytes keep bigger files from
    flooding the source with requests that only compete there: requests in flight beyond what
    covers the bandwidth-delay product add no throughput, and a server that shares its CPU among
    them (a thread per request) spends more on each. A file counts at most a quarter of the bytes,
    so that at least four files are always read at once. Only the scheduler waits (in plan order);
    readers give back when they have read their file.

    Shared, the window lets the next datablock's first files take room one by one as the last
    files of the one before are read, as within a datablock. With a window per datablock, the
    next one's first sixteen 2 MiB reads started together when the one before had drained, and
    moved in step: ~95 ms at each boundary with nothing to write (docs/benchmarks.md).
    """

    def __init__(self, files: int, nbytes: int) -> None:
        self.files = files
        self.bytes = nbytes
        self._max_cost = max(1, nbytes // 4)
        self._freed = anyio.Event()
        self.threads = anyio.CapacityLimiter(files)
        """The readers' worker-thread tokens: readers blocked on the network never take those of
        anyio's default limiter, which the writes need."""

    async def acquire(self, size: int) -> _Room:
        """Wait for room to read a file of ``size`` bytes; the room is given back by its
        :meth:`_Room.release`."""
        cost = min(size, self._max_cost)
        while self.files < 1 or self.bytes < cost:
            # Every waiter waits on the same event, which a release sets and replaces: two
            # schedulers may wait at once (a committed datablock that did not verify is written
            # again out of turn), and neither may miss its wake-up.
            await self._freed.wait()
        self.files -= 1
        self.bytes -= cost
        return _Room(self, cost)

    def _release(self, cost: int) -> None:
        self.files += 1
        self.bytes += cost
        freed, self._freed = self._freed, anyio.Event()
        freed.set()


class _Room:
    """One file's share of a :class:`ReadAhead`, given back once (by its reader, or by the
    datablock when it fails: a reader task cancelled before it ever ran cannot)."""

    __slots__ = ("_cost", "_window")

    def __init__(self, window: ReadAhead | None, cost: int) -> None:
        self._window = window
        self._cost = cost

    def release(self) -> None:
        window, self._window = self._window, None
        if window is not None:
            window._release(self._cost)


_NO_ROOM = _Room(None, 0)
"""An empty file's: it is not read."""


@dataclass(eq=False)
class _FileStream:
    entry: FileEntry
    slabs: list[bytearray]
    chunks: MemoryObjectReceiveStream[tuple[bytearray, int]]
    give_back: MemoryObjectSendStream[bytearray]
    file_hash: Hasher
    """Updated by the file's reader as chunks arrive, so that files hash in parallel; or by the
    drain, with other files' streams, when ``drain_hashes``."""
    drain_hashes: bool = False
    pending: int = 0
    """Chunks handed to the drain and not written yet."""
    consumed: bool = False
    returned: bool = False
    """The slabs are back in the pool (or given up after an error)."""

    def give_back_slab(self, slab: bytearray) -> None:
        """Hand a slab whose bytes are framed or written back to the file's reader (which may
        need it for the next chunk; after the file was consumed nobody does)."""
        if not self.consumed:
            try:
                self.give_back.send_nowait(slab)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                pass  # the reader is done with this file

    def chunk_written(self, slab: bytearray, pool: SlabPool, taken: set[_FileStream]) -> None:
        self.pending -= 1
        self.give_back_slab(slab)
        self.release_if_done(pool, taken)

    def release_if_done(self, pool: SlabPool, taken: set[_FileStream]) -> None:
        if self.consumed and self.pending == 0 and not self.returned:
            self.returned = True
            self.give_back.close()
            pool.release(self.slabs)
            taken.discard(self)


_Hashing = list[tuple[Hasher, memoryview | bytes]]
_Piece = tuple[memoryview | bytes, Callable[[], None] | None, _Hashing]
"""Bytes to write, what to do once they are written (give a slab back), and the files' hashing
of (parts of) them that falls to the drain."""

_DRAIN_BATCH = 64


class _HashBehind:
    """File hashing that the drain does after writing, several batches at once.

    A drain batch holds few files (the tar's order is one file after another), and the
    multi-buffer md5 hashes one stream per lane: hashed batch by batch, a 2 MiB-file archive kept
    ~5 of 16 lanes busy. So the drain writes a batch and keeps its hashing, with the callbacks
    that give the batch's slabs back, until enough streams wait to fill the lanes, enough bytes
    wait (a read window's worth: the readers keep the rest of the pool), or the drain would
    otherwise wait for pieces. The last rule means the drain never sleeps on slabs whose reader
    may need them back, so the pipeline cannot stall on it.
    """

    def __init__(self, lanes: int, max_bytes: int) -> None:
        self.lanes = lanes
        self.max_bytes = max_bytes
        self.pairs: _Hashing = []
        self.written: list[Callable[[], None]] = []
        self._streams: set[int] = set()
        self._bytes = 0

    def add(self, batch: list[_Piece]) -> None:
        """Keep the batch's hashing, and run the written callbacks of its pieces that have none."""
        for _, written, hashing in batch:
            for hasher, data in hashing:
                self.pairs.append((hasher, data))
                self._streams.add(id(hasher))
                self._bytes += len(data)
            if written is not None:
                if hashing:
                    self.written.append(written)
                else:
                    written()

    @property
    def full(self) -> bool:
        return len(self._streams) >= self.lanes or self._bytes >= self.max_bytes

    def take(self) -> tuple[_Hashing, list[Callable[[], None]]]:
        """What to hash now and the callbacks to run once it is hashed; empties the store."""
        taken = self.pairs, self.written
        self.pairs, self.written, self._streams, self._bytes = [], [], set(), 0
        return taken


class TarSink:
    """The tar stream's bytes in order, written behind the consumer by :meth:`drain`.

    Small pieces (headers, padding, small files) are coalesced into new ``bytes``; big chunks
    pass through as views of their slabs, which go back to their reader once written and
    hashed. Data given with a file hasher is hashed by the drain, many batches' streams in one
    call (:class:`_HashBehind`).
    """

    def __init__(self, writer: Writer, block_hash: Hasher, max_pending: int, hash_behind: int) -> None:
        self.writer = writer
        self.block_hash = block_hash
        self.offset = 0
        self._buf = bytearray(COALESCE_SIZE)
        self._view = memoryview(self._buf)
        self._fill = 0
        self._hash_ranges: list[tuple[Hasher, int, int]] = []
        self._send, self._recv = anyio.create_memory_object_stream[_Piece](max_pending)
        self._blocking = writer if isinstance(writer, BlockingWrites) else None
        self._behind = _HashBehind(HASH_LANES, hash_behind)

    async def put_small(self, data: bytes | memoryview, file_hash: Hasher | None = None) -> None:
        n = len(data)
        if self._fill + n > COALESCE_SIZE:
            await self.flush()
        if n >= COALESCE_SIZE:
            copy = bytes(data)
            piece: _Piece = (copy, None, [(file_hash, copy)] if file_hash is not None else [])
            await _send(self._send, piece)
        else:
            self._view[self._fill : self._fill + n] = data
            if file_hash is not None:
                self._hash_ranges.append((file_hash, self._fill, self._fill + n))
            self._fill += n
        self.offset += n

    async def put_chunk(
        self, view: memoryview, written: Callable[[], None], file_hash: Hasher | None = None
    ) -> None:
        """Queue one data chunk straight from its slab; ``written`` runs once it is written."""
        await self.flush()
        piece: _Piece = (view, written, [(file_hash, view)] if file_hash is not None else [])
        await _send(self._send, piece)
        self.offset += len(view)

    async def flush(self) -> None:
        if self._fill:
            copy = memoryview(bytes(self._view[: self._fill]))
            hashing: _Hashing = [(h, copy[start:end]) for h, start, end in self._hash_ranges]
            self._hash_ranges.clear()
            self._fill = 0
            await _send(self._send, (copy, None, hashing))

    def close(self) -> None:
        """No more pieces (after a final :meth:`flush`): :meth:`drain` finishes what it has."""
        self._send.close()

    async def drain(self) -> None:
        """Write the pieces in order, each batch of waiting pieces in one worker-thread call when
        the writer can write blocking: the batch grows when the disk or the thread hop is slow,
        so the hop's cost is spread over more bytes exactly when it matters. The same call
        hashes what :class:`_HashBehind` kept, once it is due."""
        behind = self._behind
        async with self._recv:
            while True:
                try:
                    batch = [self._recv.receive_nowait()]
                except anyio.WouldBlock:
                    await self._write_and_hash([], *behind.take())
                    try:
                        batch = [await self._recv.receive()]
                    except anyio.EndOfStream:
                        return
                except anyio.EndOfStream:
                    await self._write_and_hash([], *behind.take())
                    return
                while len(batch) < _DRAIN_BATCH:
                    try:
                        batch.append(self._recv.receive_nowait())
                    except (anyio.WouldBlock, anyio.EndOfStream):
                        break
                hashing, written = behind.take() if behind.full else ([], [])
                await self._write_and_hash(batch, hashing, written)
                behind.add(batch)

    async def _write_and_hash(
        self, batch: list[_Piece], hashing: _Hashing, written: list[Callable[[], None]]
    ) -> None:
        """Write ``batch``, hash ``hashing``, then run ``written`` (which gives slabs back)."""
        if not batch and not hashing:
            for done in written:
                done()
            return
        if self._blocking is not None:
            await anyio.to_thread.run_sync(self._write_batch, self._blocking, batch, hashing)
        else:
            if hashing:
                await anyio.to_thread.run_sync(update_many, hashing)
            for data, _, _ in batch:
                self.block_hash.update(data)
                await self.writer.write(data)
        for done in written:
            done()

    def _write_batch(self, writer: BlockingWrites, batch: list[_Piece], hashing: _Hashing) -> None:
        for data, _, _ in batch:
            self.block_hash.update(data)
            writer.write_blocking(data)
        if hashing:
            update_many(hashing)


def _views(slabs: list[bytearray], free: MemoryObjectReceiveStream[bytearray], remaining: int) -> list[memoryview]:
    """Views for the next ``remaining`` bytes over ``slabs`` and every other free slab of the file:
    one worker-thread call then reads and hashes them all (a 2 MiB file in one hop)."""
    views = [memoryview(slabs[0])[:remaining]]
    room = len(views[0])
    while room < remaining:
        try:
            slab = free.receive_nowait()
        except anyio.WouldBlock:
            break
        slabs.append(slab)
        views.append(memoryview(slab)[: remaining - room])
        room += len(views[-1])
    return views


async def _read_file(
    source: Storage, key: str, entry: FileEntry, send: MemoryObjectSendStream[tuple[bytearray, int]],
    free: MemoryObjectReceiveStream[bytearray], room: _Room, file_hash: Hasher | None,
    threads: anyio.CapacityLimiter, expect: ObjectInfo | None,
) -> None:
    """Read one file into its slabs and hash each chunk as it arrives (unless ``file_hash`` is
    None: the drain hashes), as fast as the drain gives slabs back. Hashing here, not in the
    consumer, is what lets several files' checksums run at once on both cores while the
    consumer only frames."""
    try:
        async with send, free:
            reader = None
            try:
                reader = await source.open_reader(key, expect=expect)
                # A plain attribute lookup: isinstance() on a runtime-checkable protocol costs
                # several microseconds per file.
                blocking: Callable[[memoryview], int] | None = getattr(reader, "readinto_blocking", None)
                remaining = entry.size
                while remaining > 0:
                    slabs = [await _receive(free)]
                    # Small chunks: ``readinto`` may have the bytes at hand (an S3 body that came
                    # with the answer's head) and hashing inline costs less than a thread hop.
                    if blocking is not None and min(remaining, len(slabs[0])) >= THREAD_HASH_MIN:
                        views = _views(slabs, free, remaining)
                        counts = await anyio.to_thread.run_sync(
                            fill_many_and_hash, blocking, views, file_hash, limiter=threads
                        )
                    else:
                        views = [memoryview(slabs[0])[: min(remaining, len(slabs[0]))]]
                        counts = [await fill(reader, views[0])]
                        if file_hash is not None and counts[0] >= THREAD_HASH_MIN:
                            await anyio.to_thread.run_sync(file_hash.update, views[0], limiter=threads)
                        elif file_hash is not None:
                            file_hash.update(views[0][: counts[0]])
                    for slab, view, n in zip(slabs, views, counts, strict=False):
                        if n < len(view):
                            raise SourceChangedError(
                                f"{key!r} in {source.name!r} changed while it was being read: it ended after "
                                f"{entry.size - remaining + n} of its {entry.size} bytes. Nothing read from it "
                                "was committed; archive again once the file is complete"
                            )
                        remaining -= n
                        # Never waits: the stream holds as many items as the file has slabs.
                        await _send(send, (slab, n))
            except NotFoundError:
                # Storages may open lazily, so a vanished file shows up on open or first read.
                raise MissingFileError(f"{key!r} vanished from {source.name!r} before it was archived") from None
            finally:
                if reader is not None:
                    await reader.aclose()
    finally:
        room.release()


async def _schedule(
    plan: DatablockPlan, source: Storage, prefix: str, ctx: PipelineContext, read_ahead: ReadAhead,
    files: MemoryObjectSendStream[_FileStream], tg: anyio.abc.TaskGroup, taken: set[_FileStream],
    rooms: list[_Room], listed: Mapping[str, ObjectInfo], scheduled: Callable[[], None] | None,
) -> None:
    async with files:
        for entry in plan.files:
            # Read-ahead room before slabs: a file waiting for room holds no slabs another
            # datablock could use.
            room = await read_ahead.acquire(entry.size) if entry.size else _NO_ROOM
            rooms.append(room)
            slabs = await ctx.pool.acquire(ctx.slabs_for(entry.size))
            chunks_send, chunks_recv = anyio.create_memory_object_stream[tuple[bytearray, int]](len(slabs) or 1)
            free_send, free_recv = anyio.create_memory_object_stream[bytearray](len(slabs) or 1)
            for slab in slabs:
                free_send.send_nowait(slab)
            file_hash = ctx.file_hasher()
            fs = _FileStream(entry, slabs, chunks_recv, free_send, file_hash, hashes_together(file_hash))
            taken.add(fs)
            if entry.size:
                tg.start_soon(
                    _read_file, source, join_key(prefix, entry.path), entry, chunks_send, free_recv, room,
                    None if fs.drain_hashes else file_hash, read_ahead.threads, listed.get(entry.path),
                )
            else:
                chunks_send.close()
                free_recv.close()
            await _send(files, fs)
    if scheduled is not None:
        scheduled()


@dataclass
class WrittenDatablock:
    """A committed datablock, and what its writer's read-back found."""

    datablock: Datablock
    read_back: bool | None = None
    """None: the writer did not read back (verify after the commit); True: every byte read back
    from the medium matched; False: the read-back differed."""


async def write_datablock(
    plan: DatablockPlan, source: Storage, prefix: str, sink: Storage, ctx: PipelineContext,
    transfer: Transfer | None = None, listed: Mapping[str, ObjectInfo] | None = None,
    read_ahead: ReadAhead | None = None, scheduled: Callable[[], None] | None = None,
) -> WrittenDatablock:
    """Stream the plan's files from ``source`` into one tar on ``sink`` and commit it.

    ``read_ahead`` is the window the files are read in (a new one of the context's size when
    None). ``scheduled`` is called once every file has its room in it and its reader started:
    the next datablock, given the same window, can start then. Its first files take room as
    this one's last are read, so the source is read without a pause between the two (this
    one's tail is written, committed and verified meanwhile).

    ``listed`` maps a file's path to the source's listing of it: each file is then read with
    ``expect=`` that listing, so that one that changes while it is read fails the datablock
    (:class:`~moverd.SourceChangedError`) instead of being committed truncated or mixed.

    Returns the datablock with its member index. When the sink's writer reads its bytes back
    while writing (:meth:`~moverd.Writer.read_back_into`), the result says whether they matched;
    the caller verifies after the commit otherwise (and, on a mismatch, to name the damaged
    member). On any error the sink writer is aborted, so nothing is left under the archive id
    or in temporary files.
    """
    writer = await sink.open_writer(plan.archive_id, size_hint=plan.packed_size_estimate)
    block_hash = ctx.hasher(DATABLOCK_CHECKSUM)
    read_back = ctx.hasher(DATABLOCK_CHECKSUM)
    reads_back = writer.read_back_into(read_back)
    consumed: list[_Consumed] = []
    taken: set[_FileStream] = set()  # files whose slabs are out: only those in flight
    rooms: list[_Room] = []  # read-ahead taken by this datablock's files
    window = read_ahead if read_ahead is not None else ctx.read_ahead()
    try:
        out = TarSink(writer, block_hash, ctx.pool.capacity, ctx.prefetch_bytes)
        async with anyio.create_task_group() as tg:
            tg.start_soon(out.drain)
            files_send, files_recv = anyio.create_memory_object_stream[_FileStream](ctx.prefetch_files)
            tg.start_soon(
                _schedule, plan, source, prefix, ctx, window, files_send, tg, taken, rooms, listed or {}, scheduled
            )
            try:
                async with files_recv:
                    while True:
                        try:
                            fs = await _receive(files_recv)
                        except anyio.EndOfStream:
                            break
                        consumed.append(await _consume_file(fs, out, ctx, taken, transfer))
                await out.put_small(end_of_archive(out.offset))
                await out.flush()
            finally:
                out.close()
        await writer.commit()
    except BaseException:
        for room in rooms:  # what readers that never ran hold: the window outlives this datablock
            room.release()
        with anyio.CancelScope(shield=True):
            await writer.abort()
        # A cancelled reader's or writer's worker thread may still use its slabs: never reuse those.
        for fs in taken:
            if not fs.returned:
                fs.returned = True
                ctx.pool.discard(fs.slabs)
        raise
    digest = block_hash.hexdigest()
    block = Datablock(
        archive_id=plan.archive_id, index=plan.index, size=plan.size, packed_size=out.offset,
        checksum_alg=ctx.checksum, datablock_checksum=f"{DATABLOCK_CHECKSUM}:{digest}",
        members=[c.member() for c in consumed], object_checksum=writer.object_checksum(),
        verified_by=sink.verification,
    )
    return WrittenDatablock(block, read_back=(read_back.hexdigest() == digest) if reads_back else None)


@dataclass
class _Consumed:
    """A framed file; its checksum is final once the drain wrote its data. Holds no more than
    that: one per member lives until the datablock is committed."""

    entry: FileEntry
    file_hash: Hasher
    header_offset: int
    data_offset: int

    def member(self) -> Member:
        entry = self.entry
        return Member(
            path=entry.path, size=entry.size, offset=self.data_offset, header_offset=self.header_offset,
            mtime=entry.mtime, mode=entry.mode, uid=entry.uid, gid=entry.gid,
            checksum=self.file_hash.hexdigest(),
        )


async def _consume_file(
    fs: _FileStream, out: TarSink, ctx: PipelineContext, taken: set[_FileStream], transfer: Transfer | None
) -> _Consumed:
    entry = fs.entry
    file_hash = fs.file_hash if fs.drain_hashes else None
    header_offset = out.offset
    await out.put_small(
        member_header(entry.path, entry.size, mtime=entry.mtime, mode=entry.mode, uid=entry.uid, gid=entry.gid)
    )
    data_offset = out.offset
    async with fs.chunks:
        while True:
            try:
                slab, n = await _receive(fs.chunks)
            except anyio.EndOfStream:
                break
            view = memoryview(slab)[:n]
            if n >= THREAD_HASH_MIN:
                fs.pending += 1
                await out.put_chunk(view, functools.partial(fs.chunk_written, slab, ctx.pool, taken), file_hash)
            else:
                await out.put_small(view, file_hash)
                fs.give_back_slab(slab)
            if transfer is not None:
                transfer.bytes_done += n
    fs.consumed = True
    fs.release_if_done(ctx.pool, taken)
    await out.put_small(padding(entry.size))
    if transfer is not None:
        transfer.files_done += 1
    return _Consumed(entry, fs.file_hash, header_offset, data_offset)
