"""The fake SciCat's ASGI application: routing on the raw path, the auth guard, validation, faults.

Order of checks per request, as in the NestJS backend: fault injection (a proxy in front) → route
match on the *raw* path (``%2F`` stays inside one segment; an unencoded slash gives 404; static
segments match case-insensitively; a trailing slash is tolerated) → body parsing → the guard
(anonymous → 403 ``Forbidden resource``) → body validation (400) → the handler (404, 400
``Invalid job id.``, instance permissions 403, ...). Every request is recorded.
"""

from __future__ import annotations

import asyncio
import copy
import json
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, parse_qsl, unquote

from . import validation as v
from .store import Store, User, iso, lifecycle_defaults, now_iso

MAX_BODY = 16 * 1024 * 1024


class HTTPError(Exception):
    def __init__(self, status: int, body: Any) -> None:
        super().__init__(f"{status}: {body}")
        self.status = status
        self.body = body


def nest_error(status: int, message: Any, error: str) -> HTTPError:
    """Nest's built-in exceptions: ``{message, error, statusCode}``."""
    return HTTPError(status, {"message": message, "error": error, "statusCode": status})


def bad_request(messages: list[str] | str) -> HTTPError:
    return nest_error(400, messages, "Bad Request")


def custom_error(status: int, message: str) -> HTTPError:
    """The backend's own ``HttpException({status, message})``."""
    return HTTPError(status, {"status": status, "message": message})


def forbidden_resource() -> HTTPError:
    return nest_error(403, "Forbidden resource", "Forbidden")


def unauthorized_access() -> HTTPError:
    return nest_error(403, "Unauthorized access", "Forbidden")


def invalid_job() -> HTTPError:
    return custom_error(400, "Invalid job id.")


def dataset_not_found(pid: str) -> HTTPError:
    return nest_error(404, f"dataset: {pid} not found", "Not Found")


EMPTY = object()
"""Handler result meaning: 200 with an empty body (Nest returning ``undefined``)."""


@dataclass
class Call:
    """One request as the fake server saw it."""

    method: str
    raw_path: str
    path: str
    """Percent-decoded path (PIDs readable)."""
    query: dict[str, list[str]]
    route: str | None = None
    """Template of the matched route, e.g. ``PATCH /api/v3/datasets/{pid}/datasetlifecycle``."""
    params: dict[str, str] = field(default_factory=dict)
    pid: str | None = None
    body: Any = None
    content_type: str = ""
    authenticated: bool = False
    status: int = 0
    response: Any = None
    fault: str | None = None
    """``"down"``, ``"fail"`` when the answer was injected."""


@dataclass
class FaultRule:
    status: int = 503
    remaining: int | None = None
    method: str | None = None
    path: re.Pattern[str] | None = None
    delay: float = 0.0
    after: bool = False
    """For delays: wait after handling the request (the server acted; the answer is late)."""

    def matches(self, method: str, path: str) -> bool:
        if self.method and self.method.upper() != method.upper():
            return False
        if self.path is not None and not self.path.search(path):
            return False
        return self.remaining is None or self.remaining > 0


@dataclass
class Faults:
    down: bool = False
    failures: list[FaultRule] = field(default_factory=list)
    delays: list[FaultRule] = field(default_factory=list)

    def take(self, rules: list[FaultRule], method: str, path: str) -> FaultRule | None:
        for rule in rules:
            if rule.matches(method, path):
                if rule.remaining is not None:
                    rule.remaining -= 1
                return rule
        return None


@dataclass
class Req:
    method: str
    params: dict[str, str]
    query: dict[str, list[str]]
    headers: dict[str, str]
    content_type: str
    body: Any
    user: User | None


Handler = Callable[["SciCatApp", Req], tuple[int, Any]]


@dataclass
class Route:
    method: str
    parts: tuple[str, ...]
    template: str
    handler: Handler
    auth: bool = True

    def match(self, segments: list[str]) -> dict[str, str] | None:
        if len(segments) != len(self.parts):
            return None
        params: dict[str, str] = {}
        for want, got in zip(self.parts, segments, strict=True):
            if want.startswith("{"):
                if not got:
                    return None
                params[want[1:-1]] = unquote(got)
            elif want.lower() != got.lower():
                return None
        return params


