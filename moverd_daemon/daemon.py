"""The ``moverd serve`` process: start everything, run until SIGTERM, stop cleanly, exit 0.

The event loop (anyio on asyncio) runs in a thread of its own and the main thread only waits for
signals. That is deliberate: Prefect's flow engine installs its own SIGTERM handler around every
flow run when it runs in the main thread (to crash the run), which would take SIGTERM away from
the daemon in the middle of a job. Off the main thread it leaves signals alone, and so does
uvicorn, so the daemon alone decides what SIGTERM means:

1. stop taking jobs (``POST /jobs`` answers 503, readiness fails, systemd hears ``STOPPING=1``);
2. let running jobs go on for ``server.shutdown_grace`` seconds;
3. abort the ones still running: half-written datablocks are aborted by the core (nothing partial
   stays on the LTS), flow runs are marked Crashed, and the journal keeps the jobs open so that
   the next start resumes them;
4. stop the HTTP server and the local Prefect server, exit 0.

A second SIGTERM or SIGINT skips the grace period.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import anyio

from moverd.errors import ConfigError

from .notify import Notifier
from .prefect_server import LocalPrefectServer, configured_api_url
from .settings import DaemonSettings

if TYPE_CHECKING:
    from moverd.app import App

    from .dispatch import Dispatcher

log = logging.getLogger(__name__)

State = Literal["starting", "running", "draining", "stopped"]


@dataclass
class Endpoints:
    mode: str
    api: str
    docs: str | None
    prefect_ui: str | None
    prefect_api: str | None

    def lines(self) -> list[str]:
        where = {"embedded": "embedded: jobs run in this process",
                 "scale-out": "scale-out: jobs are deployment runs any moverd daemon may take"}[self.mode]
        out = [f"moverd serve ({where})", f"  API:        {self.api}"]
        if self.docs:
            out.append(f"  API docs:   {self.docs}")
        out.append(f"  Prefect UI: {self.prefect_ui or 'none (server.prefect_ui = false: Prefect ephemeral mode)'}")
        out.append(f"  submit a job: curl -X POST {self.api}/jobs -H 'Content-Type: application/json' "
                   """-d '{"id": "<job id>", "type": "archive"}'""")
        return out


def _bind(host: str, port: int) -> socket.socket:
    """Bind the API socket before anything slow starts, so a taken port fails at once."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"server.host: cannot resolve {host!r}: {exc}") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.set_inheritable(False)
    return sock


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


