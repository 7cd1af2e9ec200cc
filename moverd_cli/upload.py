"""``moverd upload PATH --dataset PID``: a client of the daemon's upload API, as the facility's
client uses it, that can also resume.

The bytes go from the files straight to S3 through presigned URLs; the daemon only signs,
checks and finalizes. Files under one part go in one PUT, bigger ones in parts of
``--part-size``, ``--parallel`` parts in flight across all files, each part sent with its SHA-256
(``x-amz-checksum-sha256``). Before it starts, the client asks the daemon what the dataset's upload
left so far (``/s3/uploadState``): a file already there at its size is skipped, and an open
multipart upload of a file continues, its parts already in S3 (at their expected size and, where
S3 kept one, their checksum) not sent again. So a run that was killed is simply run again. A
presigned URL that S3 refuses as expired (the daemon's ``ingest.url_expiry`` passed before a big
file's later parts were sent) is signed again, for the same multipart upload, and the run goes on.

Memory is bounded by design: a pool of ``--parallel`` buffers of ``--part-size`` (each made on
first need, never more than ``--parallel``, reused until the end) holds every byte read. A part
or a small file is read into a free buffer with ``readinto`` and sent from it in slices, and no
buffer is freed mid-run. (Before, each part was read into a new ``bytes`` and handed to the
socket whole, and asyncio's transport copied the unsent rest of it twice: 710-830 MiB peak RSS
for one 1 GiB file at 16 x 16 MiB, where the parts are 256 MiB; 329 MiB now.)

Files under one part are presigned in batches (moverd's ``/s3/presignedPuts``): one request signs
up to :data:`PRESIGN_BATCH` single PUTs, where the facility's client asks once per file.

The PUTs are blocking urllib3 requests in worker threads, as the S3 plugin's read path is: the
socket sends straight from the buffer (no slice is copied), and a small file is read, hashed and
sent in one worker thread's turn. Through httpx's async client each PUT cost the event loop about
2 ms of CPU (h11 framing, a copy of every 256 KiB slice), which on a busy host made the client,
not S3, the limit for many small files. The few API calls stay on httpx. Both go through the
proxy the environment names, if any (:meth:`Uploader._pool_for`).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import logging
import math
import os
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import anyio
import httpx
import urllib3

from moverd.buffers import SlabPool
from moverd.checksums import composite_sha256
from moverd.errors import MoverdError, UserError
from moverd.events import Transfer
from moverd.keys import safe_key
from moverd.retry import retry_blocking
from moverd.units import format_size
from moverd_daemon.ingest.models import MAX_PARTS

MIB = 1024**2
GIB = 1024**3
MIN_PART_SIZE, MAX_PART_SIZE = 5 * MIB, 5 * GIB
"""S3's bounds on a part (the last one may be smaller)."""
T = TypeVar("T")

log = logging.getLogger(__name__)


class ApiError(MoverdError):
    """The daemon refused or failed a request."""


class ApiUserError(ApiError, UserError):
    """A refusal because of the request (4xx): exit code 2."""


class _TransientPutError(ApiError):
    """A PUT that broke or that S3 answered with a 5xx: sent again (:data:`PUT_ATTEMPTS`)."""


class UrlExpiredError(ApiError):
    """S3 refused a presigned URL as expired (the daemon's ``ingest.url_expiry`` passed before it
    was used: a big file's later parts over a slow link). The client asks for a new one."""


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
    urls_renewed: int = 0
    uploads_aborted: int = 0
    """Open multipart uploads of an earlier run whose parts did not fit this run's part size."""
    job_id: str | None = None
    finalized: bool = False
    part_size: int = 0
    """The part size used: ``--part-size``, or bigger when a file needs more than S3's 10 000
    parts of it."""
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


def b64sha256(data: bytes | bytearray | memoryview) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


PRESIGN_BATCH = 256
"""Single PUTs presigned per ``/s3/presignedPuts`` request: few requests for many small files,
while a batch's URLs are used long before they expire."""
PUT_ATTEMPTS = 5
"""Tries of one PUT on a broken connection or a 5xx answer (moverd's backoff, from 1 s)."""
URL_RENEWALS = 2
"""New URLs for one PUT that S3 refused as expired; a freshly signed one refused again means the
clocks of the daemon's host and of S3 are apart."""


def _read_into(path: Path, offset: int, view: memoryview) -> None:
    """Fill ``view`` with the file's bytes from ``offset``; a file that shrank is an error."""
    with path.open("rb", buffering=0) as fh:
        fh.seek(offset)
        got = 0
        while got < len(view):
            n = fh.readinto(view[got:])
            if not n:
                raise UserError(f"{path}: the file shrank while it was uploaded (read {offset + got} bytes)")
            got += n


