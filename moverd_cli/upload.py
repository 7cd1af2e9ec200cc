"""``moverd upload PATH --dataset PID``: a client of the daemon's upload API, as the facility's
client uses it, that can also resume.

The bytes go from the files straight to S3 through presigned URLs; the daemon only signs,
checks and finalizes. Files under one part go in one PUT, bigger ones in parts of
``--part-size``, ``--parallel`` parts in flight across all files, each part sent with its SHA-256
(``x-amz-checksum-sha256``). Before it starts, the client asks the daemon what the dataset's upload
left so far (``/s3/uploadState``): a file already there at its size is skipped, and an open
multipart upload of a file continues, its parts already in S3 (at their expected size and, where
S3 kept one, their checksum) not sent again. So a run that was killed is simply run again.
"""

from __future__ import annotations

import base64
import hashlib
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx

from moverd.errors import MoverdError, UserError
from moverd.events import Transfer
from moverd.keys import safe_key
from moverd_daemon.ingest.service import composite_sha256

GIB = 1024**3


class ApiError(MoverdError):
    """The daemon refused or failed a request."""


class ApiUserError(ApiError, UserError):
    """A refusal because of the request (4xx): exit code 2."""


@dataclass
class LocalFile:
    path: Path
    rel: str
    size: int


@dataclass
class Result:
    dataset: str
    files: int = 0
    bytes: int = 0
    skipped_files: int = 0
    parts_sent: int = 0
    parts_resumed: int = 0
    job_id: str | None = None
    finalized: bool = False
    sent: list[str] = field(default_factory=list)


def local_files(root: Path) -> list[LocalFile]:
    """Every regular file under ``root`` (or ``root`` itself), with its dataset-relative path."""
    if root.is_file():
        return [LocalFile(root, safe_key(root.name), root.stat().st_size)]
    if not root.is_dir():
        raise UserError(f"{root}: no such file or folder")
    out = []
    for dirpath, _, names in os.walk(root):
        for name in sorted(names):
            p = Path(dirpath) / name
            if p.is_file() and not p.is_symlink():
                out.append(LocalFile(p, safe_key(p.relative_to(root).as_posix()), p.stat().st_size))
    return sorted(out, key=lambda f: f.rel)


def b64sha256(data: bytes | memoryview) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


