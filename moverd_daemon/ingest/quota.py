"""The landing zone's quota: space reserved per dataset, persisted, and checked against what the
landing storage really holds.

A grant reserves an upper bound of the dataset's size. What counts against the limit is what is
stored plus, for every dataset still uploading, the part of its reservation not yet stored (its
uploaded bytes count once, not twice). Grants are made one at a time inside the process (a lock
around the check and the insert) and inside one SQLite write transaction, so that concurrent
requests cannot both see the same free space. Reservations end at finalize or abort, or expire
``reservation_ttl`` after they were made.

What is stored is read by listing the whole landing zone, which for a large one takes long. A
listing serves later grants for :data:`SCAN_TTL` seconds while no reservation it saw has ended
or shrunk since, because then it can only over-count: bytes deleted since (archived datasets)
still count; bytes uploaded since under a reservation it saw count once, inside that
reservation; a dataset reserved since counts its whole reservation beside whatever it had
stored (twice, at worst). A reservation that ended would let its stored bytes drop out of the
count unseen, so any such change means a new listing, and so does a grant the old listing would
refuse: a refusal is always decided on a fresh one.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass

import anyio

from moverd import Storage

from ..journal import SqliteFile

_SCHEMA = """
CREATE TABLE IF NOT EXISTS reservations (
    pid TEXT PRIMARY KEY, prefix TEXT NOT NULL, bytes INTEGER NOT NULL, created REAL NOT NULL, expires REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS finalized (
    pid TEXT PRIMARY KEY, job_id TEXT, finalized REAL NOT NULL
);
"""


@dataclass(frozen=True)
class Reservation:
    pid: str
    prefix: str
    bytes: int
    created: float
    expires: float


@dataclass(frozen=True)
class Usage:
    """The quota at one moment, in bytes; ``limit`` and ``free`` are None without a limit."""

    used: int
    reserved: int
    limit: int | None

    @property
    def free(self) -> int | None:
        return None if self.limit is None else max(0, self.limit - self.used - self.reserved)


SCAN_TTL = 10.0
"""Seconds a listing of the landing zone serves later grants (see the module docstring)."""


@dataclass(frozen=True)
class _Scan:
    """One listing of the landing zone, and the reservations there were when it was made."""

    at: float
    total: int
    under: dict[str, int]
    seen: dict[str, tuple[str, int]]

    def serves(self, current: list[Reservation], now: float, replacing: str | None = None) -> bool:
        """Whether it may stand for a new listing: young enough, and every reservation it saw
        (but ``replacing``'s, which the grant counts itself) still there, for the same folder,
        at least as large."""
        if now - self.at >= SCAN_TTL:
            return False
        have = {r.pid: (r.prefix, r.bytes) for r in current}
        return all(pid in have and have[pid][0] == prefix and have[pid][1] >= size
                   for pid, (prefix, size) in self.seen.items() if pid != replacing)


class _StaleScanError(Exception):
    """A reservation the listing saw ended while a grant was being made on it: list again."""


Check = Callable[[list[Reservation]], None]
"""Raises :class:`NoLandingSpaceError` when a reservation does not fit beside the others it is given."""


class NoLandingSpaceError(Exception):
    """Not enough landing space for the request."""

    def __init__(self, usage: Usage, requested: int) -> None:
        super().__init__(f"{requested} bytes requested, {usage.free} free")
        self.usage, self.requested = usage, requested


class IngestState(SqliteFile):
    """Reservations, and the datasets already finalized (finalize is idempotent)."""

    schema = _SCHEMA

    async def reservations(self, now: float | None = None) -> list[Reservation]:
        now = time.time() if now is None else now
        rows = await self._run(lambda db: db.execute(
            "SELECT pid, prefix, bytes, created, expires FROM reservations WHERE expires > ?", (now,)).fetchall())
        return [Reservation(*r) for r in rows]

    async def reservation(self, pid: str) -> Reservation | None:
        rows = await self._run(lambda db: db.execute(
            "SELECT pid, prefix, bytes, created, expires FROM reservations WHERE pid=? AND expires > ?",
            (pid, time.time())).fetchall())
        return Reservation(*rows[0]) if rows else None

    async def reserve_if(self, pid: str, prefix: str, size: int, ttl: float,
                         fits: Check) -> None:
        """Insert (or replace) ``pid``'s reservation when ``fits(others)`` agrees, in one write
        transaction; ``others`` are the unexpired reservations of other datasets."""
        now = time.time()

        def txn(db: sqlite3.Connection) -> None:
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute("DELETE FROM reservations WHERE expires <= ?", (now,))
                rows = db.execute("SELECT pid, prefix, bytes, created, expires FROM reservations WHERE pid != ?",
                                  (pid,)).fetchall()
                fits([Reservation(*r) for r in rows])
                db.execute("INSERT INTO reservations (pid, prefix, bytes, created, expires) VALUES (?,?,?,?,?) "
                           "ON CONFLICT(pid) DO UPDATE SET prefix=excluded.prefix, bytes=excluded.bytes, "
                           "created=excluded.created, expires=excluded.expires", (pid, prefix, size, now, now + ttl))
                db.execute("DELETE FROM finalized WHERE pid=?", (pid,))
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

        await self._run(txn)

    async def release(self, pid: str) -> bool:
        return bool(await self._run(lambda db: db.execute("DELETE FROM reservations WHERE pid=?", (pid,)).rowcount))

    async def finalized(self, pid: str) -> tuple[str | None] | None:
        """``(job id or None,)`` when ``pid`` was finalized, else None."""
        rows = await self._run(lambda db: db.execute("SELECT job_id FROM finalized WHERE pid=?", (pid,)).fetchall())
        return (rows[0][0],) if rows else None

    async def mark_finalized(self, pid: str, job_id: str | None) -> None:
        await self._run(lambda db: db.execute(
            "INSERT INTO finalized (pid, job_id, finalized) VALUES (?,?,?) ON CONFLICT(pid) DO UPDATE SET "
            "job_id=COALESCE(excluded.job_id, finalized.job_id)", (pid, job_id, time.time())))
        await self.release(pid)


class LandingQuota:
    """Grants landing space against ``limit`` (None: the storage's own free space, if it tells)."""

    def __init__(self, storage: Storage, state: IngestState, *, limit: int | None, ttl: float) -> None:
        self.storage, self.state, self.limit, self.ttl = storage, state, limit, ttl
        self._lock = anyio.Lock()
        self.last: Usage | None = None
        self._scanned: _Scan | None = None

    async def _scan(self, prefixes: list[str], current: list[Reservation]) -> _Scan:
        """Bytes stored in the landing zone, and under each of ``prefixes`` (kept for later grants)."""
        at = time.monotonic()
        total = 0
        under = dict.fromkeys(prefixes, 0)
        folders = [(p, p.rstrip("/") + "/") for p in prefixes]
        async for info in self.storage.list(""):
            total += info.size
            for prefix, folder in folders:
                if info.key.startswith(folder):
                    under[prefix] += info.size
        self._scanned = _Scan(at, total, under, {r.pid: (r.prefix, r.bytes) for r in current})
        return self._scanned

    async def _limit(self, used: int) -> int | None:
        if self.limit is not None:
            return self.limit
        free = await self.storage.free_space()
        return None if free is None else free + used

    async def usage(self) -> Usage:
        """The quota now, from a fresh listing (the metrics)."""
        async with self._lock:
            reservations = await self.state.reservations()
            scan = await self._scan([r.prefix for r in reservations], reservations)
        reserved = sum(max(0, r.bytes - scan.under[r.prefix]) for r in reservations)
        self.last = Usage(scan.total, reserved, await self._limit(scan.total))
        return self.last

    async def reserve(self, pid: str, prefix: str, size: int) -> Usage:
        """Reserve ``size`` bytes for ``pid`` (replacing its earlier reservation) or raise NoLandingSpaceError."""
        async with self._lock:
            current = await self.state.reservations()
            earlier = self._scanned
            if earlier is not None and earlier.serves(current, time.monotonic()):
                try:
                    return await self._grant(pid, prefix, size, earlier, reused=True)
                except (NoLandingSpaceError, _StaleScanError):
                    current = await self.state.reservations()  # refused on an earlier listing: list again
            scan = await self._scan([prefix, *(r.prefix for r in current)], current)
            return await self._grant(pid, prefix, size, scan, reused=False)

    async def _grant(self, pid: str, prefix: str, size: int, scan: _Scan, *, reused: bool) -> Usage:
        """The grant on ``scan``; a ``reused`` one is checked again inside the write transaction
        (a reservation that ended since, in another task's finalize, makes it stale)."""
        used, under = scan.total, scan.under
        limit = await self._limit(used)
        result: list[Usage] = []

        def fits(others: list[Reservation]) -> None:
            if reused and not scan.serves(others, time.monotonic(), replacing=pid):
                raise _StaleScanError
            # a folder the listing did not sum (reserved since) counts as holding nothing
            reserved = sum(max(0, r.bytes - under.get(r.prefix, 0)) for r in others)
            mine = max(0, size - under.get(prefix, 0))
            usage = Usage(used, reserved, limit)
            if limit is not None and used + reserved + mine > limit:
                raise NoLandingSpaceError(usage, size)
            result.append(Usage(used, reserved + mine, limit))

        try:
            await self.state.reserve_if(pid, prefix, size, self.ttl, fits)
        except NoLandingSpaceError as exc:
            self.last = exc.usage
            raise
        self.last = result[0]
        return self.last
