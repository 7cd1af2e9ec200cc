"""The embedded default catalog: SQLite in the state directory.

It keeps what SciCat keeps for the archiver (datasets, their files, their datablocks, jobs and
their status) behind the same :class:`~moverd.catalog.Catalog` methods, plus the few calls a
catalog-less installation needs to create datasets and jobs itself (``moverd archive ./folder``).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import anyio

from ..catalog import Catalog
from ..errors import UnknownDatasetError, UnknownJobError, UserError
from ..hookspecs import hookimpl
from ..models import (
    Datablock,
    Dataset,
    Download,
    FileEntry,
    Job,
    JobDataset,
    JobOwner,
    JobStatus,
    JobType,
    LifecycleUpdate,
)
from ..options import Options
from ..registry import CatalogType, Context

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS datasets (
    pid TEXT PRIMARY KEY, source_folder TEXT, size INTEGER, number_of_files INTEGER,
    lifecycle TEXT NOT NULL DEFAULT '{}', created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS files (
    pid TEXT NOT NULL REFERENCES datasets(pid) ON DELETE CASCADE, path TEXT NOT NULL,
    size INTEGER NOT NULL, mtime REAL, mode INTEGER, uid INTEGER, gid INTEGER, checksum TEXT,
    PRIMARY KEY (pid, path)
);
CREATE TABLE IF NOT EXISTS datablocks (
    id TEXT PRIMARY KEY, pid TEXT NOT NULL REFERENCES datasets(pid) ON DELETE CASCADE,
    archive_id TEXT NOT NULL UNIQUE, body TEXT NOT NULL, created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, type TEXT NOT NULL, datasets TEXT NOT NULL, status TEXT NOT NULL,
    message TEXT NOT NULL DEFAULT '', result TEXT NOT NULL DEFAULT '{}',
    created REAL NOT NULL, updated REAL NOT NULL
);
"""


class LocalCatalogOptions(Options):
    path: Path | None = None
    """SQLite file; default ``<state dir>/catalog.sqlite``."""


