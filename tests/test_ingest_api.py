"""The upload API against real parts: moto's S3 server written to through presigned URLs by a real
HTTP client that sends the facility client's headers, the SciCat-compatible server, and a JWKS
endpoint on 127.0.0.1. :func:`ingestor_upload` plays the facility client's sequence and checksum
arithmetic (single PUT under one chunk, multipart from one chunk up, composite SHA-256 without
``-N``)."""

import base64
import hashlib
import math
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qs

import anyio
import httpx
import pytest
from fastapi import FastAPI, Header
from fastapi.responses import JSONResponse

from moverd.app import App
from moverd_daemon.api import ApiError
from moverd_daemon.auth import Authenticator, AuthError, Principal
from moverd_daemon.ingest.quota import IngestState
from moverd_daemon.ingest.routes import ingest_router, install_error_handler
from moverd_daemon.ingest.service import GIB, Ingest, composite_sha256
from moverd_daemon.ingest.tokens import TokenExchange
from moverd_daemon.settings import AuthSettings, DaemonSettings
from tests.support.apps import make_settings
from tests.support.daemon import JWKSServer
from tests.support.jsonhttp import JsonServer
from tests.support.s3 import S3Server
from tests.support.scicat import ARCHIVER, SciCatServer

pytestmark = pytest.mark.anyio

ROOT = "/archiver/api/v1"
GROUP = "p12345"
MIB = 1024**2
CHUNK = 5 * MIB
"""The client's ChunkSizeMB in these tests (S3's smallest part)."""
UPLOADING = {"isOnCentralDisk": False, "archiveStatusMessage": "filesNotYetAvailable", "archivable": False}
"""The lifecycle the facility's client creates its datasets with."""


def landing_key(pid: str, path: str) -> str:
    """The object name the facility's client sends."""
    return f"openem-network/datasets/{pid}/raw_files/{path}"


@dataclass
class Env:
    api: httpx.AsyncClient
    ingest: Ingest
    state: IngestState
    s3: S3Server
    bucket: str
    scicat: SciCatServer
    jwks: JWKSServer
    app: App

    def token(self, groups: list[str] | None = None, **claims: Any) -> dict[str, str]:
        groups = [f"/{GROUP}"] if groups is None else groups
        return {"Authorization": f"Bearer {self.jwks.mint(groups=groups, **claims)}"}

    def objects(self) -> dict[str, int]:
        resp = self.s3.client().list_objects_v2(Bucket=self.bucket)
        return {o["Key"]: o["Size"] for o in resp.get("Contents", [])}

    def open_uploads(self) -> list[str]:
        return [u["Key"] for u in self.s3.client().list_multipart_uploads(Bucket=self.bucket).get("Uploads", [])]


class TokenEndpoint:
    """The identity provider's token endpoint: a password grant of the service account."""

    def __init__(self) -> None:
        self.forms: list[dict[str, list[str]]] = []
        self.server = JsonServer(self._answer)

    def _answer(self, method: str, path: str, body: bytes) -> tuple[int, Any] | None:
        if method != "POST" or path != "/token":
            return None
        form = parse_qs(body.decode())
        self.forms.append(form)
        if form.get("password") != ["svc-password"] or form.get("grant_type") != ["password"]:
            return 401, {"error": "invalid_grant"}
        return 200, {"access_token": "svc-access", "refresh_token": "svc-refresh", "expires_in": 300,
                     "refresh_expires_in": 1800, "token_type": "Bearer", "not-before-policy": 0,
                     "session_state": "s", "scope": "profile email"}

    @property
    def url(self) -> str:
        return f"{self.server.url}/token"

    def close(self) -> None:
        self.server.close()


async def build(tmp_path: Path, s3_server: S3Server, s3_options: dict[str, Any], scicat: SciCatServer,
                jwks: JWKSServer, **ingest: Any) -> AsyncIterator[Env]:
    settings = make_settings(
        tmp_path, DaemonSettings,
        storages={"landing": {"type": "s3", **s3_options}},
        catalog={"type": "scicat", "url": scicat.url, "username": ARCHIVER[0], "password": ARCHIVER[1],
                 "job_api": "v4"},
        archive={"landing_prefix": "openem-network/datasets/{pid}/raw_files"},
        ingest={"enabled": True, **ingest},
    )
    auth_settings = AuthSettings.model_validate(jwks.auth_settings())
    auth = Authenticator(auth_settings, anonymous=False)
    tokens = TokenExchange(settings.ingest, auth_settings, auth)

    async def who(authorization: Annotated[str | None, Header(include_in_schema=False)] = None) -> Principal:
        try:
            return await auth.authenticate(authorization)
        except AuthError as exc:
            raise ApiError(exc.status, exc.message) from None

    async with App(settings) as app:
        state = IngestState(tmp_path / "ingest.sqlite")
        service = Ingest(app, state, settings.ingest)
        api = FastAPI()
        install_error_handler(api)

        @api.exception_handler(ApiError)
        async def _api_error(request: Any, exc: ApiError) -> JSONResponse:
            return JSONResponse({"detail": exc.detail}, status_code=exc.status)

        api.include_router(ingest_router(ROOT, lambda: service, who, tokens))
        transport = httpx.ASGITransport(app=api)
        async with httpx.AsyncClient(transport=transport, base_url=f"http://moverd{ROOT}") as client:
            yield Env(client, service, state, s3_server, s3_options["bucket"], scicat, jwks, app)
        state.close()
        await tokens.aclose()
        await auth.aclose()