class Daemon:
    def __init__(self, settings: DaemonSettings, config: Path | None, *, mode: str, sock: socket.socket,
                 local_prefect: LocalPrefectServer | None = None, notifier: Notifier | None = None) -> None:
        self.settings = settings
        self.sock = sock
        self.config = config
        self.mode = mode
        self.local_prefect = local_prefect
        self.notifier = notifier or Notifier()
        self.state: State = "starting"
        self.exit_code = 0
        self.endpoints: Endpoints | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._signals = 0
        self._stop: anyio.Event | None = None
        self._startup: anyio.CancelScope | None = None
        self._dispatcher: Dispatcher | None = None
        self._lock = threading.Lock()

    # -- signals (called from the main thread) -------------------------------------------------

    def request_stop(self, signum: int = signal.SIGTERM) -> None:
        with self._lock:
            self._signals += 1
            loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._on_signal, signum)

    def _on_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if self.state == "starting":
            log.info("%s during start-up: stopping", name)
            if self._startup is not None:
                self._startup.cancel()
        elif self.state == "running":
            log.info("%s: stopping (running jobs get %.0f s)", name, self.settings.server.shutdown_grace)
        elif self._dispatcher is not None:
            log.warning("%s again: aborting running jobs now", name)
            self._dispatcher.abort()
        if self._stop is not None:
            self._stop.set()

    # -- the event loop thread -----------------------------------------------------------------

    def run(self) -> None:
        """Thread target: the whole daemon inside one anyio event loop."""
        try:
            anyio.run(self._main)
        except ConfigError as exc:
            self.exit_code = 3
            _error(exc)
        except BaseException as exc:
            self.exit_code = 1
            log.debug("daemon failed", exc_info=True)
            _error(exc)

    async def _main(self) -> None:
        with self._lock:
            self._loop = asyncio.get_running_loop()
            early = self._signals
        self._stop = anyio.Event()
        if early:
            return
        from prometheus_client import disable_created_metrics

        from .installation import build_app
        from .journal import Journal
        from .metrics import Metrics

        disable_created_metrics()  # type: ignore[no-untyped-call]  # ``*_created`` series: noise
        s = self.settings
        self.notifier.status("starting")
        app_box: list[App] = []
        metrics = Metrics(lambda: app_box[0].bounded_slots() if app_box else [])
        sock = self.sock
        port = sock.getsockname()[1]
        name = s.server.name or f"{socket.gethostname()}:{port}"
        journal = Journal(s.server.journal or s.state_dir / "daemon.sqlite")
        try:
            async with build_app(s, observers=[metrics]) as app:
                app_box.append(app)
                await self._serve(app, metrics, journal, sock, name)
        finally:
            journal.close()
            self.state = "stopped"

    async def _serve(self, app: App, metrics: Any, journal: Any, sock: socket.socket, name: str) -> None:
        parts: tuple[Any, ...] | None = None
        async with contextlib.AsyncExitStack() as stack:
            with anyio.CancelScope() as startup:
                self._startup = startup
                if self.local_prefect is not None:
                    await self.local_prefect.wait_ready()
                parts = await self._prepare(app, metrics, journal, name, stack)
            self._startup = None
            if startup.cancelled_caught or parts is None:
                return
            await self._run(parts, sock)

    async def _run(self, parts: tuple[Any, ...], sock: socket.socket) -> None:
        s = self.settings
        dispatcher, housekeeping, server = parts
        self._dispatcher = dispatcher
        http_done = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._serve_http, server, sock, http_done)
            while not server.started:
                if server.should_exit:
                    raise RuntimeError("the HTTP server did not start")
                await anyio.sleep(0.02)
            await tg.start(dispatcher.serve)
            from .scheduler import build_scheduler

            scheduler = build_scheduler(housekeeping)
            scheduler.start()
            self.state = "running"
            self.endpoints = self._endpoints(sock)
            for line in self.endpoints.lines():
                print(line, flush=True)
            self.notifier.ready(f"ready: {self.endpoints.api} ({self.mode})")
            tg.start_soon(self._keepalive, dispatcher)
            assert self._stop is not None
            await self._stop.wait()

            self.state = "draining"
            grace = s.server.shutdown_grace
            self.notifier.stopping(f"draining {dispatcher.running} job(s)", extend_seconds=grace + 60)
            scheduler.shutdown(wait=False)
            aborted = await dispatcher.drain(grace)
            if aborted:
                log.warning("%d job(s) aborted; they resume at the next start", aborted)
            server.should_exit = True
            with anyio.move_on_after(10):
                await http_done.wait()
            server.force_exit = True
            tg.cancel_scope.cancel()
        log.info("stopped")

    async def _serve_http(self, server: Any, sock: socket.socket, done: anyio.Event) -> None:
        try:
            await server.serve(sockets=[sock])
        finally:
            done.set()

    async def _prepare(self, app: App, metrics: Any, journal: Any, name: str,
                       stack: contextlib.AsyncExitStack) -> tuple[Any, ...] | None:
        """Prefect client, dispatcher, API and housekeeping, ready to start."""
        import uvicorn
        from prefect.client.orchestration import get_client

        from .api import ApiContext, LimitedH11Protocol, create_api
        from .auth import Authenticator
        from .dispatch import make_dispatcher
        from .health import Readiness, limit_names
        from .scheduler import Housekeeping

        s = self.settings
        t0 = time.monotonic()
        client = await stack.enter_async_context(get_client())  # the ephemeral server starts here
        bound = s.server.prefect_request_timeout
        try:
            # Prefect's client retries a request that timed out: bound the whole check, so that a
            # silent Prefect server fails the start after this long, not after all the retries.
            with anyio.fail_after(bound):
                error = await client.api_healthcheck()
        except TimeoutError:
            error = TimeoutError(f"no answer within {bound:g} s (server.prefect_request_timeout)")
        if error is not None:
            raise ConfigError(f"Prefect at {client.api_url} does not answer: {error}")
        log.info("Prefect ready at %s after %.1f s", client.api_url, time.monotonic() - t0)
        specs = None
        if self.mode == "scale-out":
            from moverd_flows.deployments import apply_deployments, ensure_work_pools, missing_limits

            created = await ensure_work_pools(client, s)
            if created:
                log.warning("created work pool(s) %s; run 'moverd prefect setup' to set up limits and variables",
                            ", ".join(created))
            specs = await apply_deployments(client, s)
            if s.prefect.global_limits:
                missing = await missing_limits(client, limit_names(app))
                if missing:
                    log.error("global concurrency limit(s) %s missing on the Prefect server: LTS transfers will fail "
                              "until 'moverd prefect setup' creates them", ", ".join(missing))
        config = str(self.config.resolve()) if self.config else None
        dispatcher = make_dispatcher(self.mode, app, client, journal, metrics, name=name,  # type: ignore[arg-type]
                                     config=config, specs=specs)
        auth = Authenticator(s.server.auth, anonymous=s.server.anonymous_allowed())
        stack.push_async_callback(auth.aclose)
        if auth.jwks is not None:
            try:  # fetch the signing keys now: the first request need not wait, a wrong URL shows at once
                await auth.jwks.key("")
            except Exception as exc:
                log.warning("the identity provider's keys are not available yet: %s", exc)
        if s.server.anonymous_allowed():
            log.warning("the job API accepts requests without credentials (loopback only, none configured)")
        readiness = Readiness(app, client, timeout=s.server.readiness_timeout)
        ingest, tokens = self._ingest(app, dispatcher, metrics, auth, stack) if s.ingest.enabled else (None, None)
        api = create_api(ApiContext(app=app, dispatcher=dispatcher, metrics=metrics, auth=auth,
                                    readiness=readiness, state=lambda: self.state, ingest=ingest, tokens=tokens))
        server = uvicorn.Server(uvicorn.Config(
            api, log_config=None, access_log=s.server.access_log, lifespan="off", timeout_graceful_shutdown=5,
            server_header=False, http=LimitedH11Protocol, h11_max_incomplete_event_size=s.server.max_header_size,
        ))
        housekeeping = Housekeeping(app, dispatcher, journal, metrics, ingest)
        return dispatcher, housekeeping, server

    def _ingest(self, app: App, dispatcher: Dispatcher, metrics: Any, auth: Any,
                stack: contextlib.AsyncExitStack) -> tuple[Any, Any]:
        """The upload API's service: its state next to the journal, new archive jobs handed to
        the dispatcher (as SciCat's call of ``/jobs`` would), the quota published as metrics."""
        from moverd.models import Job

        from .ingest.quota import IngestState
        from .ingest.service import Ingest
        from .ingest.tokens import TokenExchange

        s = self.settings
        state = IngestState(s.state_dir / "ingest.sqlite")
        stack.callback(state.close)

        async def submit(job: Job) -> None:
            if s.ingest.submit_jobs:
                await dispatcher.submit(job.id, job.type.value, job)

        try:
            ingest = Ingest(app, state, s.ingest, submit=submit, on_usage=metrics.landing_usage)
        except TypeError as exc:
            raise ConfigError(f"ingest.enabled: {exc}") from None
        tokens = TokenExchange(s.ingest, s.server.auth, auth)
        stack.push_async_callback(tokens.aclose)
        return ingest, tokens

    def _endpoints(self, sock: socket.socket) -> Endpoints:
        s = self.settings.server
        port = sock.getsockname()[1]
        api = f"http://{_url_host(s.host)}:{port}{s.root_path}"
        ui: str | None = None
        prefect_api: str | None = None
        if self.local_prefect is not None:
            ui, prefect_api = self.local_prefect.url, self.local_prefect.api_url
        elif self.mode == "scale-out":
            from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL

            ui, prefect_api = PREFECT_UI_URL.value(), PREFECT_API_URL.value()
        return Endpoints(self.mode, api, f"{api}/docs" if s.docs else None, ui, prefect_api)

    async def _keepalive(self, dispatcher: Dispatcher) -> None:
        """systemd: watchdog pings from the event loop, and a status line that follows the jobs."""
        interval = self.notifier.watchdog_interval
        last = ""
        while True:
            if interval:
                self.notifier.watchdog()
            status = f"{self.state}: {dispatcher.running} job(s) running, {dispatcher.queued()} queued"
            if status != last:
                self.notifier.status(status)
                last = status
            await anyio.sleep(min(interval or 5.0, 5.0))




