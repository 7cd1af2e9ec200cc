"""The HTTP API: SciCat's job trigger, job state, health, metrics and OpenAPI docs.

Everything lives under ``server.root_path`` (the seed's ``/archiver/api/v1``). The job routes and
the docs need credentials (:mod:`.auth`); health is open, and so are the metrics unless
``server.metrics_auth`` is set. Error bodies are ``{"detail": "<one clear sentence>"}``.

What a client sends is bounded before anything else looks at it, because the API is reachable by
anyone who can reach the port: headers by h11 itself (:class:`LimitedH11Protocol`, 431), bodies
by :class:`RequestLimits` (413), and ``POST /jobs`` checks credentials before it reads its body,
so that a caller without them gets 401 and never has a byte of its body read or parsed.
"""


import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, cast

import h11
from fastapi import APIRouter, Depends, FastAPI, Header, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.config import Config
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import ServerState

from moverd import __version__
from moverd.app import App
from moverd.errors import CatalogError, UnknownJobError, UserError
from moverd.models import Job

from .auth import Authenticator, AuthError, Principal
from .dispatch import Dispatcher, NotAcceptingError, NotServedError
from .health import Readiness, bounded
from .ingest.routes import ingest_router, install_error_handler
from .ingest.service import Ingest
from .ingest.tokens import TokenExchange
from .metrics import Metrics
from .settings import daemon_settings
from .views import JobList, JobView

log = logging.getLogger(__name__)

JOB_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:@+-]{0,255}$"

DOCS_ASSETS = {"swagger-ui-bundle.js": "text/javascript", "swagger-ui.css": "text/css", "favicon.png": "image/png"}
"""What ``/docs`` loads, from the ``fastapi-offline`` distribution (Swagger UI 5, which reads the
OpenAPI 3.1 that FastAPI writes)."""


def _docs_assets() -> Path:
    import fastapi_offline

    return Path(fastapi_offline.__file__).parent / "static"


class JobRequest(BaseModel):
    """What SciCat's URL action posts when a job is created."""

    model_config = ConfigDict(extra="ignore", json_schema_extra={
        "examples": [{"id": "b2d2e7a4-3f1e-4b53-9d7c-6f1d7c0e2a11", "type": "archive"}]})

    id: str = Field(pattern=JOB_ID_PATTERN, description="The catalog's job id.")
    type: Literal["archive", "retrieve"] = Field(description="The job type, as the catalog has it.")


class JobAccepted(BaseModel):
    """The flow run that carries the job out (as the reference answered)."""

    uuid: str = Field(description="Prefect flow run id.")
    name: str = Field(description="Prefect flow run name.")


class Problem(BaseModel):
    detail: str


@dataclass
class ApiContext:
    app: App
    dispatcher: Dispatcher
    metrics: Metrics
    auth: Authenticator
    readiness: Readiness
    state: Callable[[], str]
    """``starting``, ``running`` or ``draining``."""
    ingest: Ingest | None = None
    """The upload API (``[ingest] enabled``)."""
    tokens: TokenExchange | None = None
    """Its ``POST /token``."""


