"""What this daemon took on, on disk, so that a crash or a restart does not lose a job.

One SQLite row per job the daemon accepted (embedded) or claimed from a work pool (scale-out),
with the flow run it belongs to. A row leaves the ``queued``/``running`` states only when the job
ended (whatever its outcome); whatever is still queued or running at the next start was
interrupted and is picked up again (:meth:`interrupted`). A datablock interrupted halfway is never
trusted: the core aborts or later removes its temporary file and writes it again.

Recent retrieve jobs are also what the retrieval cleanup looks at: a copy reused by a later job
got fresh links, so its age alone does not say that its links expired. Ended jobs are forgotten
after ``scheduler.journal_retention`` (:meth:`prune`), so the file does not grow for ever.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import anyio

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY, type TEXT NOT NULL, flow_run_id TEXT NOT NULL, flow_run_name TEXT NOT NULL,
    state TEXT NOT NULL, datasets TEXT NOT NULL DEFAULT '[]', message TEXT NOT NULL DEFAULT '',
    submitted REAL NOT NULL, started REAL, finished REAL, attempts INTEGER NOT NULL DEFAULT 1
);
"""

OPEN_STATES = ("queued", "running")


@dataclass
class Entry:
    job_id: str
    type: str
    flow_run_id: str
    flow_run_name: str
    state: str
    datasets: list[str]
    message: str
    submitted: float
    started: float | None
    finished: float | None
    attempts: int


class SqliteFile:
    """A small SQLite file of the daemon's state; every call runs in a worker thread (the file may
    be on slow disk), one at a time."""

    schema = ""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(self.schema)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def call() -> T:
            with self._lock:
                return fn(self._db)

        return await anyio.to_thread.run_sync(call)


class Journal(SqliteFile):
    """The jobs this daemon took."""

    schema = _SCHEMA

    async def record(self, job_id: str, job_type: str, flow_run_id: str, flow_run_name: str,
                     state: str = "queued", datasets: list[str] | None = None) -> None:
        """A job accepted or claimed: a new row, or a new attempt on the old one."""
        now = time.time()
        await self._run(lambda db: db.execute(
            "INSERT INTO jobs (job_id, type, flow_run_id, flow_run_name, state, datasets, submitted) "
            "VALUES (?,?,?,?,?,?,?) ON CONFLICT(job_id) DO UPDATE SET type=excluded.type, "
            "flow_run_id=excluded.flow_run_id, flow_run_name=excluded.flow_run_name, state=excluded.state, "
            "datasets=excluded.datasets, submitted=excluded.submitted, started=NULL, finished=NULL, "
            "message='', attempts=jobs.attempts + 1",
            (job_id, job_type, flow_run_id, flow_run_name, state, json.dumps(datasets or []), now),
        ))

    async def set_state(self, job_id: str, state: str, message: str = "", **extra: Any) -> None:
        now = time.time()
        started = now if state == "running" else None
        finished = now if state not in OPEN_STATES else None
        datasets = json.dumps(extra["datasets"]) if "datasets" in extra else None
        await self._run(lambda db: db.execute(
            "UPDATE jobs SET state=?, message=?, started=COALESCE(?, started), finished=COALESCE(?, finished), "
            "datasets=COALESCE(?, datasets) WHERE job_id=?",
            (state, message, started, finished, datasets, job_id),
        ))

    async def get(self, job_id: str) -> Entry | None:
        rows = await self._query("WHERE job_id=?", (job_id,))
        return rows[0] if rows else None

    async def interrupted(self) -> list[Entry]:
        """Jobs that were queued or running when the previous process ended."""
        return await self._query(f"WHERE state IN {OPEN_STATES!r} ORDER BY submitted", ())

    async def retrievals_since(self, since: float) -> list[Entry]:
        """Retrieve jobs that ended after ``since`` (their links are still valid)."""
        return await self._query("WHERE type='retrieve' AND finished IS NOT NULL AND finished >= ?", (since,))

    async def prune(self, ended_before: float) -> int:
        """Forget the jobs that ended before ``ended_before``; open ones are always kept."""
        return await self._run(lambda db: db.execute(
            f"DELETE FROM jobs WHERE state NOT IN {OPEN_STATES!r} AND finished IS NOT NULL AND finished < ?",
            (ended_before,),
        ).rowcount)

    async def _query(self, where: str, args: tuple[Any, ...]) -> list[Entry]:
        cols = ("job_id, type, flow_run_id, flow_run_name, state, datasets, message, submitted, started, "
                "finished, attempts")
        rows = await self._run(lambda db: db.execute(f"SELECT {cols} FROM jobs {where}", args).fetchall())
        return [Entry(r[0], r[1], r[2], r[3], r[4], json.loads(r[5]), r[6], r[7], r[8], r[9], r[10]) for r in rows]
