"""Verify a dataset in place: every datablock read back from the LTS and checked, or, on an LTS
that cannot be read without a restore, its reported checksum compared with the recorded one."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..app import App
from ..datablocks import verify_datablock
from ..errors import VerificationError
from ..events import Transfer
from .observed import observed
from .retrieve import load_indexes


@dataclass
class VerifyResult:
    pid: str
    ok: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    """archive id → what is wrong (naming the damaged member when it can)."""
    verified_by: dict[str, str] = field(default_factory=dict)
    """archive id → how it was verified: ``read-back`` or ``server-checksum``."""


async def verify_dataset(app: App, pid: str, transfer: Transfer | None = None) -> VerifyResult:
    """Check every datablock; a damaged one is reported, the others are still checked."""
    lts = app.storage("lts")
    blocks = await load_indexes(app, pid)
    transfer = transfer or Transfer(kind="verify", dataset=pid)
    transfer.bytes_total = sum(b.packed_size for b in blocks)
    transfer.datablocks_total = len(blocks)
    result = VerifyResult(pid=pid)
    with observed(app, transfer) as outcome:
        for block in blocks:
            try:
                async with app.slot(lts, "read"):
                    how = await verify_datablock(lts, block, app.registry.hasher, app.pool, transfer)
            except VerificationError as exc:
                result.failed[block.archive_id] = str(exc)
            else:
                result.ok.append(block.archive_id)
                result.verified_by[block.archive_id] = how
                app.observers.datablock_verified(transfer=transfer, datablock=block)
            transfer.datablocks_done += 1
        if result.failed:
            outcome.fail(VerificationError("; ".join(result.failed.values())))
    return result