class Uploader:
    def __init__(self, url: str, token: str | None, *, part_size: int, parallel: int, timeout: float = 60) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        try:  # httpx reads the environment's proxies here
            self.api = httpx.AsyncClient(base_url=url.rstrip("/"), headers=headers, timeout=timeout)
        except (ValueError, ImportError) as exc:  # an unknown scheme; SOCKS without socksio
            raise UserError(f"the proxy the environment names cannot be used: {exc}") from None
        # One connection per PUT in flight (``parallel``, held by the buffers), kept alive; no
        # retries or redirects of urllib3's own: :meth:`_put_blocking` retries.
        self._pool_options: dict[str, Any] = {
            "num_pools": 4, "maxsize": parallel, "retries": False,
            "timeout": urllib3.Timeout(connect=timeout, read=max(timeout, 300)),
        }
        self.s3 = urllib3.PoolManager(**self._pool_options)
        self._pools: dict[tuple[str, str], urllib3.PoolManager] = {}
        """(scheme, host:port) of a PUT's URL → the pool that carries it (:meth:`_pool_for`)."""
        self._proxied: dict[str, urllib3.ProxyManager] = {}
        self.threads = anyio.CapacityLimiter(parallel)
        self.configured_part_size = part_size
        """``--part-size``; :attr:`part_size` is the run's, which a very large file may raise."""
        self.part_size = part_size
        self.parallel = parallel
        self.buffers = SlabPool(part_size, parallel * part_size)
        self.on_part: Callable[[int], None] = lambda n: None

    @asynccontextmanager
    async def _buffer(self) -> AsyncIterator[bytearray]:
        """One of the pool's ``parallel`` buffers, for one part or small file at a time. A buffer
        whose worker thread was abandoned (on cancellation) may still be sent from: never reused."""
        (buf,) = await self.buffers.acquire(1)
        try:
            yield buf
        except BaseException:
            self.buffers.discard([buf])
            raise
        self.buffers.release([buf])

    async def _in_thread(self, func: Callable[..., T], *args: Any) -> T:
        return await anyio.to_thread.run_sync(func, *args, limiter=self.threads, abandon_on_cancel=True)

    async def aclose(self) -> None:
        await self.api.aclose()
        self.s3.clear()
        for pool in self._proxied.values():
            pool.clear()

    def _pool_for(self, url: str) -> urllib3.PoolManager:
        """The pool that carries a PUT to ``url``: straight to S3, or through the proxy the
        environment names for it (``HTTPS_PROXY``/``HTTP_PROXY``/``ALL_PROXY``, ``NO_PROXY``, as
        :mod:`urllib.request` reads them), the way the API calls go through httpx. The proxy's
        user and password, if its URL has both, go in ``Proxy-Authorization``. Decided once per
        host and scheme (the environment is read once per run, as httpx reads it once)."""
        target = urlsplit(url)
        where = (target.scheme, target.netloc)
        pool = self._pools.get(where)
        if pool is None:  # two threads at once may both build one: the first stored is used
            pool = self._pools.setdefault(where, self._new_pool(*where))
        return pool

    def _new_pool(self, scheme: str, netloc: str) -> urllib3.PoolManager:
        proxies = urllib.request.getproxies()
        proxy = proxies.get(scheme) or proxies.get("all")
        if not proxy or urllib.request.proxy_bypass(netloc):
            return self.s3
        known = self._proxied.get(proxy)  # one pool per proxy, whatever the hosts behind it
        if known is not None:
            return known
        try:
            parsed = urllib3.util.parse_url(proxy if "://" in proxy else f"http://{proxy}")
            user, _, password = (parsed.auth or "").partition(":")
            headers = (urllib3.util.make_headers(proxy_basic_auth=f"{unquote(user)}:{unquote(password)}")
                       if user and password else None)
            manager = urllib3.ProxyManager(parsed._replace(auth=None).url, proxy_headers=headers,
                                           **self._pool_options)
        except ValueError as exc:  # urllib3's LocationValueError: a URL it cannot parse or use
            why = str(exc).replace(proxy, "<its URL>")  # which may hold a password
            raise UserError(f"the proxy the environment names for {scheme}:// URLs cannot be used: {why}") from None
        return self._proxied.setdefault(proxy, manager)

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

    def _put_blocking(self, url_b64: str, data: memoryview, checksum: str) -> str:
        """One presigned PUT with its SHA-256 (as the facility's client, without its storage class,
        which the daemon would have signed into the URL), sent from the caller's buffer with its
        length (no chunked encoding, which S3 refuses); returns the ETag."""
        url = base64.b64decode(url_b64).decode()
        headers = {"x-amz-checksum-sha256": checksum, "Content-Type": "", "Content-Length": str(len(data))}

        pool = self._pool_for(url)  # a proxy setting it cannot use is the user's to mend, not retried

        def attempt() -> str:
            try:
                # urllib3 sends any buffer as it is (body_to_chunks); its annotation names only bytes.
                resp = pool.request("PUT", url, body=data, headers=headers, redirect=False)  # type: ignore[arg-type]
            except urllib3.exceptions.HTTPError as exc:
                raise _TransientPutError(f"PUT to S3 failed: {type(exc).__name__}: {exc}") from None
            if resp.status == 200:
                return str(resp.headers.get("ETag", "")).strip('"')
            text = resp.data[:300].decode(errors="replace")
            # S3's and MinIO's answer to a URL past its X-Amz-Expires
            expired = resp.status == 403 and "Request has expired" in text
            cls = _TransientPutError if resp.status >= 500 else UrlExpiredError if expired else ApiError
            raise cls(f"PUT to S3 answered {resp.status}: {text}")

        return retry_blocking(attempt, retryable=lambda exc: isinstance(exc, _TransientPutError),
                              attempts=PUT_ATTEMPTS, base_delay=1.0, max_delay=8.0, what="PUT to S3")

    def _send_file_blocking(self, url_b64: str, path: Path, view: memoryview) -> None:
        """A file under one part: read, hashed and sent in one worker thread's turn."""
        self._put_blocking(url_b64, view, _read_and_sum(path, 0, view))

    def _part_size_for(self, files: list[LocalFile]) -> int:
        """``--part-size``, or the smallest whole MiB that fits the largest file in S3's 10 000
        parts: refused by the API at its first request otherwise, after the smaller files went."""
        largest = max(files, key=lambda f: f.size, default=None)
        if largest is None or largest.size <= self.configured_part_size * MAX_PARTS:
            return self.configured_part_size
        need = -(-largest.size // MAX_PARTS)
        need = -(-need // MIB) * MIB
        if need > MAX_PART_SIZE:
            raise UserError(f"{largest.rel} ({format_size(largest.size)}) cannot be uploaded: S3 takes at most "
                            f"{MAX_PARTS} parts of {format_size(MAX_PART_SIZE)}")
        log.warning("parts of %s instead of --part-size %s: %s (%s) needs them (S3 takes at most %d parts); "
                    "the buffers take up to %s", format_size(need), format_size(self.configured_part_size), largest.rel,
                    format_size(largest.size), MAX_PARTS, format_size(need * self.parallel))
        return need

    def _resumable(self, f: LocalFile, parts: list[dict[str, Any]]) -> bool:
        """Whether an open upload's parts are parts of ``f`` at this run's part size."""
        if f.size < self.part_size:
            return False
        count = math.ceil(f.size / self.part_size)
        return all(1 <= p["part_number"] <= count and p["size"] == self._part_length(f, p["part_number"])
                   for p in parts)

    def _part_length(self, f: LocalFile, n: int) -> int:
        """The length of part ``n`` (from 1) of ``f`` at this run's part size."""
        return min(self.part_size, f.size - (n - 1) * self.part_size)

    async def upload(self, root: Path, pid: str, transfer: Transfer, *, finalize: bool, archive: bool,
                     owner: dict[str, str]) -> Result:
        files = local_files(root)
        total = sum(f.size for f in files)
        transfer.files_total, transfer.bytes_total = len(files), total
        result = Result(dataset=pid, files=len(files), bytes=total)
        self.part_size = result.part_size = self._part_size_for(files)
        # no buffer larger than the largest file needs
        size = max(1, min(self.part_size, max((f.size for f in files), default=0)))
        self.buffers = SlabPool(size, self.parallel * size)
        await self.call("/s3/requestDatasetUpload", {"dataset_id": pid, "dataset_size_gib": total // GIB})
        state = await self.call("/s3/uploadState", {"dataset_id": pid})
        prefix = state["landing_prefix"]
        stored = {o["object_name"]: o["size"] for o in state["objects"]}
        open_uploads = {u["object_name"]: u for u in state["uploads"]}
        small: list[tuple[str, LocalFile]] = []
        big: list[tuple[str, LocalFile]] = []
        for f in files:
            name = f"{prefix}/{f.rel}" if prefix else f.rel
            if stored.get(name) == f.size and name not in open_uploads:
                result.skipped_files += 1
                transfer.bytes_done += f.size
                transfer.files_done += 1
            else:
                (small if f.size < self.part_size else big).append((name, f))
                stale = open_uploads.get(name)
                if stale is not None and not self._resumable(f, stale["parts"]):
                    # Left by a run with another part size (or the file changed size): none of its
                    # parts would be reused, and parts past this run's last would stay listed.
                    await self.call("/s3/abortMultipartUpload", {
                        "dataset_id": pid, "object_name": name, "upload_id": stale["upload_id"]})
                    del open_uploads[name]
                    result.uploads_aborted += 1
        # Batches of small files, and big files, are started a few at a time: their URLs are
        # signed shortly before they are used, and no more multipart uploads are open than can
        # have a part in flight.
        ahead = anyio.CapacityLimiter(2)
        files_open = anyio.CapacityLimiter(self.parallel)

        async def presign(names: list[str]) -> list[str]:
            answer = await self.call("/s3/presignedPuts", {"dataset_id": pid, "object_names": names})
            return list(answer["urls"])

        async def batch(names: list[tuple[str, LocalFile]]) -> None:
            async with ahead:
                urls = await presign([name for name, _ in names])
                async with anyio.create_task_group() as tg:
                    for (name, f), url in zip(names, urls, strict=True):
                        tg.start_soon(self._single, url, name, f, presign, result, transfer)

        async def multipart(name: str, f: LocalFile) -> None:
            async with files_open:
                await self._multipart(pid, name, f, open_uploads.get(name), result, transfer)
                result.sent.append(f.rel)
                transfer.files_done += 1

        async with anyio.create_task_group() as tg:
            for i in range(0, len(small), PRESIGN_BATCH):
                tg.start_soon(batch, small[i:i + PRESIGN_BATCH])
            for name, f in big:
                tg.start_soon(multipart, name, f)
        if finalize:
            await self.call("/s3/finalizeDatasetUpload", {
                "dataset_id": pid, "create_archiving_job": archive, "owner_group": owner.get("group", ""),
                "owner_user": owner.get("user", ""), "contact_email": owner.get("email", "")})
            result.finalized = True
        return result

    async def _renewing(self, url: str, send: Callable[[str], Awaitable[T]],
                        renew: Callable[[str], Awaitable[str]], result: Result) -> T:
        """``send(url)``; when S3 refuses the URL as expired, ``renew(stale)`` signs it again and
        it is sent again."""
        for renewal in range(URL_RENEWALS + 1):
            try:
                return await send(url)
            except UrlExpiredError as exc:
                if renewal == URL_RENEWALS:
                    raise ApiError(f"{exc} (and so were {URL_RENEWALS} URLs signed again for it: are the clocks "
                                   "of the daemon's host and of S3 apart?)") from None
                url = await renew(url)
                result.urls_renewed += 1
        raise AssertionError("unreachable")

    async def _single(self, url: str, name: str, f: LocalFile, presign: Callable[[list[str]], Awaitable[list[str]]],
                      result: Result, transfer: Transfer) -> None:
        async def send(u: str) -> None:
            await self._in_thread(self._send_file_blocking, u, f.path, view)

        async def renew(stale: str) -> str:
            return (await presign([name]))[0]

        async with self._buffer() as buf:
            view = memoryview(buf)[:f.size]
            await self._renewing(url, send, renew, result)
        result.sent.append(f.rel)
        transfer.bytes_done += f.size
        transfer.files_done += 1

    async def _multipart(self, pid: str, name: str, f: LocalFile, resume: dict[str, Any] | None,
                         result: Result, transfer: Transfer) -> None:
        count = math.ceil(f.size / self.part_size)
        have: dict[int, dict[str, Any]] = {}
        body: dict[str, Any] = {"dataset_id": pid, "object_name": name, "parts": count}
        if resume is not None:  # its parts fit this run's layout (see upload)
            body["upload_id"] = resume["upload_id"]
            have = {p["part_number"]: p for p in resume["parts"]}
        answer = await self.call("/s3/presignedUrls", body)
        upload_id, urls = answer["upload_id"], answer["urls"]
        done: list[dict[str, Any]] = [{} for _ in range(count)]
        renewing = anyio.Lock()

        async def renewed(n: int, stale: str) -> str:
            """A fresh URL for part ``n``: one request signs every part's again (of the same
            upload), shared by the parts whose URLs expired together."""
            nonlocal urls
            async with renewing:
                if urls[n - 1] == stale:
                    urls = (await self.call("/s3/presignedUrls", {**body, "upload_id": upload_id}))["urls"]
            return str(urls[n - 1])

        async def part(n: int) -> None:
            offset = (n - 1) * self.part_size
            length = self._part_length(f, n)
            async with self._buffer() as buf:
                view = memoryview(buf)[:length]
                checksum = await self._in_thread(_read_and_sum, f.path, offset, view)
                old = have.get(n)
                if old is not None and old["size"] == length and old.get("checksum_sha256") in (None, checksum):
                    etag = old["etag"]
                    result.parts_resumed += 1
                else:
                    async def send(u: str) -> str:
                        return await self._in_thread(self._put_blocking, u, view, checksum)

                    etag = await self._renewing(urls[n - 1], send, functools.partial(renewed, n), result)
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


def _read_and_sum(path: Path, offset: int, view: memoryview) -> str:
    """Read into ``view`` and checksum it, in one worker thread's turn (both release the GIL)."""
    _read_into(path, offset, view)
    return b64sha256(view)
