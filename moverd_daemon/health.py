"""Readiness: can this daemon do a job right now?

Each dependency is checked concurrently, with a timeout of its own, so a hanging S3 endpoint
answers "storage landing: timed out after 5 s" instead of hanging the probe: the catalog
(``Catalog.check``: SciCat logs in), every configured storage (its free space where it can tell,
and a listing of an empty prefix, which needs the bucket or the mount to be there), Prefect (its
health endpoint) and, with ``prefect.global_limits``, the LTS limits on the Prefect server.

A timeout alone hides why: a catalog whose host does not resolve fails at once, but its client
retries with backoff, so the check runs out of time between two attempts and the cause was only
in a log line. :func:`bounded` keeps the warnings logged while a call ran (moverd's retries log
each failed attempt with its error) and names the last one with the timeout:
``timed out after 5 s; last error: SciCat POST /api/v3/auth/login failed ([Errno -2] Name or
service not known)``.
"""

from __future__ import annotations

import contextvars
import logging
import re
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import anyio

from moverd.app import App

from .settings import daemon_settings

if TYPE_CHECKING:
    from prefect.client.orchestration import PrefectClient

log = logging.getLogger(__name__)
T = TypeVar("T")

_errors: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("moverd_check_errors", default=None)
_RETRY_SUFFIX = re.compile(r", retry \d+/\d+ in [0-9.]+s$")


class _ErrorsSeen(logging.Handler):
    """Keeps, for the call :func:`bounded` runs, each warning or error logged while it runs (a
    retry's "failed (...), retry 2/5" line names what failed and why).

    The call's task (and the worker threads it starts, which anyio gives a copy of its context)
    sees its own list through a context variable: records of everything else running in the
    daemon meanwhile are not taken."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)

    def emit(self, record: logging.LogRecord) -> None:
        seen = _errors.get()
        if seen is None:
            return
        try:
            seen.append(_RETRY_SUFFIX.sub("", record.getMessage()))
        except Exception:  # a record that does not format is no reason to fail the check
            return


_handler = _ErrorsSeen()


def _watch() -> None:
    root = logging.getLogger()
    if _handler not in root.handlers:
        root.addHandler(_handler)


async def bounded(seconds: float, call: Callable[[], Awaitable[T]], what: str = "") -> T:
    """``await call()`` for at most ``seconds``; on timeout, a :class:`TimeoutError` whose text
    names the last error logged while it ran (or says that none was)."""
    _watch()
    seen: list[str] = []
    token = _errors.set(seen)
    try:
        with anyio.fail_after(seconds):
            return await call()
    except TimeoutError:
        why = f"last error: {seen[-1]}" if seen else "no answer, and no error before that"
        raise TimeoutError(f"{what}{' ' if what else ''}timed out after {seconds:g} s; {why}"[:1000]) from None
    finally:
        _errors.reset(token)


PROBE_PREFIX = ".moverd-readyz"
"""Listed to prove a storage answers; nothing lives there, so the listing is cheap."""


def limit_names(app: App) -> list[str]:
    """The global limits the core will ask for: ``<storage>-read``/``-write`` of bounded storages."""
    return [f"{name}-{kind}" for name, kind, _ in app.bounded_slots()]


class Readiness:
    def __init__(self, app: App, client: PrefectClient | None, *, timeout: float) -> None:
        self.app = app
        self.client = client
        self.timeout = timeout

    async def _storage(self, name: str) -> None:
        storage = self.app.storage(name)
        await storage.free_space()
        async for _ in storage.list(PROBE_PREFIX):
            break

    async def _catalog(self) -> None:
        await self.app.catalog.check()

    async def _prefect(self) -> None:
        assert self.client is not None
        error = await self.client.api_healthcheck()
        if error is not None:
            raise error

    async def _limits(self) -> None:
        from moverd_flows.deployments import missing_limits

        assert self.client is not None
        missing = await missing_limits(self.client, limit_names(self.app))
        if missing:
            raise RuntimeError(f"global concurrency limit(s) {', '.join(missing)} missing or inactive on the "
                               "Prefect server: run 'moverd prefect setup'")

    def checks(self) -> dict[str, Callable[[], Awaitable[None]]]:
        out: dict[str, Callable[[], Awaitable[None]]] = {"catalog": self._catalog}
        for name in sorted(self.app.settings.storages):
            out[f"storage {name}"] = lambda name=name: self._storage(name)  # type: ignore[misc]
        if self.client is not None:
            out["prefect"] = self._prefect
            if daemon_settings(self.app).prefect.global_limits:
                out["prefect limits"] = self._limits
        return out

    async def run(self) -> dict[str, str]:
        """``{check: "ok" | reason}`` for every check."""
        results: dict[str, str] = {}

        async def one(name: str, check: Callable[[], Awaitable[Any]]) -> None:
            try:
                await bounded(self.timeout, check)
                results[name] = "ok"
            except TimeoutError as exc:
                results[name] = str(exc)
            except Exception as exc:
                results[name] = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]

        async with anyio.create_task_group() as tg:
            for name, check in self.checks().items():
                tg.start_soon(one, name, check)
        bad = {k: v for k, v in results.items() if v != "ok"}
        if bad:
            log.warning("not ready: %s", "; ".join(f"{k}: {v}" for k, v in sorted(bad.items())))
        return dict(sorted(results.items()))