class LocalCatalog(Catalog):
    type_name = "local"
    local_folders = True

    def __init__(self, path: Path) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, check_same_thread=False, timeout=30, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.executescript(_SCHEMA)
            self._conn = conn
        return self._conn

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def call() -> T:
            with self._lock:
                db = self._db()
                db.execute("BEGIN IMMEDIATE")
                try:
                    out = fn(db)
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
                db.execute("COMMIT")
                return out

        return await anyio.to_thread.run_sync(call)

    async def aclose(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await anyio.to_thread.run_sync(conn.close)

    async def check(self) -> None:
        await self._run(lambda db: db.execute("SELECT 1").fetchone())

    # -- datasets ------------------------------------------------------------------------------

    async def create_dataset(
        self, files: list[FileEntry], *, source_folder: str | None = None, pid: str | None = None
    ) -> Dataset:
        pid = pid or f"local/{uuid.uuid4()}"
        size = sum(f.size for f in files)

        def tx(db: sqlite3.Connection) -> None:
            if db.execute("SELECT 1 FROM datasets WHERE pid=?", (pid,)).fetchone():
                raise UserError(f"dataset {pid!r} exists already")
            db.execute(
                "INSERT INTO datasets (pid, source_folder, size, number_of_files, lifecycle, created)"
                " VALUES (?,?,?,?,?,?)",
                (pid, source_folder, size, len(files), json.dumps({"archivable": True}), time.time()),
            )
            db.executemany(
                "INSERT INTO files (pid, path, size, mtime, mode, uid, gid, checksum) VALUES (?,?,?,?,?,?,?,?)",
                [(pid, f.path, f.size, f.mtime, f.mode, f.uid, f.gid, f.checksum) for f in files],
            )

        await self._run(tx)
        return await self.get_dataset(pid)

    async def find_datasets(self, *, source_folder: str) -> list[Dataset]:
        rows = await self._run(
            lambda db: db.execute(
                "SELECT pid, source_folder, size, number_of_files, lifecycle FROM datasets"
                " WHERE source_folder=? ORDER BY created", (source_folder,)
            ).fetchall()
        )
        return [self._dataset(r) for r in rows]

    async def list_datasets(self) -> list[Dataset]:
        rows = await self._run(
            lambda db: db.execute(
                "SELECT pid, source_folder, size, number_of_files, lifecycle FROM datasets ORDER BY created"
            ).fetchall()
        )
        return [self._dataset(r) for r in rows]

    @staticmethod
    def _dataset(row: tuple[Any, ...]) -> Dataset:
        return Dataset(
            pid=row[0], source_folder=row[1], size=row[2], number_of_files=row[3],
            lifecycle=json.loads(row[4]),
        )

    async def get_dataset(self, pid: str) -> Dataset:
        row = await self._run(
            lambda db: db.execute(
                "SELECT pid, source_folder, size, number_of_files, lifecycle FROM datasets WHERE pid=?", (pid,)
            ).fetchone()
        )
        if row is None:
            raise UnknownDatasetError(f"dataset {pid!r} not found in the local catalog")
        return self._dataset(row)

    async def list_files(self, pid: str) -> list[FileEntry]:
        await self.get_dataset(pid)
        rows = await self._run(
            lambda db: db.execute(
                "SELECT path, size, mtime, mode, uid, gid, checksum FROM files WHERE pid=? ORDER BY path", (pid,)
            ).fetchall()
        )
        return [
            FileEntry(path=r[0], size=r[1], mtime=r[2] or 0.0, mode=r[3], uid=r[4], gid=r[5], checksum=r[6])
            for r in rows
        ]

    async def update_lifecycle(self, pid: str, update: LifecycleUpdate) -> None:
        fields = update.fields()

        def tx(db: sqlite3.Connection) -> None:
            row = db.execute("SELECT lifecycle FROM datasets WHERE pid=?", (pid,)).fetchone()
            if row is None:
                raise UnknownDatasetError(f"dataset {pid!r} not found in the local catalog")
            merged = {**json.loads(row[0]), **fields}
            db.execute("UPDATE datasets SET lifecycle=? WHERE pid=?", (json.dumps(merged), pid))

        await self._run(tx)

    # -- datablocks ----------------------------------------------------------------------------

    async def register_datablock(self, pid: str, datablock: Datablock) -> str:
        body = datablock.model_dump_json(exclude={"catalog_id"})

        def tx(db: sqlite3.Connection) -> str:
            if db.execute("SELECT 1 FROM datasets WHERE pid=?", (pid,)).fetchone() is None:
                raise UnknownDatasetError(f"dataset {pid!r} not found in the local catalog")
            row = db.execute("SELECT id FROM datablocks WHERE archive_id=?", (datablock.archive_id,)).fetchone()
            if row is not None:  # registered by an earlier attempt: never twice
                return str(row[0])
            new_id = str(uuid.uuid4())
            db.execute(
                "INSERT INTO datablocks (id, pid, archive_id, body, created) VALUES (?,?,?,?,?)",
                (new_id, pid, datablock.archive_id, body, time.time()),
            )
            return new_id

        return await self._run(tx)

    async def list_datablocks(self, pid: str) -> list[Datablock]:
        await self.get_dataset(pid)
        rows = await self._run(
            lambda db: db.execute(
                "SELECT id, body FROM datablocks WHERE pid=? ORDER BY archive_id", (pid,)
            ).fetchall()
        )
        return [Datablock.model_validate({**json.loads(body), "catalog_id": id_}) for id_, body in rows]

    async def delete_datablock(self, pid: str, catalog_id: str) -> None:
        await self._run(lambda db: db.execute("DELETE FROM datablocks WHERE pid=? AND id=?", (pid, catalog_id)))

    # -- jobs ------------------------------------------------------------------------------------

    async def create_job(self, type_: JobType, datasets: list[JobDataset], job_id: str | None = None,
                         owner: JobOwner | None = None) -> Job:
        job = Job(id=job_id or str(uuid.uuid4()), type=type_, datasets=datasets)
        now = time.time()
        await self._run(
            lambda db: db.execute(
                "INSERT INTO jobs (id, type, datasets, status, created, updated) VALUES (?,?,?,?,?,?)",
                (job.id, job.type.value, json.dumps([d.model_dump() for d in datasets]), job.status, now, now),
            )
        )
        return job

    async def get_job(self, job_id: str) -> Job:
        row = await self._run(
            lambda db: db.execute(
                "SELECT id, type, datasets, status, result FROM jobs WHERE id=?", (job_id,)
            ).fetchone()
        )
        if row is None:
            raise UnknownJobError(f"job {job_id!r} not found in the local catalog")
        return Job(
            id=row[0], type=JobType(row[1]), datasets=[JobDataset(**d) for d in json.loads(row[2])],
            status=row[3], result=json.loads(row[4]),
        )

    async def list_jobs(self, status: str | None = None) -> list[Job]:
        rows = await self._run(
            lambda db: db.execute(
                "SELECT id FROM jobs WHERE ? IS NULL OR status=? ORDER BY created", (status, status)
            ).fetchall()
        )
        return [await self.get_job(r[0]) for r in rows]

    async def set_job_status(
        self, job_id: str, status: str, message: str = "", downloads: list[Download] | None = None
    ) -> None:
        result = None if downloads is None else {"downloads": [d.model_dump() for d in downloads]}

        def tx(db: sqlite3.Connection) -> None:
            cur = db.execute(
                "UPDATE jobs SET status=?, message=?, result=COALESCE(?, result), updated=? WHERE id=?",
                (status, message, json.dumps(result) if result is not None else None, time.time(), job_id),
            )
            if cur.rowcount == 0:
                raise UnknownJobError(f"job {job_id!r} not found in the local catalog")

        await self._run(tx)


def _create(options: LocalCatalogOptions, ctx: Context) -> LocalCatalog:
    return LocalCatalog(options.path.expanduser() if options.path else ctx.state_dir / "catalog.sqlite")


@hookimpl
def register_catalogs(register: Callable[[CatalogType], None]) -> None:
    register(CatalogType(
        name="local", options=LocalCatalogOptions, create=_create,
        description="SQLite catalog in the state directory (the embedded default)",
    ))


__all__ = ["JobStatus", "LocalCatalog"]