class Uploader:
    def __init__(self, url: str, token: str | None, *, part_size: int, parallel: int, timeout: float = 60) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.api = httpx.AsyncClient(base_url=url.rstrip("/"), headers=headers, timeout=timeout)
        self.s3 = httpx.AsyncClient(timeout=httpx.Timeout(timeout, read=max(timeout, 300)))
        self.part_size = part_size
        self.slots = anyio.Semaphore(parallel)
        self.on_part: Callable[[int], None] = lambda n: None

    async def aclose(self) -> None:
        await self.api.aclose()
        await self.s3.aclose()

    async def call(self, path: str, body: dict[str, Any]) -> Any:
        try:
            resp = await self.api.post(path, json=body)
        except httpx.HTTPError as exc:
            raise ApiError(f"{self.api.base_url}{path}: {type(exc).__name__}: {exc}") from None
        if resp.status_code == 201:
            return resp.json()
        try:
            doc = resp.json()
            why = doc.get("details") or doc.get("detail") or doc.get("message") or resp.text
        except ValueError:
            why = resp.text[:200]
        cls = ApiUserError if 400 <= resp.status_code < 500 else ApiError
        raise cls(f"{path}: {resp.status_code}: {why}")

    async def put(self, url_b64: str, data: bytes, checksum: str) -> str:
        """One presigned PUT with its SHA-256 (as the facility's client, without its storage class,
        which the daemon would have signed into the URL); returns the ETag."""
        url = base64.b64decode(url_b64).decode()
        headers = {"x-amz-checksum-sha256": checksum, "Content-Type": ""}
        for attempt in range(5):
            try:
                resp = await self.s3.put(url, content=data, headers=headers)
            except httpx.TransportError as exc:
                if attempt == 4:
                    raise ApiError(f"PUT to S3 failed: {type(exc).__name__}: {exc}") from None
                await anyio.sleep(2**attempt)
                continue
            if resp.status_code == 200:
                return str(resp.headers.get("ETag", "")).strip('"')
            if resp.status_code < 500 or attempt == 4:
                raise ApiError(f"PUT to S3 answered {resp.status_code}: {resp.text[:200]}")
            await anyio.sleep(2**attempt)
        raise AssertionError("unreachable")

    async def upload(self, root: Path, pid: str, transfer: Transfer, *, finalize: bool, archive: bool,
                     owner: dict[str, str]) -> Result:
        files = local_files(root)
        total = sum(f.size for f in files)
        transfer.files_total, transfer.bytes_total = len(files), total
        result = Result(dataset=pid, files=len(files), bytes=total)
        await self.call("/s3/requestDatasetUpload", {"dataset_id": pid, "dataset_size_gib": total // GIB})
        state = await self.call("/s3/uploadState", {"dataset_id": pid})
        prefix = state["landing_prefix"]
        stored = {o["object_name"]: o["size"] for o in state["objects"]}
        open_uploads = {u["object_name"]: u for u in state["uploads"]}

        async def one(f: LocalFile) -> None:
            name = f"{prefix}/{f.rel}" if prefix else f.rel
            if stored.get(name) == f.size and name not in open_uploads:
                result.skipped_files += 1
            elif f.size < self.part_size:
                await self._single(pid, name, f)
                result.sent.append(f.rel)
            else:
                await self._multipart(pid, name, f, open_uploads.get(name), result, transfer)
                result.sent.append(f.rel)
            if f.size < self.part_size or stored.get(name) == f.size:
                transfer.bytes_done += f.size
            transfer.files_done += 1

        async with anyio.create_task_group() as tg:
            for f in files:
                tg.start_soon(one, f)
        if finalize:
            await self.call("/s3/finalizeDatasetUpload", {
                "dataset_id": pid, "create_archiving_job": archive, "owner_group": owner.get("group", ""),
                "owner_user": owner.get("user", ""), "contact_email": owner.get("email", "")})
            result.finalized = True
        return result

    async def _single(self, pid: str, name: str, f: LocalFile) -> None:
        async with self.slots:
            data = await anyio.Path(f.path).read_bytes()
            answer = await self.call("/s3/presignedUrls", {"dataset_id": pid, "object_name": name, "parts": 1})
            await self.put(answer["urls"][0], data, b64sha256(data))

    async def _multipart(self, pid: str, name: str, f: LocalFile, resume: dict[str, Any] | None,
                         result: Result, transfer: Transfer) -> None:
        count = math.ceil(f.size / self.part_size)
        have: dict[int, dict[str, Any]] = {}
        body: dict[str, Any] = {"dataset_id": pid, "object_name": name, "parts": count}
        if resume is not None and len(resume["parts"]) <= count:
            body["upload_id"] = resume["upload_id"]
            have = {p["part_number"]: p for p in resume["parts"]}
        answer = await self.call("/s3/presignedUrls", body)
        upload_id, urls = answer["upload_id"], answer["urls"]
        done: list[dict[str, Any]] = [{} for _ in range(count)]

        async def part(n: int) -> None:
            offset = (n - 1) * self.part_size
            length = min(self.part_size, f.size - offset)
            async with self.slots:
                data = await anyio.to_thread.run_sync(_read, f.path, offset, length)
                checksum = await anyio.to_thread.run_sync(b64sha256, data)
                old = have.get(n)
                if old is not None and old["size"] == length and old.get("checksum_sha256") in (None, checksum):
                    etag = old["etag"]
                    result.parts_resumed += 1
                else:
                    etag = await self.put(urls[n - 1], data, checksum)
                    result.parts_sent += 1
                    self.on_part(n)
                transfer.bytes_done += length
                done[n - 1] = {"part_number": n, "etag": etag, "checksum_sha256": checksum}

        async with anyio.create_task_group() as tg:
            for n in range(1, count + 1):
                tg.start_soon(part, n)
        await self.call("/s3/completeUpload", {
            "dataset_id": pid, "object_name": name, "upload_id": upload_id, "parts": done,
            "checksum_sha256": composite_sha256([p["checksum_sha256"] for p in done])})


def _read(path: Path, offset: int, length: int) -> bytes:
    with path.open("rb") as fh:
        fh.seek(offset)
        return fh.read(length)