ROUTES: list[Route] = []


def route(method: str, *templates: str, auth: bool = True) -> Callable[[Handler], Handler]:
    def deco(fn: Handler) -> Handler:
        for template in templates:
            parts = tuple(p for p in template.split("/") if p)
            ROUTES.append(Route(method, parts, f"{method} {template}", fn, auth))
        return fn

    return deco


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7396 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


def _require_valid(schema: v.Schema, body: Any) -> None:
    errors = v.validate(schema, body)
    if errors:
        raise bad_request(errors)


class SciCatApp:
    def __init__(self, lock: threading.RLock) -> None:
        self.lock = lock
        self.store = Store()
        self.faults = Faults()
        self.calls: list[Call] = []
        self.pid_prefix = "20.500.12269"

    # -- ASGI -----------------------------------------------------------------------------------

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        method: str = scope["method"].upper()
        raw_path = (scope.get("raw_path") or scope["path"].encode()).decode("latin-1").split("?", 1)[0]
        path = unquote(raw_path)
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
        headers = {k.decode("latin-1").lower(): val.decode("latin-1") for k, val in scope["headers"]}
        call = Call(method, raw_path, path, query, content_type=headers.get("content-type", ""))
        found = self._match(method, raw_path)
        if found is not None:
            call.route, call.params = found[0].template, found[1]
            call.pid = found[1].get("pid") or (
                self._filter_pid(query) if found[0].template.endswith("/origdatablocks") else None
            )

        raw_body, too_big = await self._read_body(receive)
        with self.lock:
            self.calls.append(call)
            delay = self.faults.take(self.faults.delays, method, path)
            fail = None
            if self.faults.down:
                call.fault = "down"
            else:
                fail = self.faults.take(self.faults.failures, method, path)
                if fail is not None:
                    call.fault = "fail"
        if delay is not None and delay.delay > 0 and not delay.after:
            await asyncio.sleep(delay.delay)
        if call.fault is not None:
            status = 503 if call.fault == "down" else (fail.status if fail else 503)
            text = f"<html><body><h1>{status} Service Temporarily Unavailable</h1></body></html>"
            call.status, call.response = status, text
            await self._send(send, status, text.encode(), "text/html")
            return

        status, payload = self._dispatch(call, found, method, raw_path, query, headers, raw_body, too_big)
        call.status, call.response = status, payload
        if delay is not None and delay.delay > 0 and delay.after:
            await asyncio.sleep(delay.delay)
        if payload is EMPTY:
            call.response = None
            await self._send(send, status, b"", None)
        else:
            await self._send(send, status, json.dumps(payload).encode(), "application/json; charset=utf-8")

    @staticmethod
    async def _read_body(receive: Any) -> tuple[bytes, bool]:
        chunks: list[bytes] = []
        size = 0
        too_big = False
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > MAX_BODY:
                too_big = True
            elif chunk:
                chunks.append(chunk)
            if not message.get("more_body"):
                break
        return b"".join(chunks), too_big

    @staticmethod
    async def _send(send: Any, status: int, data: bytes, content_type: str | None) -> None:
        headers = [(b"content-length", str(len(data)).encode())]
        if content_type:
            headers.append((b"content-type", content_type.encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": data})

    @staticmethod
    def _match(method: str, raw_path: str) -> tuple[Route, dict[str, str]] | None:
        segments = raw_path.split("/")[1:]
        if len(segments) > 1 and segments[-1] == "":
            segments = segments[:-1]  # a trailing slash is tolerated
        for r in ROUTES:
            if r.method == method:
                params = r.match(segments)
                if params is not None:
                    return r, params
        return None

    def _dispatch(
        self, call: Call, found: tuple[Route, dict[str, str]] | None, method: str, raw_path: str,
        query: dict[str, list[str]], headers: dict[str, str], raw_body: bytes, too_big: bool,
    ) -> tuple[int, Any]:
        if found is None:
            return 404, {"message": f"Cannot {method} {raw_path}", "error": "Not Found", "statusCode": 404}
        rt, params = found
        try:
            if too_big:
                raise nest_error(413, "request entity too large", "Payload Too Large")
            body = self._parse_body(headers.get("content-type", ""), raw_body)
            call.body = body
            with self.lock:
                user = self.store.user_for(headers.get("authorization"))
                call.authenticated = user is not None
                if rt.auth and user is None:
                    raise forbidden_resource()
                req = Req(method, params, query, headers, headers.get("content-type", ""), body, user)
                status, payload = rt.handler(self, req)
                return status, copy.deepcopy(payload) if payload is not EMPTY else EMPTY
        except HTTPError as exc:
            return exc.status, exc.body
        except Exception as exc:  # like Nest: anything unexpected is a 500
            return 500, {"statusCode": 500, "message": "Internal server error", "detail": repr(exc)}

    @staticmethod
    def _parse_body(content_type: str, raw: bytes) -> Any:
        ct = content_type.split(";")[0].strip().lower()
        if ct == "application/json" or ct.endswith("+json"):
            if not raw.strip():
                return {}
            try:
                body = json.loads(raw)
            except ValueError as exc:
                raise bad_request(f"Unexpected token in JSON: {exc}") from None
            if not isinstance(body, (dict, list)):  # body-parser strict mode
                raise bad_request("Unexpected token in JSON: only objects and arrays are accepted")
            return body
        if ct == "application/x-www-form-urlencoded":
            return dict(parse_qsl(raw.decode("utf-8"), keep_blank_values=True))
        return {}

    @staticmethod
    def _filter_pid(query: dict[str, list[str]]) -> str | None:
        try:
            where = json.loads(query.get("filter", ["{}"])[0]).get("where") or {}
        except (ValueError, AttributeError):
            return None
        pid = where.get("datasetId")
        return pid if isinstance(pid, str) else None

    # -- helpers used by handlers ---------------------------------------------------------------

    def dataset(self, pid: str, not_found: HTTPError | None = None) -> dict[str, Any]:
        ds = self.store.datasets.get(pid)
        if ds is None:
            raise not_found or dataset_not_found(pid)
        return ds

    def job(self, job_id: str) -> dict[str, Any]:
        job = self.store.jobs.get(job_id)
        if job is None:
            raise invalid_job()
        return job

    def check_dataset_list(self, dataset_list: Any) -> list[dict[str, Any]]:
        """jobs.controller.utils.ts validateDatasetList (shape checked by the DTO already)."""
        if not isinstance(dataset_list, list) or not dataset_list:
            raise custom_error(400, "List of passed datasets is empty.")
        errors: list[str] = []
        for i, entry in enumerate(dataset_list):
            if not isinstance(entry, dict):
                raise custom_error(400, "Invalid dataset list entry.")
            errors += [f"datasetList.{i}.{m}" for m in v.validate(v.dataset_list_entry(), entry)]
        if errors:
            raise custom_error(400, "Dataset ids list is not valid: " + "; ".join(errors))
        missing = [e["pid"] for e in dataset_list if e["pid"] not in self.store.datasets]
        if missing:
            raise custom_error(400, f"Datasets with pid {', '.join(missing)} don't exist.")
        for e in dataset_list:
            if e["files"]:
                known = {f["path"] for o in self.store.origdatablocks_of(e["pid"]) for f in o["dataFileList"]}
                unknown = [f for f in e["files"] if f not in known]
                if unknown:
                    raise custom_error(
                        400, f"At least one requested file could not be found: {', '.join(unknown)}"
                    )
        return dataset_list


# --- auth --------------------------------------------------------------------------------------


def _num(x: float) -> float | int:
    return int(x) if float(x).is_integer() else x


@route("POST", "/api/v3/auth/login", auth=False)
def login(app: SciCatApp, req: Req) -> tuple[int, Any]:
    body = req.body if isinstance(req.body, dict) else {}
    username, password = body.get("username"), body.get("password")
    if not isinstance(username, str) or not isinstance(password, str):
        raise HTTPError(401, {"message": "Unauthorized", "statusCode": 401})
    tok = app.store.login(username, password)
    if tok is None:
        raise HTTPError(401, {"message": "Unauthorized", "statusCode": 401})
    _require_valid(v.credentials(), body)
    u = tok.user
    ttl = _num(app.store.token_ttl)
    return 201, {
        "access_token": tok.value,
        "id": tok.value,
        "expires_in": ttl,
        "ttl": ttl,
        "created": now_iso(),
        "userId": u.id,
        "user": {
            "id": u.id, "username": u.username, "email": u.email, "emailVerified": True,
            "realm": "", "authStrategy": "local",
        },
    }


@route("GET", "/api/v3/users/my/identity")
def my_identity(app: SciCatApp, req: Req) -> tuple[int, Any]:
    """users.controller.ts getMyIdentity: the caller's UserIdentity, its groups in
    ``profile.accessGroups`` (what the reference's token exchange reads)."""
    assert req.user is not None
    u = req.user
    return 200, {
        "id": f"identity-{u.id}", "authStrategy": "local", "created": now_iso(), "modified": now_iso(),
        "externalId": u.id, "provider": "local", "userId": u.id,
        "profile": {"id": u.id, "displayName": u.username, "email": u.email, "username": u.username,
                    "emails": [{"value": u.email}], "accessGroups": list(u.groups), "thumbnailPhoto": "",
                    "oidcClaims": {}},
    }


# --- jobs --------------------------------------------------------------------------------------


def _check_type(app: SciCatApp, type_: str) -> None:
    if type_ not in app.store.perms.job_types:
        raise bad_request("Invalid job type")


@route("POST", "/api/v3/jobs")
def create_job_v3(app: SciCatApp, req: Req) -> tuple[int, Any]:
    _require_valid(v.create_job_v3(), req.body)
    b = req.body
    _check_type(app, b["type"])
    dataset_list = app.check_dataset_list(b["datasetList"])
    params = {**(b.get("jobParams") or {}), "datasetList": dataset_list}
    if b.get("executionTime"):
        params["executionTime"] = iso(b["executionTime"])
    assert req.user is not None
    owner_group = app.store.datasets[dataset_list[0]["pid"]]["ownerGroup"]
    job = app.store.add_job(
        type_=b["type"], job_params=params, owner_user=req.user.username, owner_group=owner_group,
        contact_email=b.get("emailJobInitiator") or req.user.email,
        status_code=b.get("jobStatusMessage") or "jobSubmitted", created_by=req.user.username,
        config_version="v3",
    )
    if b.get("jobResultObject"):
        job["jobResultObject"] = copy.deepcopy(b["jobResultObject"])
    return 201, app.store.render_job_v3(job)


@route("POST", "/api/v4/jobs")
def create_job_v4(app: SciCatApp, req: Req) -> tuple[int, Any]:
    _require_valid(v.create_job_v4(), req.body)
    b = req.body
    _check_type(app, b["type"])
    params = copy.deepcopy(b["jobParams"])
    assert req.user is not None
    owner_group = b.get("ownerGroup")
    if b["type"] in ("archive", "retrieve") or "datasetList" in params:
        dataset_list = app.check_dataset_list(params.get("datasetList"))
        owner_group = owner_group or app.store.datasets[dataset_list[0]["pid"]]["ownerGroup"]
    job = app.store.add_job(
        type_=b["type"], job_params=params, owner_user=b.get("ownerUser") or req.user.username,
        owner_group=owner_group, contact_email=b.get("contactEmail") or req.user.email,
        created_by=req.user.username,
    )
    return 201, app.store.render_job_v4(job)


@route("GET", "/api/v3/jobs/{id}")
def get_job_v3(app: SciCatApp, req: Req) -> tuple[int, Any]:
    job = app.job(req.params["id"])
    assert req.user is not None
    if not app.store.can_read_job(req.user, job):
        raise unauthorized_access()
    return 200, app.store.render_job_v3(job)


@route("GET", "/api/v4/jobs/{id}")
def get_job_v4(app: SciCatApp, req: Req) -> tuple[int, Any]:
    job = app.job(req.params["id"])
    assert req.user is not None
    if not app.store.can_read_job(req.user, job):
        raise unauthorized_access()
    return 200, app.store.render_job_v4(job)


@route("PATCH", "/api/v3/jobs/{id}")
def patch_job_v3(app: SciCatApp, req: Req) -> tuple[int, Any]:
    # update-job-v3-mapping.interceptor.ts: rebuild the body; every other key is dropped.
    b = req.body if isinstance(req.body, dict) else {}
    msg, result = b.get("jobStatusMessage"), b.get("jobResultObject")
    errors = []
    if msg is not None and not isinstance(msg, str):
        errors += ["statusCode must be a string", "statusMessage must be a string"]
    if result is not None and not isinstance(result, dict):
        errors.append("jobResultObject must be an object")
    if errors:
        raise bad_request(errors)
    job = app.job(req.params["id"])
    assert req.user is not None
    if not app.store.can_update_job(req.user, job):
        raise unauthorized_access()
    if msg:
        job["statusCode"] = msg
        job["statusMessage"] = msg
    if result is not None:
        job["jobResultObject"] = copy.deepcopy(result)
    job["updatedBy"], job["updatedAt"] = req.user.username, now_iso()
    return 200, app.store.render_job_v3(job)


@route("PATCH", "/api/v4/jobs/{id}")
def patch_job_v4(app: SciCatApp, req: Req) -> tuple[int, Any]:
    _require_valid(v.update_job_v4(), req.body)
    job = app.job(req.params["id"])
    assert req.user is not None
    if not app.store.can_update_job(req.user, job):
        raise unauthorized_access()
    b = req.body
    job["statusCode"], job["statusMessage"] = b["statusCode"], b["statusMessage"]
    if "jobResultObject" in b and b["jobResultObject"] is not None:
        if "merge-patch" in req.content_type:
            job["jobResultObject"] = merge_patch(job.get("jobResultObject") or {}, b["jobResultObject"])
        else:
            job["jobResultObject"] = copy.deepcopy(b["jobResultObject"])
    job["updatedBy"], job["updatedAt"] = req.user.username, now_iso()
    return 200, app.store.render_job_v4(job)


# --- datasets ----------------------------------------------------------------------------------


def _readable(app: SciCatApp, req: Req, not_found: HTTPError | None = None) -> dict[str, Any]:
    ds = app.dataset(req.params["pid"], not_found)
    assert req.user is not None
    if not app.store.can_read_dataset(req.user, ds):
        raise unauthorized_access()
    return ds


@route("GET", "/api/v3/datasets/{pid}")
def get_dataset_v3(app: SciCatApp, req: Req) -> tuple[int, Any]:
    return 200, app.store.render_dataset(_readable(app, req), "v3")


@route("GET", "/api/v4/datasets/{pid}")
def get_dataset_v4(app: SciCatApp, req: Req) -> tuple[int, Any]:
    include = req.query.get("include", [])
    bad = [i for i in include if i not in ("origdatablocks", "datablocks", "attachments", "all")]
    if bad:
        raise bad_request(f"Invalid include value: {bad[0]}")
    return 200, app.store.render_dataset(_readable(app, req), "v4", include)


@route("PATCH", "/api/v3/datasets/{pid}")
def patch_dataset_v3(app: SciCatApp, req: Req) -> tuple[int, Any]:
    ds = app.dataset(req.params["pid"])
    _require_valid(v.dataset_v3_patch(ds["type"]), req.body)
    assert req.user is not None
    if not app.store.can_update_dataset(req.user, ds):
        raise unauthorized_access()
    for key, value in req.body.items():
        if key == "datasetlifecycle":
            # findByIdAndUpdate $set of the whole sub-document: omitted fields revert to defaults;
            # Mongoose's strict schema drops unknown lifecycle keys.
            given = {k: copy.deepcopy(x) for k, x in value.items() if k in v.LIFECYCLE_FIELDS}
            ds["datasetlifecycle"] = {**lifecycle_defaults(), **given}
        else:
            ds[key] = copy.deepcopy(value)
    ds["updatedBy"], ds["updatedAt"] = req.user.username, now_iso()
    return 200, app.store.render_dataset(ds, "v3")


@route("GET", "/api/v3/datasets/{pid}/datasetlifecycle", "/api/v4/datasets/{pid}/datasetlifecycle")
def get_lifecycle(app: SciCatApp, req: Req) -> tuple[int, Any]:
    pid = req.params["pid"]
    ds = _readable(app, req, nest_error(404, f"dataset with pid {pid} not found", "Not Found"))
    return 200, ds["datasetlifecycle"]


@route("PATCH", "/api/v3/datasets/{pid}/datasetlifecycle", "/api/v4/datasets/{pid}/datasetlifecycle")
def patch_lifecycle(app: SciCatApp, req: Req) -> tuple[int, Any]:
    _require_valid(v.lifecycle(), req.body)
    if not req.body:
        raise bad_request("dataset lifecycle DTO must not be empty")
    pid = req.params["pid"]
    ds = app.dataset(pid, nest_error(404, f"dataset with pid {pid} not found", "Not Found"))
    assert req.user is not None
    if not app.store.can_update_lifecycle(req.user, ds):
        raise unauthorized_access()
    update = copy.deepcopy(req.body)
    for key in ("dateOfDiskPurging", "archiveRetentionTime", "dateOfPublishing", "publishedOn"):
        if key in update:
            update[key] = iso(update[key])
    ds["datasetlifecycle"] = {**ds["datasetlifecycle"], **update}
    ds["updatedBy"], ds["updatedAt"] = req.user.username, now_iso()
    return 200, ds["datasetlifecycle"]


@route("GET", "/api/v3/datasets/{pid}/origdatablocks")
def get_origdatablocks_v3(app: SciCatApp, req: Req) -> tuple[int, Any]:
    ds = _readable(app, req)
    return 200, app.store.origdatablocks_of(ds["pid"])


def _where_matches(doc: dict[str, Any], where: dict[str, Any]) -> bool:
    for key, cond in where.items():
        if key == "$and":
            if not all(_where_matches(doc, c) for c in cond):
                return False
            continue
        if key == "$or":
            if not any(_where_matches(doc, c) for c in cond):
                return False
            continue
        value = doc.get("_id" if key == "id" else key)
        conds = cond if isinstance(cond, dict) else {"$eq": cond}
        for op, arg in conds.items():
            if not _op(op, value, arg):
                return False
    return True


def _op(op: str, value: Any, arg: Any) -> bool:
    if op == "$eq":
        return bool(value == arg)
    if op == "$ne":
        return bool(value != arg)
    if op == "$in":
        return value in arg or (isinstance(value, list) and bool(set(value) & set(arg)))
    if op == "$nin":
        return value not in arg
    raise bad_request(f"Unsupported operator in the fake server: {op}")


@route("GET", "/api/v4/origdatablocks")
def get_origdatablocks_v4(app: SciCatApp, req: Req) -> tuple[int, Any]:
    raw = req.query.get("filter", ["{}"])[0] or "{}"
    try:
        flt = json.loads(raw)
    except ValueError:
        raise bad_request("Invalid JSON in filter") from None
    if not isinstance(flt, dict):
        raise bad_request("Invalid filter")
    unknown = [k for k in flt if k not in ("where", "include", "fields", "limits")]
    if unknown:
        raise bad_request(f"Invalid filter key: {unknown[0]}")
    limits = flt.get("limits") or {}
    if any(k not in ("limit", "skip", "sort") for k in limits):
        raise bad_request("Invalid limits filter")
    where = flt.get("where") or {}
    assert req.user is not None
    user = req.user
    docs = [
        o for o in app.store.origdatablocks.values()
        if _where_matches(o, where) and (
            app.store.is_admin(user) or o["ownerGroup"] in user.groups
            or bool(set(o.get("accessGroups") or []) & set(user.groups)) or o.get("isPublished")
        )
    ]
    limit = int(limits.get("limit") or 100)  # parseLimitFilters default
    skip = int(limits.get("skip") or 0)
    return 200, docs[skip: skip + limit]


# --- datablocks --------------------------------------------------------------------------------


@route("POST", "/api/v3/datasets/{pid}/datablocks")
def create_dataset_datablock(app: SciCatApp, req: Req) -> tuple[int, Any]:
    assert req.user is not None
    if not app.store.can_create_datablock(req.user):
        raise forbidden_resource()
    _require_valid(v.create_dataset_datablock(), req.body)
    ds = app.dataset(req.params["pid"])
    if app.store.archive_id_taken(req.body["archiveId"]):
        # unique index on archiveId; this route does not map the Mongo error → 500
        raise HTTPError(500, {"statusCode": 500, "message": "Internal server error"})
    return 201, app.store.add_datablock(ds, req.body, req.user)


@route("POST", "/api/v3/datablocks")
def create_datablock(app: SciCatApp, req: Req) -> tuple[int, Any]:
    assert req.user is not None
    if not app.store.can_create_datablock(req.user):
        raise forbidden_resource()
    _require_valid(v.create_datablock(), req.body)
    ds = app.dataset(req.body["datasetId"])
    if app.store.archive_id_taken(req.body["archiveId"]):
        raise nest_error(409, "Datablock with this archiveId already exists", "Conflict")
    body = {k: x for k, x in req.body.items() if k != "datasetId"}
    doc = app.store.add_datablock(ds, body, req.user)
    for key in ("ownerGroup", "accessGroups", "instrumentGroup"):
        if key in req.body:
            doc[key] = copy.deepcopy(req.body[key])
    return 201, doc


@route("GET", "/api/v3/datasets/{pid}/datablocks")
def list_datablocks(app: SciCatApp, req: Req) -> tuple[int, Any]:
    ds = _readable(app, req)
    return 200, app.store.datablocks_of(ds["pid"])


@route("GET", "/api/v3/datablocks/{id}")
def get_datablock(app: SciCatApp, req: Req) -> tuple[int, Any]:
    doc = app.store.datablocks.get(req.params["id"])
    if doc is None:
        raise nest_error(404, f"datablock: {req.params['id']} not found", "Not Found")
    return 200, doc


@route("DELETE", "/api/v3/datasets/{pid}/datablocks/{did}")
def delete_dataset_datablock(app: SciCatApp, req: Req) -> tuple[int, Any]:
    assert req.user is not None
    if not app.store.can_delete_datablock(req.user):
        raise forbidden_resource()
    ds = app.dataset(req.params["pid"])
    did = req.params["did"]
    doc = app.store.datablocks.get(did)
    if doc is None or doc["datasetId"] != ds["pid"]:
        raise nest_error(404, f"datablock: {did} not found", "Not Found")
    app.store.remove_datablock(did)
    return 200, EMPTY


@route("DELETE", "/api/v3/datasets/{pid}/datablocks")
def delete_all_datablocks(app: SciCatApp, req: Req) -> tuple[int, Any]:
    assert req.user is not None
    if not app.store.can_delete_datablock(req.user):
        raise forbidden_resource()
    ds = app.dataset(req.params["pid"])
    ids = [d["id"] for d in app.store.datablocks_of(ds["pid"])]
    for did in ids:
        app.store.remove_datablock(did)
    ds["packedSize"] = 0
    ds["numberOfFilesArchived"] = 0
    return 200, {"count": len(ids)}


@route("DELETE", "/api/v3/datablocks/{id}")
def delete_datablock(app: SciCatApp, req: Req) -> tuple[int, Any]:
    assert req.user is not None
    if not app.store.can_delete_datablock(req.user):
        raise forbidden_resource()
    did = req.params["id"]
    if did not in app.store.datablocks:
        raise nest_error(404, f"datablock: {did} not found", "Not Found")
    return 200, app.store.remove_datablock(did)
