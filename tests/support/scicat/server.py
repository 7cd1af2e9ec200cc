"""A SciCat-compatible HTTP server for tests: uvicorn in a background thread on 127.0.0.1.

Use it through the ``scicat`` fixture (``tests/support/scicat/fixtures.py``), which gives each
test a fresh state. Test setup goes through plain methods (``add_dataset``, ``add_job``,
``add_user``); the code under test talks HTTP to :attr:`SciCatServer.url`.

Fault controls: :meth:`fail_next` (bursts of 503 or any status, optionally for one method/path),
:meth:`slow`, :meth:`expire_tokens`, :meth:`down` / :meth:`up`. Every request is in :attr:`calls`.
"""

from __future__ import annotations

import copy
import re
import socket
import threading
import time
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

import uvicorn

from .app import Call, FaultRule, Faults, SciCatApp
from .store import Permissions, Store

ARCHIVER = ("archiver", "archiver-password")
"""The archiver's account: in ADMIN_GROUPS (``admin``) and DELETE_GROUPS (``archivemanager``)."""
INGESTOR = ("ingestor", "ingestor-password")
OWNER = ("owner", "owner-password")
OWNER_GROUP = "p12345"

FileSpec = dict[str, Any] | tuple[str, int] | str


def _file(spec: FileSpec, default_time: str) -> dict[str, Any]:
    """A DataFile dict from ``"path"``, ``("path", size)`` or a dict (missing fields filled in)."""
    if isinstance(spec, str):
        spec = {"path": spec, "size": 0}
    elif isinstance(spec, tuple):
        spec = {"path": spec[0], "size": spec[1]}
    f = dict(spec)
    f.setdefault("size", 0)
    f.setdefault("time", default_time)
    f.setdefault("uid", "1000")
    f.setdefault("gid", "1000")
    f.setdefault("perm", "-rw-r--r--")
    return f