def _problem(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


class ApiError(Exception):
    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.detail, self.headers = status, detail, headers


def _describe_validation(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        msg = str(err.get("msg", "invalid"))
        if err.get("type") == "missing":
            msg = "is required"
        elif err.get("type") == "literal_error":
            msg = f"must be {(err.get('ctx') or {}).get('expected', 'one of the listed values')}"
        elif err.get("type") == "string_pattern_mismatch":
            msg = "is not a job id (letters, digits and ._:@+- only)"
        elif err.get("type") == "json_invalid":
            loc, msg = "body", "is not valid JSON"
        elif err.get("type") in ("model_attributes_type", "model_type"):
            loc, msg = "body", 'must be a JSON object like {"id": "<job id>", "type": "archive"}'
        parts.append(f"{loc} {msg}" if loc != "body" or not msg.startswith("body") else msg)
    return "; ".join(parts) or "invalid request"


def create_api(ctx: ApiContext) -> FastAPI:
    """The FastAPI application of one daemon."""
    settings = daemon_settings(ctx.app).server
    root = settings.root_path
    api = FastAPI(
        title="moverd", version=__version__, docs_url=None, redoc_url=None, openapi_url=None,
        description="Archive and retrieve jobs of the catalog, run as Prefect flow runs by this daemon.",
    )

    async def principal(authorization: Annotated[str | None, Header(include_in_schema=False)] = None) -> Principal:
        try:
            return await ctx.auth.authenticate(authorization)
        except AuthError as exc:
            headers = {"WWW-Authenticate": exc.challenge} if exc.challenge and exc.status == 401 else None
            if exc.status == 503:  # the identity provider is away: try again, not with other credentials
                headers = {"Retry-After": "30"}
            raise ApiError(exc.status, exc.message, headers) from None

    async def open_access() -> None:
        return None

    metrics_dep: Callable[..., Awaitable[Any]] = principal if settings.metrics_auth else open_access
    Authed = Annotated[Principal, Depends(principal)]  # noqa: N806 - a type alias

    @api.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _problem(exc.status, exc.detail, exc.headers)

    @api.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": _describe_validation(exc), "errors": jsonable_encoder(exc.errors())},
                            status_code=422)

    router = APIRouter(prefix=root)
    errors: dict[int | str, dict[str, Any]] = {
        401: {"model": Problem, "description": "No or bad credentials."},
        403: {"model": Problem, "description": "Valid credentials without the required role or group."},
    }

    job_body = {"requestBody": {"required": True, "content": {"application/json": {
        "schema": JobRequest.model_json_schema()}}}}

    submit_responses: dict[int | str, dict[str, Any]] = {
        **errors, 200: {"model": JobAccepted, "description": "The job already has a run that is not over: that one."},
        404: {"model": Problem, "description": "The catalog has no such job."},
        409: {"model": Problem, "description": "The catalog has the job with another type, or this daemon "
                                               "does not run jobs of the type (embedded, server.job_types)."},
        413: {"model": Problem, "description": "The body is larger than server.max_body_size."},
        422: {"model": Problem, "description": "The body is not a job."},
        503: {"model": Problem, "description": "Shutting down, or the catalog or Prefect is unreachable."},
    }

    @router.post("/jobs", status_code=201, response_model=JobAccepted, tags=["jobs"], openapi_extra=job_body,
                 responses=submit_responses)
    @router.post("/archiver/jobs", status_code=201, response_model=JobAccepted, tags=["jobs"],
                 openapi_extra=job_body, responses=submit_responses, summary="Submit Job (the reference's path)")
    async def submit_job(request: Request, who: Authed, response: Response) -> JobAccepted:
        """Run catalog job ``id`` asynchronously (SciCat's URL action). A job that already has a run
        not yet over is not started twice: the answer is that run (status 200)."""
        body = await _job_request(request)
        d = ctx.dispatcher
        if not d.accepting:
            raise ApiError(503, "moverd is shutting down and takes no new jobs", {"Retry-After": "30"})
        existing = d.runs.get(body.id)
        if existing is not None and existing.local and not existing.final:
            response.status_code = 200
            return JobAccepted(uuid=existing.flow_run_id, name=existing.flow_run_name)
        job = await _read_job(ctx.app, body.id)
        if job.type.value != body.type:
            raise ApiError(409, f"job {body.id} is a {job.type.value} job in the catalog, not {body.type}")
        try:
            run, created = await d.submit(body.id, body.type, job)
        except NotAcceptingError as exc:
            raise ApiError(503, str(exc), {"Retry-After": "30"}) from None
        except NotServedError as exc:
            raise ApiError(409, str(exc)) from None
        except Exception as exc:
            log.exception("could not create a flow run for job %s", body.id)
            raise ApiError(503, f"could not create the flow run (is Prefect reachable?): {exc}") from None
        if not created:
            response.status_code = 200
        log.info("%s %s job %s (by %s): flow run %s %r", "accepted" if created else "already running",
                 body.type, body.id, who.name, run.flow_run_id, run.flow_run_name)
        return JobAccepted(uuid=run.flow_run_id, name=run.flow_run_name)

    @router.get("/jobs/{job_id}", tags=["jobs"], responses={**errors, 404: {"model": Problem}})
    async def job_state(job_id: str, who: Authed) -> JobView:
        """State and progress of a job: its flow run, what the catalog says, and (when this daemon
        runs it) bytes, files and datablocks done per dataset."""
        run = await ctx.dispatcher.lookup(job_id)
        catalog: dict[str, Any]
        try:
            job = await bounded(daemon_settings(ctx.app).server.readiness_timeout,
                                lambda: ctx.app.catalog.get_job(job_id))
            catalog = {"status": job.status, "datasets": [d.pid for d in job.datasets], "type": job.type.value}
        except UnknownJobError:
            if run is None:
                raise ApiError(404, f"job {job_id} is unknown here and in the catalog") from None
            catalog = {"error": "not found in the catalog"}
        except (TimeoutError, CatalogError) as exc:
            catalog = {"error": str(exc) or "timed out"}
        if run is None:
            return JobView(id=job_id, type=catalog.get("type"), flow_run=None, status=catalog.get("status"),
                           progress=None, catalog=catalog)
        return JobView.of(run, catalog)

    @router.get("/jobs", tags=["jobs"], responses=errors)
    async def jobs(who: Authed) -> JobList:
        """The jobs this daemon knows since it started, newest first."""
        runs = sorted(ctx.dispatcher.runs.values(), key=lambda r: r.submitted, reverse=True)
        return JobList(daemon=ctx.dispatcher.name, mode=ctx.dispatcher.mode, running=ctx.dispatcher.running,
                       queued=ctx.dispatcher.queued(), jobs=[JobView.of(r) for r in runs])

    @router.get("/health/livez", tags=["health"])
    async def livez() -> dict[str, str]:
        """The process answers (its event loop is alive)."""
        return {"status": "ok", "state": ctx.state(), "version": __version__}

    @router.get("/health/readyz", tags=["health"], responses={503: {"description": "Not ready: the reasons."}})
    async def readyz() -> JSONResponse:
        """Ready for jobs: the catalog, every storage and Prefect answer; 503 with the reasons else."""
        state = ctx.state()
        checks = await ctx.readiness.run() if state != "draining" else {}
        if state != "running":
            checks["daemon"] = f"{state}: not taking jobs"
        ok = all(v == "ok" for v in checks.values())
        return JSONResponse({"status": "ready" if ok else "not ready", "checks": checks},
                            status_code=200 if ok else 503)

    @router.get("/metrics", tags=["health"], dependencies=[Depends(metrics_dep)],
                response_class=Response, responses={200: {"content": {"text/plain": {}}}})
    async def metrics() -> Response:
        """Prometheus metrics."""
        body, content_type = ctx.metrics.render()
        return Response(body, media_type=content_type)

    if settings.docs:
        @router.get("/openapi.json", include_in_schema=False)
        async def openapi(who: Authed) -> JSONResponse:
            return JSONResponse(api.openapi())

        @router.get("/docs", include_in_schema=False)
        async def docs(who: Authed) -> HTMLResponse:
            return get_swagger_ui_html(
                openapi_url=f"{root}/openapi.json", title="moverd API",
                swagger_js_url=f"{root}/docs/assets/swagger-ui-bundle.js",
                swagger_css_url=f"{root}/docs/assets/swagger-ui.css",
                swagger_favicon_url=f"{root}/docs/assets/favicon.png",
            )

        @router.get("/docs/assets/{name}", include_in_schema=False)
        async def docs_asset(name: str) -> FileResponse:
            """Swagger UI's own files, served by the daemon: FastAPI's default page loads them
            from a CDN, which a facility without a route out never reaches (a white page). They
            are the library's public files, so they need no credentials."""
            if name not in DOCS_ASSETS:
                raise ApiError(404, f"no docs asset {name!r}")
            return FileResponse(_docs_assets() / name, media_type=DOCS_ASSETS[name],
                                headers={"Cache-Control": "public, max-age=86400"})

    api.include_router(router)
    if ctx.ingest is not None:
        service = ctx.ingest
        install_error_handler(api)
        api.include_router(ingest_router(root, lambda: service, principal, ctx.tokens))
    api.add_middleware(RequestLimits, max_body=settings.max_body_size, max_head=settings.max_header_size)
    return api


async def _job_request(request: Request) -> JobRequest:
    """The body of ``POST /jobs``, read here rather than by FastAPI: FastAPI reads and parses a
    declared body before any dependency runs, that is before the credentials are checked."""
    raw = await request.body()
    try:
        return JobRequest.model_validate_json(raw)
    except ValidationError as exc:
        errors = [{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False)]
        raise RequestValidationError(errors, body=raw) from None


class BodyTooLargeError(Exception):
    """Raised from ``receive`` when a body outgrows the limit; :class:`RequestLimits` answers it."""


class RequestLimits:
    """Refuses a body over ``max_body`` bytes with 413, headers over ``max_head`` with 431, and
    closes a connection whose request body was not read.

    h11 bounds the head only while it is incomplete (a whole head that came in one read is
    parsed, whatever its size), so the headers are measured here again.

    A declared ``Content-Length`` over the limit is refused before the application runs; a
    chunked body is counted as the application reads it. A response sent before the body was read
    to its end (401, 413, 404...) carries ``Connection: close``: the server then drops the rest
    instead of reading it off the wire only to throw it away.
    """

    def __init__(self, app: ASGIApp, *, max_body: int, max_head: int) -> None:
        self.app = app
        self.max_body = max_body
        self.max_head = max_head

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        head = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"") + 16
        head += sum(len(name) + len(value) + 4 for name, value in scope["headers"])
        if head > self.max_head:
            await _refuse(send, 431, f"request line and headers exceed {self.max_head} bytes (server.max_header_size)")
            return
        length: int | None = None
        chunked = False
        for name, value in scope["headers"]:
            if name == b"content-length":
                length = int(value) if value.isdigit() else -1
            elif name == b"transfer-encoding":
                chunked = True
        if length is not None and (length < 0 or length > self.max_body):
            await _refuse(send, 413, f"the request body is larger than {self.max_body} bytes "
                                     "(server.max_body_size)" if length >= 0 else "bad Content-Length")
            return
        complete = not chunked and not length
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received, complete
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    raise BodyTooLargeError
                complete = not message.get("more_body", False)
            return message

        async def closing_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if not complete:
                    message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        try:
            await self.app(scope, limited_receive, closing_send)
        except BodyTooLargeError:
            if started:
                raise
            await _refuse(send, 413, f"the request body is larger than {self.max_body} bytes (server.max_body_size)")