def _error(exc: BaseException) -> None:
    lines = str(exc).splitlines() or [type(exc).__name__]
    print(f"moverd: error: {lines[0]}", file=sys.stderr, flush=True)
    for line in lines[1:]:
        print(f"  {line}", file=sys.stderr, flush=True)


def _configure_logging(level: str) -> None:
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
    # moverd's layers and every installed plugin log at the configured level; other libraries
    # (Prefect, botocore, uvicorn) stay at the root's.
    import importlib.metadata

    plugins = {ep.value.split(":")[0].split(".")[0] for ep in importlib.metadata.entry_points(group="moverd.plugins")}
    for name in {"moverd", "moverd_cli", "moverd_daemon", "moverd_flows", *plugins}:
        logging.getLogger(name).setLevel(level.upper())


def run_daemon(settings: DaemonSettings, config: Path | None) -> int:
    """``moverd serve``: returns the exit code (0 after a clean stop)."""
    _configure_logging(settings.log_level)
    try:
        sock = _bind(settings.server.host, settings.server.port)
    except ConfigError as exc:
        _error(exc)
        return 3
    # Before anything imports prefect, which reads its settings once: every request of the
    # daemon's Prefect clients waits at most this long to connect, and for each read.
    os.environ.setdefault("PREFECT_API_REQUEST_TIMEOUT", f"{settings.server.prefect_request_timeout:g}")
    # Prefect's ephemeral server (prefect_ui = false) gets as long to start as the local one: its
    # own 20 s limit failed daemons starting on a busy host ("Timed out while attempting to
    # connect to ephemeral Prefect API server").
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS",
                          str(math.ceil(settings.server.prefect_start_timeout)))
    api_url = configured_api_url()
    mode = "scale-out" if api_url else "embedded"
    local = None
    if mode == "embedded" and settings.server.prefect_ui:
        srv = settings.server
        local = LocalPrefectServer(settings.state_dir / "prefect", srv.prefect_host, srv.prefect_port,
                                   srv.prefect_start_timeout)
        local.start()
    daemon = Daemon(settings, config, mode=mode, sock=sock, local_prefect=local)
    thread = threading.Thread(target=daemon.run, name="moverd-loop")
    previous = {sig: signal.signal(sig, lambda signum, frame: daemon.request_stop(signum))
                for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        thread.start()
        while thread.is_alive():
            thread.join(0.5)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _flush_prefect()
        if local is not None:
            local.stop()
        sock.close()
    return daemon.exit_code


def _flush_prefect() -> None:
    """Send Prefect's queued logs and events now, while its server still runs (they would
    otherwise be flushed at interpreter exit, after the local server is gone)."""
    if "prefect" not in sys.modules:
        return
    try:
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=5)
        EventsWorker.drain_all(timeout=5)
    except Exception as exc:
        log.debug("flushing Prefect's logs and events failed: %s", exc)