class SciCatServer:
    def __init__(self) -> None:
        self._lock = threading.RLock()
        self.app = SciCatApp(self._lock)
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.port = 0
        self.reset()

    # -- lifecycle ------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:43121`` (no trailing slash, no ``/api``)."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> SciCatServer:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app, log_level="warning", lifespan="off", access_log=False, timeout_keep_alive=30,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name="fake-scicat", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("fake SciCat server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout=10)
        self._server = self._thread = None

    def reset(self) -> None:
        """Forget everything: data, tokens, faults, calls; recreate the default accounts."""
        with self._lock:
            app = self.app
            app.store = Store()
            app.faults = Faults()
            app.calls.clear()
            app.store.add_user(*ARCHIVER, ["admin", "archivemanager"])
            app.store.add_user(*INGESTOR, ["ingestor", OWNER_GROUP])
            app.store.add_user(*OWNER, [OWNER_GROUP])

    # -- configuration --------------------------------------------------------------------------

    @property
    def token_ttl(self) -> float:
        return self.app.store.token_ttl

    @token_ttl.setter
    def token_ttl(self, seconds: float) -> None:
        """Lifetime of tokens issued from now on (login's ``expires_in``)."""
        with self._lock:
            self.app.store.token_ttl = seconds

    @property
    def permissions(self) -> Permissions:
        """ADMIN_GROUPS, DELETE_GROUPS, ... and the job ``update.auth`` (mutable)."""
        return self.app.store.perms

    # -- test setup -----------------------------------------------------------------------------

    def add_user(self, username: str, password: str, groups: Sequence[str] = ()) -> None:
        with self._lock:
            self.app.store.add_user(username, password, list(groups))

    def add_dataset(
        self,
        files: Iterable[FileSpec] | None = None,
        *,
        pid: str | None = None,
        origdatablocks: Sequence[Iterable[FileSpec]] | None = None,
        owner_group: str = OWNER_GROUP,
        access_groups: Sequence[str] = (),
        type: str = "raw",  # SciCat's field name
        source_folder: str | None = None,
        lifecycle: dict[str, Any] | None = None,
        chk_alg: str | None = None,
        file_time: str | float | datetime = "2024-05-01T12:00:00Z",
        **extra: Any,
    ) -> str:
        """Create a dataset with its OrigDatablocks; return its pid (``<prefix>/<uuid>``).

        ``files`` makes one OrigDatablock; ``origdatablocks`` (a list of file lists) makes several.
        A file is ``"path"``, ``("path", size)`` or a DataFile dict.
        """
        t = file_time if isinstance(file_time, str) else (
            datetime.fromtimestamp(file_time, UTC).isoformat() if isinstance(file_time, (int, float))
            else file_time.isoformat()
        )
        blocks: list[list[dict[str, Any]]] = []
        if files is not None:
            blocks.append([_file(f, t) for f in files])
        for block in origdatablocks or []:
            blocks.append([_file(f, t) for f in block])
        with self._lock:
            return self.app.store.add_dataset(
                pid=pid, pid_prefix=self.app.pid_prefix, owner_group=owner_group,
                access_groups=list(access_groups), type_=type, source_folder=source_folder,
                lifecycle=lifecycle, origdatablocks=blocks, chk_alg=chk_alg, extra=extra,
            )

    def add_job(
        self,
        type: str,  # SciCat's field name
        datasets: Sequence[str | tuple[str, Sequence[str]] | dict[str, Any]],
        *,
        job_id: str | None = None,
        owner_user: str = OWNER[0],
        owner_group: str | None = None,
        job_params: dict[str, Any] | None = None,
        status_code: str = "jobSubmitted",
        status_message: str = "Job submitted.",
    ) -> str:
        """Store a job as ``POST /api/v4/jobs`` would (readable through v3 and v4); return its id.

        A dataset is a pid (whole dataset), ``(pid, [files])`` or a raw ``datasetList`` entry
        (stored as given, to test malformed lists).
        """
        entries: list[Any] = []
        for d in datasets:
            if isinstance(d, str):
                entries.append({"pid": d, "files": []})
            elif isinstance(d, tuple):
                entries.append({"pid": d[0], "files": list(d[1])})
            else:
                entries.append(copy.deepcopy(d))
        with self._lock:
            store = self.app.store
            if owner_group is None:
                first = entries[0].get("pid") if entries and isinstance(entries[0], dict) else None
                owner_group = store.datasets[first]["ownerGroup"] if first in store.datasets else OWNER_GROUP
            job = store.add_job(
                type_=type, job_params={**(job_params or {}), "datasetList": entries},
                owner_user=owner_user, owner_group=owner_group, contact_email=f"{owner_user}@example.org",
                status_code=status_code, status_message=status_message, job_id=job_id,
                created_by=owner_user,
            )
            return str(job["id"])

    # -- inspection -----------------------------------------------------------------------------

    def dataset(self, pid: str) -> dict[str, Any]:
        with self._lock:
            return copy.deepcopy(self.app.store.datasets[pid])

    def lifecycle(self, pid: str) -> dict[str, Any]:
        lifecycle: dict[str, Any] = self.dataset(pid)["datasetlifecycle"]
        return lifecycle

    def datablocks(self, pid: str) -> list[dict[str, Any]]:
        with self._lock:
            return copy.deepcopy(self.app.store.datablocks_of(pid))

    def origdatablocks(self, pid: str) -> list[dict[str, Any]]:
        with self._lock:
            return copy.deepcopy(self.app.store.origdatablocks_of(pid))

    def job(self, job_id: str) -> dict[str, Any]:
        """The stored job document (v4 shape)."""
        with self._lock:
            return copy.deepcopy(self.app.store.jobs[job_id])

    @property
    def calls(self) -> list[Call]:
        with self._lock:
            return list(self.app.calls)

    def clear_calls(self) -> None:
        with self._lock:
            self.app.calls.clear()

    def requests(
        self, method: str | None = None, route: str | None = None, *, faults: bool = False
    ) -> list[Call]:
        """Recorded calls, filtered by method and by route template (``/api/v3/jobs/{id}``) or a
        substring of it; injected faults are left out unless ``faults``."""
        out = []
        for c in self.calls:
            if method and c.method != method.upper():
                continue
            if route and (c.route is None or route not in c.route):
                continue
            if c.fault and not faults:
                continue
            out.append(c)
        return out

    def sequence(self, *, logins: bool = True) -> list[str]:
        """``"METHOD /route/template STATUS"`` for each call, for asserting exact sequences."""
        return [
            f"{c.method} {c.route.split(' ', 1)[1] if c.route else c.raw_path} {c.status}"
            for c in self.calls
            if logins or (c.route or "").lower() != "post /api/v3/auth/login"
        ]

    # -- faults ---------------------------------------------------------------------------------

    def fail_next(
        self, n: int, status: int = 503, *, method: str | None = None, path: str | None = None
    ) -> None:
        """Answer the next ``n`` matching calls with ``status`` (``path``: regex on the decoded path)."""
        with self._lock:
            self.app.faults.failures.append(
                FaultRule(status=status, remaining=n, method=method, path=re.compile(path) if path else None)
            )

    def slow(
        self, seconds: float, *, method: str | None = None, path: str | None = None,
        count: int | None = None, after: bool = False,
    ) -> None:
        """Delay matching calls by ``seconds`` (all of them, or the next ``count``). With ``after``
        the request is handled first and only the answer is late (a client timeout then loses an
        answer to a request that took effect)."""
        with self._lock:
            self.app.faults.delays.append(
                FaultRule(
                    remaining=count, method=method, path=re.compile(path) if path else None,
                    delay=seconds, after=after,
                )
            )

    def clear_faults(self) -> None:
        with self._lock:
            self.app.faults.failures.clear()
            self.app.faults.delays.clear()
            self.app.faults.down = False

    def expire_tokens(self) -> None:
        """Invalidate every token issued so far: calls get 403 until the client logs in again."""
        with self._lock:
            self.app.store.expire_tokens()

    def down(self) -> None:
        """Answer every call with 503 until :meth:`up`."""
        with self._lock:
            self.app.faults.down = True

    def up(self) -> None:
        with self._lock:
            self.app.faults.down = False