async def _refuse(send: Send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


H11_DEFAULT_MAX_HEAD = 16 * 1024
"""h11's own bound of a request's head, when none is configured."""


class _Connection(h11.Connection):
    """h11's connection, remembering why it refused a request: its hint (431 for a request line
    and headers over ``max_incomplete_event_size``) is the status to answer."""

    refusal: h11.RemoteProtocolError | None = None

    def next_event(self) -> Any:
        try:
            return super().next_event()
        except h11.RemoteProtocolError as exc:
            self.refusal = exc
            raise


LINGER = 1.0
"""How long a refused request's connection is drained after the answer (see :class:`_LingeringClose`)."""


class _LingeringClose:
    """The connection's transport, closing the way HTTP servers must when a request body is left
    unread: send the answer and a FIN, throw away what still arrives for at most ``LINGER``
    seconds, then close. Closing a socket with unread data sends a TCP reset at once, and a reset
    makes the kernel drop the answer still on its way: the client saw its 413 or 401 cut off."""

    def __init__(self, transport: asyncio.Transport, linger: float) -> None:
        self._transport = transport
        self._linger = linger
        self.lingering = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def is_closing(self) -> bool:
        return self.lingering or self._transport.is_closing()

    def close(self) -> None:
        if self.lingering or self._transport.is_closing():
            return
        self.lingering = True
        if self._transport.can_write_eof():
            self._transport.write_eof()  # after everything buffered: the answer goes out whole
        self._transport.resume_reading()
        asyncio.get_running_loop().call_later(self._linger, self._transport.close)


class LimitedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, answering an oversized head with 431 instead of a bare 400, and
    closing connections with a lingering close.

    h11 stops buffering a request's head at ``h11_max_incomplete_event_size`` bytes (the daemon
    sets ``server.max_header_size``); uvicorn answers every refusal of h11 with 400, which tells a
    client nothing about what to change.
    """

    def __init__(self, config: Config, server_state: ServerState, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.max_head = config.h11_max_incomplete_event_size or H11_DEFAULT_MAX_HEAD
        self.conn = _Connection(h11.SERVER, self.max_head)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.transport = cast(asyncio.Transport, _LingeringClose(self.transport, LINGER))

    def data_received(self, data: bytes) -> None:
        if isinstance(self.transport, _LingeringClose) and self.transport.lingering:
            return  # the rest of a refused request: dropped unparsed
        super().data_received(data)

    def eof_received(self) -> None:
        if isinstance(self.transport, _LingeringClose) and self.transport.lingering:
            self.transport._transport.close()
            return
        super().eof_received()

    def send_400_response(self, msg: str) -> None:
        refusal = getattr(self.conn, "refusal", None)
        if refusal is None or refusal.error_status_hint != 431:
            super().send_400_response(msg)
            return
        self.logger.warning("refused a request whose line and headers exceed %d bytes (server.max_header_size)",
                            self.max_head)
        body = f"request line and headers exceed {self.max_head} bytes (server.max_header_size)".encode()
        event = h11.Response(status_code=431, reason=b"Request Header Fields Too Large", headers=[
            (b"content-type", b"text/plain; charset=utf-8"), (b"connection", b"close")])
        for ev in (event, h11.Data(data=body), h11.EndOfMessage()):
            self.transport.write(self.conn.send(ev) or b"")
        self.transport.close()


async def _read_job(app: App, job_id: str) -> Job:
    try:
        return await bounded(max(daemon_settings(app).server.readiness_timeout * 6, 30),
                             lambda: app.catalog.get_job(job_id), "reading the job from the catalog")
    except UnknownJobError:
        raise ApiError(404, f"the catalog has no job {job_id}") from None
    except UserError as exc:
        raise ApiError(422, str(exc)) from None
    except TimeoutError as exc:
        raise ApiError(503, f"the catalog did not answer in time: {exc}") from None
    except CatalogError as exc:
        raise ApiError(503, f"the catalog is unreachable: {exc}") from None
