"""Whole-datablock copies between storages (LTS → retrieval bucket), verified while streaming."""

from __future__ import annotations

import anyio

from ..app import App
from ..checksums import Hasher
from ..datablocks import stream_range
from ..errors import VerificationError
from ..events import Transfer
from ..models import Datablock
from ..storage import Storage


async def copy_datablock(
    app: App, source: Storage, block: Datablock, target: Storage, key: str, transfer: Transfer | None = None
) -> None:
    """Stream the tar from ``source`` to ``key`` on ``target``; publish only if its whole-datablock
    checksum matched. The caller holds the source's read slot."""
    alg, _, expected = block.datablock_checksum.partition(":")
    h: Hasher = app.registry.hasher(alg)
    await source.ensure_online(block.archive_id)
    writer = await target.open_writer(key, size_hint=block.packed_size)

    async def consume(view: memoryview) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(anyio.to_thread.run_sync, h.update, view)
            await writer.write(view)
        if transfer is not None:
            transfer.bytes_done += len(view)

    try:
        await stream_range(source, block.archive_id, 0, block.packed_size, app.pool, consume)
        if h.hexdigest() != expected:
            raise VerificationError(
                f"datablock {block.archive_id!r} read from {source.name!r} does not match its checksum "
                f"({alg} {h.hexdigest()} != {expected}); not copied"
            )
        await writer.commit()
    except BaseException:
        with anyio.CancelScope(shield=True):
            await writer.abort()
        raise
