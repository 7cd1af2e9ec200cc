"""Whole-datablock copies between storages (LTS → retrieval bucket), verified while streaming."""

from __future__ import annotations

from ..app import App
from ..datablocks import copy_range_verified
from ..events import Transfer
from ..models import Datablock
from ..storage import Storage


async def copy_datablock(
    app: App, source: Storage, block: Datablock, target: Storage, key: str, transfer: Transfer | None = None
) -> None:
    """Stream the tar from ``source`` to ``key`` on ``target``; publish only if its whole-datablock
    checksum matched. The caller holds the source's read slot."""
    alg, _, expected = block.datablock_checksum.partition(":")
    await source.ensure_online(block.archive_id)
    await copy_range_verified(
        source, block.archive_id, 0, block.packed_size, target, key, alg=alg, expected=expected,
        hasher=app.registry.hasher, pool=app.pool,
        what=f"datablock {block.archive_id!r} read from {source.name!r}", transfer=transfer,
    )