@pytest.fixture
async def env(tmp_path: Path, s3_server: S3Server, s3_options: dict[str, Any], scicat: SciCatServer,
              jwks: JWKSServer) -> AsyncIterator[Env]:
    async for e in build(tmp_path, s3_server, s3_options, scicat, jwks, landing_space="3GiB"):
        yield e


def b64sha(data: bytes) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


async def put(url_b64: str, data: bytes) -> httpx.Response:
    """A presigned PUT with exactly the facility client's headers."""
    url = base64.b64decode(url_b64).decode()
    headers = {"x-amz-checksum-sha256": b64sha(data), "Content-Type": "", "x-amz-storage-class": "GLACIER"}
    async with httpx.AsyncClient(timeout=30) as http:
        return await http.put(url, content=data, headers=headers)


async def ingestor_upload_file(env: Env, auth: dict[str, str], pid: str, path: str, data: bytes,
                               chunk: int = CHUNK) -> httpx.Response | None:
    """One file as the facility's client uploads it; the completeUpload answer (None for a single PUT)."""
    name = landing_key(pid, path)
    if len(data) < chunk:
        r = await env.api.post("/s3/presignedUrls", json={"dataset_id": pid, "object_name": name, "parts": 1},
                               headers=auth)
        assert r.status_code == 201, r.text
        assert r.json()["upload_id"] == ""
        resp = await put(r.json()["urls"][0], data)
        assert resp.status_code == 200, resp.text
        return None
    parts = math.ceil(len(data) / chunk)
    r = await env.api.post("/s3/presignedUrls", json={"dataset_id": pid, "object_name": name, "parts": parts},
                           headers=auth)
    assert r.status_code == 201, r.text
    body = r.json()
    assert len(body["urls"]) == parts
    done = []
    digests = []
    for i, url in enumerate(body["urls"]):
        piece = data[i * chunk:(i + 1) * chunk]
        resp = await put(url, piece)
        assert resp.status_code == 200, resp.text
        digests.append(hashlib.sha256(piece).digest())
        done.append({"part_number": i + 1, "etag": resp.headers["ETag"].strip('"'), "checksum_sha256": b64sha(piece)})
    whole = base64.b64encode(hashlib.sha256(b"".join(digests)).digest()).decode()
    return await env.api.post("/s3/completeUpload", headers=auth, json={
        "dataset_id": pid, "object_name": name, "upload_id": body["upload_id"], "parts": done,
        "checksum_sha256": whole})


async def test_composite_checksum_is_the_clients_arithmetic() -> None:
    parts = [b"a" * 10, b"b" * 7]
    expected = base64.b64encode(hashlib.sha256(b"".join(hashlib.sha256(p).digest() for p in parts)).digest()).decode()
    assert composite_sha256([b64sha(p) for p in parts]) == expected


async def test_the_clients_sequence_single_part_multipart_and_exact_chunk(env: Env) -> None:
    files = {"small.txt": b"s" * 1000, "exact.bin": b"e" * CHUNK, "big.bin": bytes(range(256)) * (CHUNK // 128 + 3)}
    pid = env.scicat.add_dataset([(p, len(d)) for p, d in files.items()], owner_group=GROUP, lifecycle=UPLOADING)
    auth = env.token()
    r = await env.api.post("/s3/requestDatasetUpload", json={"dataset_id": pid, "dataset_size_gib": 0}, headers=auth)
    assert (r.status_code, r.json()["message"]) == (201, "success")
    assert r.headers["content-type"].startswith("application/json")
    for path, data in files.items():
        answer = await ingestor_upload_file(env, auth, pid, path, data)
        if answer is not None:
            assert answer.status_code == 201, answer.text
            assert answer.json()["key"] == landing_key(pid, path)
    assert env.objects() == {landing_key(pid, p): len(d) for p, d in files.items()}
    assert env.open_uploads() == []
    # the exact-chunk-size case as the client really sends it: parts=1 (single PUT), then complete with ""
    name = landing_key(pid, "exact.bin")
    r = await env.api.post("/s3/completeUpload", headers=auth, json={
        "dataset_id": pid, "object_name": name, "upload_id": "",
        "parts": [{"part_number": 1, "etag": "x", "checksum_sha256": b64sha(files["exact.bin"])}],
        "checksum_sha256": composite_sha256([b64sha(files["exact.bin"])])})
    assert r.status_code == 201, r.text
    r = await env.api.post("/s3/finalizeDatasetUpload", headers=auth, json={
        "dataset_id": pid, "create_archiving_job": True, "owner_group": GROUP, "owner_user": "owner",
        "contact_email": "owner@example.org"})
    assert r.status_code == 201, r.text
    assert r.json() == {"dataset_id": pid, "message": "Dataset upload finalized"}
    lifecycle = env.scicat.lifecycle(pid)
    assert lifecycle["archivable"] is True and lifecycle["archiveStatusMessage"] == "datasetCreated"
    jobs = [j for j in env.scicat.app.store.jobs.values() if j["type"] == "archive"]
    assert len(jobs) == 1 and jobs[0]["ownerUser"] == "owner"
    # a retry (the client's, or after a lost answer) creates no second job
    r = await env.api.post("/s3/finalizeDatasetUpload", headers=auth, json={
        "dataset_id": pid, "create_archiving_job": True, "owner_group": GROUP, "owner_user": "owner",
        "contact_email": "owner@example.org"})
    assert r.status_code == 201
    assert len([j for j in env.scicat.app.store.jobs.values() if j["type"] == "archive"]) == 1
    assert await env.state.reservation(pid) is None  # released
    r = await env.api.post("/s3/abortDatasetUpload", headers=auth, json={"dataset_id": pid})
    assert r.status_code == 409 and "finalized" in r.json()["details"]
    assert len(env.objects()) == 3  # nothing lost


async def test_finalize_refuses_a_landing_zone_without_every_file(env: Env) -> None:
    pid = env.scicat.add_dataset([("a.txt", 10), ("b.txt", 20), ("c/never.txt", 5)], owner_group=GROUP,
                                 lifecycle=UPLOADING)
    auth = env.token()
    assert (await env.api.post("/s3/requestDatasetUpload", json={"dataset_id": pid, "dataset_size_gib": 0},
                               headers=auth)).status_code == 201
    await ingestor_upload_file(env, auth, pid, "a.txt", b"x" * 10)
    await ingestor_upload_file(env, auth, pid, "b.txt", b"y" * 19)
    r = await env.api.post("/s3/finalizeDatasetUpload", headers=auth, json={
        "dataset_id": pid, "create_archiving_job": True, "owner_group": GROUP, "owner_user": "owner",
        "contact_email": "owner@example.org"})
    assert r.status_code == 422
    details = r.json()["details"]
    assert r.json()["dataset_pid"] == pid and "b.txt (19 bytes, the catalog says 20)" in details
    assert "1 file(s) missing from the landing zone: c/never.txt" in details  # a file never uploaded
    assert env.scicat.lifecycle(pid).get("archivable") is not True
    assert not env.scicat.app.store.jobs


async def test_wrong_part_and_whole_checksums_are_refused_and_nothing_is_visible(env: Env) -> None:
    pid = env.scicat.add_dataset([("big.bin", 2 * CHUNK)], owner_group=GROUP, lifecycle=UPLOADING)
    auth = env.token()
    await env.api.post("/s3/requestDatasetUpload", json={"dataset_id": pid, "dataset_size_gib": 0}, headers=auth)
    name = landing_key(pid, "big.bin")
    r = await env.api.post("/s3/presignedUrls", json={"dataset_id": pid, "object_name": name, "parts": 2},
                           headers=auth)
    body = r.json()
    pieces = [b"1" * CHUNK, b"2" * CHUNK]
    etags = [(await put(u, p)).headers["ETag"].strip('"') for u, p in zip(body["urls"], pieces, strict=True)]
    sums = [b64sha(p) for p in pieces]

    async def complete(part_sums: list[str], whole: str, tags: list[str] = etags) -> httpx.Response:
        return await env.api.post("/s3/completeUpload", headers=auth, json={
            "dataset_id": pid, "object_name": name, "upload_id": body["upload_id"], "checksum_sha256": whole,
            "parts": [{"part_number": i + 1, "etag": t, "checksum_sha256": s}
                      for i, (t, s) in enumerate(zip(tags, part_sums, strict=True))]})

    r = await complete(sums, composite_sha256([sums[1], sums[0]]))  # whole of the parts in another order
    assert r.status_code == 422 and "whole-object checksum" in r.json()["details"]
    r = await complete([sums[0], b64sha(b"other")], composite_sha256(sums))  # a part claims other bytes
    assert r.status_code == 422
    r = await complete(sums, composite_sha256(sums), [etags[0], "0" * 32])  # not the uploaded part
    assert r.status_code == 422 and "ETag" in r.json()["details"]
    assert env.objects() == {}
    r = await complete(sums, composite_sha256(sums) + "-2")  # S3's own notation is accepted too
    assert r.status_code == 201, r.text
    assert env.objects() == {name: 2 * CHUNK}


async def test_keys_are_checked_against_the_dataset(env: Env) -> None:
    pid = env.scicat.add_dataset([("a", 1)], owner_group=GROUP, lifecycle=UPLOADING)
    other = env.scicat.add_dataset([("a", 1)], owner_group=GROUP, lifecycle=UPLOADING)
    auth = env.token()
    await env.api.post("/s3/requestDatasetUpload", json={"dataset_id": pid, "dataset_size_gib": 0}, headers=auth)
    bad = [landing_key(other, "a"), landing_key(pid, "../../x/a"), "/" + landing_key(pid, "a"),
           landing_key(pid, "a\x00b"), landing_key(pid, "a\nb"), "elsewhere/a"]
    for name in bad:
        r = await env.api.post("/s3/presignedUrls", json={"dataset_id": pid, "object_name": name, "parts": 1},
                               headers=auth)
        assert r.status_code == 422, (name, r.text)
        assert r.json()["details"]
    r = await env.api.post("/s3/presignedUrls", json={"dataset_id": pid, "object_name": landing_key(pid, "a"),
                                                      "parts": 10_001}, headers=auth)
    assert r.status_code == 422 and "10000" in r.json()["details"]
    r = await env.api.post("/s3/presignedUrls", json={"dataset_id": pid, "object_name": landing_key(pid, "a"),
                                                      "parts": "3"}, headers=auth)
    assert r.status_code == 422  # strict types, as the reference
    r = await env.api.post("/s3/presignedUrls", json={"dataset_id": other, "object_name": landing_key(other, "a"),
                                                      "parts": 1}, headers=auth)
    assert r.status_code == 409  # no upload requested for it


async def test_presigned_puts_signs_a_batch_checked_like_single_files(env: Env) -> None:
    files = {f"f{i}.bin": bytes([i]) * (1000 + i) for i in range(5)}
    pid = env.scicat.add_dataset([(p, len(d)) for p, d in files.items()], owner_group=GROUP, lifecycle=UPLOADING)
    other = env.scicat.add_dataset([("a", 1)], owner_group=GROUP, lifecycle=UPLOADING)
    auth = env.token()
    names = [landing_key(pid, p) for p in files]
    r = await env.api.post("/s3/presignedPuts", json={"dataset_id": pid, "object_names": names}, headers=auth)
    assert r.status_code == 409  # no upload requested yet
    await env.api.post("/s3/requestDatasetUpload", json={"dataset_id": pid, "dataset_size_gib": 0}, headers=auth)
    # one bad name refuses the whole batch, and no URL is handed out
    for bad in (landing_key(other, "a"), landing_key(pid, "../../x/a"), landing_key(pid, "a\x00b")):
        r = await env.api.post("/s3/presignedPuts", json={"dataset_id": pid, "object_names": [*names, bad]},
                               headers=auth)
        assert r.status_code == 422 and r.json()["details"], (bad, r.text)
        assert "urls" not in r.json()
    r = await env.api.post("/s3/presignedPuts", json={"dataset_id": pid, "object_names": []}, headers=auth)
    assert r.status_code == 422
    r = await env.api.post("/s3/presignedPuts", json={"dataset_id": pid, "object_names": names},
                           headers=env.token(groups=["/elsewhere"]))
    assert r.status_code == 403
    r = await env.api.post("/s3/presignedPuts", json={"dataset_id": pid, "object_names": names}, headers=auth)
    assert r.status_code == 201, r.text
    urls = r.json()["urls"]
    assert len(urls) == len(names)
    for url, data in zip(urls, files.values(), strict=True):  # in the order asked: each URL writes its own key
        resp = await put(url, data)
        assert resp.status_code == 200, resp.text
    assert env.objects() == {landing_key(pid, p): len(d) for p, d in files.items()}


async def test_single_put_urls_are_the_ones_botocore_signs(env: Env) -> None:
    """The landing storage signs single PUTs without botocore's per-URL endpoint rules: its URLs
    are botocore's own, byte for byte (made in the same second, so with the same date), for
    keys that need quoting and with a storage class signed in, and S3 takes them."""
    import time
    from datetime import timedelta

    landing: Any = env.ingest.landing
    signer = await landing.clients.presigner()
    pid = env.scicat.add_dataset([("a", 1)], owner_group=GROUP, lifecycle=UPLOADING)
    for headers in ({}, {"x-amz-storage-class": "GLACIER"}):
        for key in (f"{pid}/a b/ünï名前+%.json", f"{pid}/x~y/z=1&q"):
            while True:
                second = int(time.time())
                ours = await landing.presign_put(key, timedelta(hours=1), headers=headers)
                params = {"Bucket": env.bucket, "Key": landing.client_key(key),
                          **({"StorageClass": "GLACIER"} if headers else {})}
                theirs = await signer.generate_presigned_url("put_object", Params=params, ExpiresIn=3600)
                if int(time.time()) == second:
                    break
            assert ours == theirs
        assert any(v is not None and k != "client" for k, v in landing._put_signers.items())  # the lighter one
    url = await landing.presign_put(f"{pid}/a b/ünï名前+%.json", timedelta(hours=1), headers={})
    resp = await put(base64.b64encode(url.encode()).decode(), b"x")
    assert resp.status_code == 200, resp.text
    assert env.objects() == {landing.client_key(f"{pid}/a b/ünï名前+%.json"): 1}


async def test_small_parts_except_the_last_are_refused(env: Env) -> None:
    pid = env.scicat.add_dataset([("f", 3 * MIB)], owner_group=GROUP, lifecycle=UPLOADING)
    auth = env.token()
    await env.api.post("/s3/requestDatasetUpload", json={"dataset_id": pid, "dataset_size_gib": 0}, headers=auth)
    r = await ingestor_upload_file(env, auth, pid, "f", b"z" * 3 * MIB, chunk=1 * MIB)
    assert r is not None and r.status_code == 422 and "at least" in r.json()["details"]
    assert env.objects() == {}


async def test_tokens_forged_expired_or_of_other_groups_are_refused(env: Env) -> None:
    from tests.support.daemon import new_key

    pid = env.scicat.add_dataset([("a", 1)], owner_group=GROUP, access_groups=["friends"], lifecycle=UPLOADING)
    body = {"dataset_id": pid, "dataset_size_gib": 0}
    forged = env.jwks.mint(key=new_key(), kid=env.jwks.keys[0].kid, groups=[GROUP])
    cases = {
        "forged": ({"Authorization": f"Bearer {forged}"}, 401),
        "expired": (env.token(expires_in=-120), 401),
        "none": ({}, 401),
        "other group": (env.token(groups=["/strangers"]), 403),
    }
    for name, (headers, status) in cases.items():
        r = await env.api.post("/s3/requestDatasetUpload", json=body, headers=headers)
        assert r.status_code == status, (name, r.text)
    assert await env.state.reservation(pid) is None
    r = await env.api.post("/s3/requestDatasetUpload", json=body, headers=env.token(groups=["friends"]))
    assert r.status_code == 201  # an access group is enough


async def test_quota_507_then_released_by_finalize_and_abort(env: Env) -> None:
    auth = env.token()
    a = env.scicat.add_dataset([("a", 10)], owner_group=GROUP, lifecycle=UPLOADING)
    b = env.scicat.add_dataset([("b", 10)], owner_group=GROUP, lifecycle=UPLOADING)
    c = env.scicat.add_dataset([("c", 10)], owner_group=GROUP, lifecycle=UPLOADING)

    async def ask(pid: str, gib: int) -> httpx.Response:
        return await env.api.post("/s3/requestDatasetUpload", json={"dataset_id": pid, "dataset_size_gib": gib},
                                  headers=auth)

    assert (await ask(a, 1)).status_code == 201  # 2 GiB reserved of 3
    assert (await ask(c, 0)).status_code == 201  # 1 GiB: full
    r = await ask(b, 0)
    assert r.status_code == 507
    assert r.headers["content-type"].startswith("application/json")
    assert r.json()["message"] == f"Not enough free space for dataset {b}"
    assert (r.json()["dataset_id"], r.json()["requested_size_gib"]) == (b, 0)
    await ingestor_upload_file(env, auth, a, "a", b"a" * 10)
    r = await env.api.post("/s3/finalizeDatasetUpload", headers=auth, json={
        "dataset_id": a, "create_archiving_job": False, "owner_group": GROUP, "owner_user": "o",
        "contact_email": "o@example.org"})
    assert r.status_code == 201, r.text
    assert (await ask(b, 0)).status_code == 201  # a's reservation was released
    assert (await ask(a, 0)).status_code == 409  # finalized: no new upload of it
    r = await env.api.post("/s3/abortDatasetUpload", headers=auth, json={"dataset_id": b})
    assert r.status_code == 201 and r.json() == {"dataset_id": b, "message": f"Upload {b} aborted."}
    usage = await env.ingest.quota.usage()
    assert usage.reserved == GIB  # c's only (a's 10 bytes are stored, not reserved)
    assert usage.used == 10


async def test_abort_leaves_nothing_behind(env: Env) -> None:
    pid = env.scicat.add_dataset([("a", 10), ("big", 2 * CHUNK)], owner_group=GROUP, lifecycle=UPLOADING)
    auth = env.token()
    await env.api.post("/s3/requestDatasetUpload", json={"dataset_id": pid, "dataset_size_gib": 0}, headers=auth)
    await ingestor_upload_file(env, auth, pid, "a", b"a" * 10)
    r = await env.api.post("/s3/presignedUrls", headers=auth,
                           json={"dataset_id": pid, "object_name": landing_key(pid, "big"), "parts": 2})
    assert (await put(r.json()["urls"][0], b"1" * CHUNK)).status_code == 200
    assert env.open_uploads() and env.objects()
    # the client's abort of one upload: no dataset_id
    r2 = await env.api.post("/s3/presignedUrls", headers=auth,
                            json={"dataset_id": pid, "object_name": landing_key(pid, "big2"), "parts": 2})
    r = await env.api.post("/s3/abortMultipartUpload", headers=auth, json={
        "dataset_id": "", "object_name": landing_key(pid, "big2"), "upload_id": r2.json()["upload_id"]})
    assert r.status_code == 201 and r.json()["message"] == "Abortin multipart upload succeeded."
    assert len(env.open_uploads()) == 1
    r = await env.api.post("/s3/abortDatasetUpload", headers=auth, json={"dataset_id": pid})
    assert r.status_code == 201, r.text
    assert env.open_uploads() == []
    assert env.objects() == {}
    assert await env.state.reservation(pid) is None


async def test_concurrent_requests_cannot_over_commit(env: Env) -> None:
    auth = env.token()
    pids = [env.scicat.add_dataset([("a", 1)], owner_group=GROUP, lifecycle=UPLOADING) for _ in range(6)]
    statuses: list[int] = []

    async def ask(pid: str) -> None:
        r = await env.api.post("/s3/requestDatasetUpload", json={"dataset_id": pid, "dataset_size_gib": 0},
                               headers=auth)
        statuses.append(r.status_code)

    async with anyio.create_task_group() as tg:
        for pid in pids:
            tg.start_soon(ask, pid)
    assert sorted(statuses) == [201, 201, 201, 507, 507, 507]  # 3 GiB: three reservations of 1 GiB
    assert sum(r.bytes for r in await env.state.reservations()) == 3 * GIB


async def test_one_listing_serves_grants_until_a_reservation_ends(
        tmp_path: Path, s3_server: S3Server, s3_options: dict[str, Any], scicat: SciCatServer,
        jwks: JWKSServer) -> None:
    """Grants in a row share one listing of the landing zone; a refusal is decided on a fresh one,
    and so is any grant after a reservation ended (its bytes uploaded since the listing would
    drop out of the count unseen: an over-commit)."""
    a, b, c = (scicat.add_dataset([("f", MIB)], owner_group=GROUP, lifecycle=UPLOADING) for _ in range(3))
    bucket = s3_options["bucket"]

    def listings() -> int:
        log = s3_server.log_path.read_text(errors="replace")
        return sum(1 for line in log.splitlines() if f'"GET /{bucket}?' in line and "list-type=2" in line)

    async for env in build(tmp_path, s3_server, s3_options, scicat, jwks, landing_space="2GiB"):
        auth = env.token()

        async def ask(pid: str, env: Env = env, auth: dict[str, str] = auth) -> int:
            r = await env.api.post("/s3/requestDatasetUpload", json={"dataset_id": pid, "dataset_size_gib": 0},
                                   headers=auth)
            return r.status_code

        assert await ask(a) == 201
        mark = listings()
        assert await ask(b) == 201
        assert listings() == mark  # the first grant's listing served
        assert await ask(c) == 507  # 2 GiB of 2 GiB reserved
        assert listings() == mark + 1  # refused on a fresh listing
        r = await env.api.post("/s3/presignedPuts", json={"dataset_id": a, "object_names": [landing_key(a, "f")]},
                               headers=auth)
        assert (await put(r.json()["urls"][0], b"f" * MIB)).status_code == 200
        with sqlite3.connect(tmp_path / "ingest.sqlite") as db:  # a's reservation ends; its MiB stays
            db.execute("UPDATE reservations SET expires = 0 WHERE pid = ?", (a,))
        # b's GiB, c's GiB and a's MiB do not fit in 2 GiB: on the earlier listing (nothing stored) they would
        assert await ask(c) == 507
        assert listings() == mark + 2


async def test_reservations_survive_a_restart_and_expire(tmp_path: Path, s3_server: S3Server,
                                                         s3_options: dict[str, Any], scicat: SciCatServer,
                                                         jwks: JWKSServer) -> None:
    pid = scicat.add_dataset([("a", 1)], owner_group=GROUP, lifecycle=UPLOADING)
    other = scicat.add_dataset([("a", 1)], owner_group=GROUP, lifecycle=UPLOADING)
    async for env in build(tmp_path, s3_server, s3_options, scicat, jwks, landing_space="1GiB"):
        auth = env.token()
        r = await env.api.post("/s3/requestDatasetUpload", json={"dataset_id": pid, "dataset_size_gib": 0},
                               headers=auth)
        assert r.status_code == 201
    async for env in build(tmp_path, s3_server, s3_options, scicat, jwks, landing_space="1GiB"):
        auth = env.token()
        r = await env.api.post("/s3/requestDatasetUpload", json={"dataset_id": other, "dataset_size_gib": 0},
                               headers=auth)
        assert r.status_code == 507  # the first reservation is still there
    with sqlite3.connect(tmp_path / "ingest.sqlite") as db:  # age it past its expiry
        db.execute("UPDATE reservations SET expires = 0")
    async for env in build(tmp_path, s3_server, s3_options, scicat, jwks, landing_space="1GiB"):
        r = await env.api.post("/s3/requestDatasetUpload", json={"dataset_id": other, "dataset_size_gib": 0},
                               headers=env.token())
        assert r.status_code == 201


async def test_unknown_dataset_and_500_bodies(env: Env) -> None:
    r = await env.api.post("/s3/requestDatasetUpload", json={"dataset_id": "20.500/nope", "dataset_size_gib": 0},
                           headers=env.token())
    assert r.status_code == 404 and r.json()["details"]
    r = await env.api.post("/s3/finalizeDatasetUpload", headers=env.token(), json={
        "dataset_id": "20.500/nope", "create_archiving_job": True, "owner_group": GROUP, "owner_user": "o",
        "contact_email": "o@example.org"})
    assert r.status_code == 404 and r.json()["dataset_pid"] == "20.500/nope"


async def test_token_exchange(tmp_path: Path, s3_server: S3Server, s3_options: dict[str, Any], scicat: SciCatServer,
                              jwks: JWKSServer) -> None:
    idp = TokenEndpoint()
    (tmp_path / "password").write_text("svc-password\n")
    (tmp_path / "secret").write_text("svc-secret\n")
    scicat.add_user("ingestor", "ingestor-pw", ["ingestors"])
    scicat.add_user("stranger", "stranger-pw", ["others"])

    def scicat_token(user: str, password: str) -> str:
        r = httpx.post(f"{scicat.url}/api/v3/auth/login", json={"username": user, "password": password})
        return str(r.json()["access_token"])

    try:
        async for env in build(tmp_path, s3_server, s3_options, scicat, jwks, scicat_url=f"{scicat.url}/api/v3",
                               ingestor_groups=["ingestors"], token_url=idp.url, client_id="svc-api",
                               username="svc", password_file=str(tmp_path / "password"),
                               client_secret_file=str(tmp_path / "secret")):
            ingestor = scicat_token("ingestor", "ingestor-pw")
            r = await env.api.post("/token", headers={"Authorization": f"Bearer {ingestor}"})
            assert r.status_code == 201, r.text
            body = r.json()
            assert body["access_token"] == "svc-access" and body["expires_in"] == 300
            assert body["not-before-policy"] == 0
            assert idp.forms[-1]["client_secret"] == ["svc-secret"] and idp.forms[-1]["username"] == ["svc"]
            # a token of the identity provider itself (it has a kid) is checked as one, not by SciCat
            r = await env.api.post("/token", headers=env.token())
            assert r.status_code == 201, r.text
            asked = len(idp.forms)
            stranger = scicat_token("stranger", "stranger-pw")
            for headers in (env.token(expires_in=-120), {"Authorization": f"Bearer {stranger}"},
                            {"Authorization": "Bearer not-a-scicat-token"}, {}):
                r = await env.api.post("/token", headers=headers)
                assert r.status_code == 401, r.text
            assert len(idp.forms) == asked  # no service token for them
            # the service account uploads any dataset (its tokens are every ingestor's); others only their own
            pid = scicat.add_dataset([("a", 1)], owner_group="elsewhere", lifecycle=UPLOADING)
            body = {"dataset_id": pid, "dataset_size_gib": 0}
            r = await env.api.post("/s3/requestDatasetUpload", json=body,
                                   headers=env.token(groups=[], preferred_username="someone"))
            assert r.status_code == 403
            r = await env.api.post("/s3/requestDatasetUpload", json=body,
                                   headers=env.token(groups=[], preferred_username="svc"))
            assert r.status_code == 201, r.text
    finally:
        idp.close()


async def test_an_upload_that_outgrows_a_full_quota_is_refused_at_complete(
        tmp_path: Path, s3_server: S3Server, s3_options: dict[str, Any], scicat: SciCatServer,
        jwks: JWKSServer) -> None:
    a = scicat.add_dataset([("big", 2 * CHUNK)], owner_group=GROUP, lifecycle=UPLOADING)
    b = scicat.add_dataset([("x", 1)], owner_group=GROUP, lifecycle=UPLOADING)
    async for env in build(tmp_path, s3_server, s3_options, scicat, jwks, landing_space="2GiB"):
        auth = env.token()
        for pid in (a, b):
            r = await env.api.post("/s3/requestDatasetUpload", json={"dataset_id": pid, "dataset_size_gib": 0},
                                   headers=auth)
            assert r.status_code == 201
        with sqlite3.connect(tmp_path / "ingest.sqlite") as db:  # a said it was tiny; b holds the rest
            db.execute("UPDATE reservations SET bytes = 100 WHERE pid = ?", (a,))
            db.execute("UPDATE reservations SET bytes = ? WHERE pid = ?", (2 * GIB - 200, b))
        r = await ingestor_upload_file(env, auth, a, "big", b"q" * 2 * CHUNK)
        assert r is not None and r.status_code == 422 and "outgrew its reservation" in r.json()["details"]
        assert env.objects() == {}
        with sqlite3.connect(tmp_path / "ingest.sqlite") as db:  # space again: the same upload grows
            db.execute("UPDATE reservations SET bytes = 100 WHERE pid = ?", (b,))
        r = await ingestor_upload_file(env, auth, a, "big", b"q" * 2 * CHUNK)
        assert r is not None and r.status_code == 201, r.text
        reservation = await env.state.reservation(a)
        assert reservation is not None and reservation.bytes == 2 * CHUNK


async def test_a_failing_landing_storage_is_a_500_with_details(
        tmp_path: Path, s3_server: S3Server, s3_options: dict[str, Any], scicat: SciCatServer,
        jwks: JWKSServer) -> None:
    from tests.support.faultproxy import FaultProxy

    pid = scicat.add_dataset([("big", 2 * CHUNK)], owner_group=GROUP, lifecycle=UPLOADING)
    with FaultProxy(s3_server.host, s3_server.port) as proxy:
        options = {**s3_options, "endpoint_url": proxy.url, "max_attempts": 2}
        async for env in build(tmp_path, s3_server, options, scicat, jwks, landing_space="3GiB"):
            auth = env.token()
            r = await env.api.post("/s3/requestDatasetUpload", json={"dataset_id": pid, "dataset_size_gib": 0},
                                   headers=auth)
            assert r.status_code == 201
            proxy.fail_always(status=500, method="POST")  # CreateMultipartUpload
            r = await env.api.post("/s3/presignedUrls", headers=auth, json={
                "dataset_id": pid, "object_name": landing_key(pid, "big"), "parts": 2})
            assert r.status_code == 500 and r.headers["content-type"].startswith("application/json")
            assert r.json()["message"] == "Failed to get presigned urls" and "InternalError" in r.json()["details"]
            proxy.clear()


async def test_unexpected_exceptions_are_json_500s_with_details(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """Not a StorageError or CatalogError: an exception of a type no route expects (a bug, a
    library's surprise) from the landing storage or the catalog is still JSON with ``details``."""
    pid = env.scicat.add_dataset([("big", 2 * CHUNK)], owner_group=GROUP, lifecycle=UPLOADING)
    auth = env.token()
    r = await env.api.post("/s3/requestDatasetUpload", json={"dataset_id": pid, "dataset_size_gib": 0}, headers=auth)
    assert r.status_code == 201

    async def broken_storage(*args: Any, **kwargs: Any) -> str:
        raise KeyError("UploadId")

    async def broken_catalog(*args: Any, **kwargs: Any) -> Any:
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(env.ingest.landing, "create_upload", broken_storage)
    r = await env.api.post("/s3/presignedUrls", headers=auth, json={
        "dataset_id": pid, "object_name": landing_key(pid, "big"), "parts": 2})
    assert r.status_code == 500 and r.headers["content-type"].startswith("application/json"), r.text
    assert r.json()["message"] and "KeyError" in r.json()["details"] and "UploadId" in r.json()["details"]
    monkeypatch.setattr(env.app.catalog, "list_files", broken_catalog)
    r = await env.api.post("/s3/finalizeDatasetUpload", headers=auth, json={
        "dataset_id": pid, "create_archiving_job": False, "owner_group": GROUP, "owner_user": "o",
        "contact_email": "o@example.org"})
    assert r.status_code == 500 and r.headers["content-type"].startswith("application/json"), r.text
    assert "ZeroDivisionError" in r.json()["details"]
    # refusals keep their own status and body
    r = await env.api.post("/s3/presignedUrls", headers=auth, json={
        "dataset_id": pid, "object_name": "elsewhere/big", "parts": 2})
    assert r.status_code == 422 and "not under" in r.json()["details"]
    r = await env.api.post("/s3/presignedUrls", headers={}, json={
        "dataset_id": pid, "object_name": landing_key(pid, "big"), "parts": 2})
    assert r.status_code == 401


async def test_concurrent_finalizes_make_one_job(env: Env) -> None:
    pid = env.scicat.add_dataset([("a", 10)], owner_group=GROUP, lifecycle=UPLOADING)
    auth = env.token()
    await env.api.post("/s3/requestDatasetUpload", json={"dataset_id": pid, "dataset_size_gib": 0}, headers=auth)
    await ingestor_upload_file(env, auth, pid, "a", b"a" * 10)
    statuses: list[int] = []

    async def finalize() -> None:
        r = await env.api.post("/s3/finalizeDatasetUpload", headers=auth, json={
            "dataset_id": pid, "create_archiving_job": True, "owner_group": GROUP, "owner_user": "o",
            "contact_email": "o@example.org"})
        statuses.append(r.status_code)

    async with anyio.create_task_group() as tg:
        for _ in range(4):
            tg.start_soon(finalize)
    assert statuses == [201] * 4
    assert len([j for j in env.scicat.app.store.jobs.values() if j["type"] == "archive"]) == 1
