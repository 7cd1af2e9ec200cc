"""Object bodies over plain HTTP, received straight into the caller's buffer.

Reading through aiobotocore costs about 2 ms of CPU per GET (request construction, event hooks,
response parsing) and allocates a new ``bytes`` for every piece of the body, which is then copied
into moverd's buffer. For the landing zone on an internal ``http://`` MinIO endpoint, that was
most of moverd's CPU per gigabyte. This path signs the GET with botocore's own SigV4 signer,
sends it on a kept-alive socket and reads the body with ``sock_recv_into`` into the caller's
memoryview: no per-chunk allocation, no copy.

Everything else (listing, HEAD, uploads, presigning, TLS endpoints) stays on aiobotocore. The
semantics match :class:`~.reader.S3Reader`: errors name bucket and key, 5xx answers and broken
connections are retried with backoff, and a body that breaks half way is resumed with a ranged GET
pinned to the object's ETag.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

import anyio
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from moverd import NotFoundError, StorageError, retry_async

log = logging.getLogger(__name__)

_HEAD_MAX = 64 * 1024
_IDLE_MAX = 64


class HTTPStatusError(Exception):
    """An error answer of the S3 server."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{code or 'HTTP ' + str(status)}: {message}".rstrip(": "))
        self.status, self.code, self.message = status, code, message


class TransientHTTPError(HTTPStatusError):
    """A 5xx or throttling answer: worth another attempt."""


def transient(exc: BaseException) -> bool:
    return isinstance(exc, (TransientHTTPError, ConnectionError, TimeoutError, OSError))


def usable(endpoint_url: str | None, access_key: str | None, secret_key: str | None) -> bool:
    """The fast path serves plain-HTTP endpoints with static credentials."""
    return bool(endpoint_url and endpoint_url.startswith("http://") and access_key and secret_key)


@dataclass
class _Head:
    status: int
    headers: dict[str, str]
    extra: bytes


class FastGetter:
    """A small pool of kept-alive HTTP/1.1 connections to one S3 endpoint, for GETs only."""

    def __init__(
        self, *, endpoint_url: str, region: str, bucket: str, access_key: str, secret_key: str,
        addressing_style: str, timeout: float, attempts: int,
    ) -> None:
        url = urlsplit(endpoint_url)
        self.host = url.hostname or "127.0.0.1"
        self.port = url.port or 80
        self.hostport = url.netloc
        self.base = url.path.rstrip("/")
        self.bucket = bucket
        self.virtual = addressing_style == "virtual"
        self.timeout = timeout
        self.attempts = attempts
        self._signer = S3SigV4Auth(Credentials(access_key, secret_key), "s3", region)
        self._idle: list[socket.socket] = []

    # -- requests -------------------------------------------------------------------------------

    def _request(self, full_key: str, start: int, end: int | None, etag: str | None) -> bytes:
        path = f"{self.base}/{quote(full_key, safe='/~')}"
        host = self.hostport
        if self.virtual:
            host = f"{self.bucket}.{host}"
        else:
            path = f"{self.base}/{self.bucket}/{quote(full_key, safe='/~')}"
        headers = {"Host": host}
        if start or end is not None:
            headers["Range"] = f"bytes={start}-" if end is None else f"bytes={start}-{end - 1}"
        if etag:
            headers["If-Match"] = etag
        req = AWSRequest(method="GET", url=f"http://{host}{path}", headers=headers)
        self._signer.add_auth(req)
        lines = [f"GET {path} HTTP/1.1"]
        lines += [f"{k}: {v}" for k, v in req.headers.items()]
        lines += ["Connection: keep-alive", "", ""]
        return "\r\n".join(lines).encode("latin-1")

    async def _connect(self) -> socket.socket:
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
        family, type_, proto, _, addr = infos[0]
        sock = socket.socket(family, type_, proto)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            with anyio.fail_after(self.timeout):
                await loop.sock_connect(sock, addr)
        except BaseException:
            sock.close()
            raise
        return sock

    async def _read_head(self, sock: socket.socket) -> _Head:
        loop = asyncio.get_running_loop()
        buf = bytearray()
        while b"\r\n\r\n" not in buf:
            if len(buf) > _HEAD_MAX:
                raise StorageError("S3 answer headers too long")
            with anyio.fail_after(self.timeout):
                chunk = await loop.sock_recv(sock, 65536)
            if not chunk:
                raise ConnectionResetError("connection closed before the answer")
            buf += chunk
        head, _, extra = bytes(buf).partition(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        parts = status_line.split(" ", 2)
        status = int(parts[1])
        headers = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        return _Head(status, headers, extra)

    async def _exchange(self, request: bytes) -> tuple[socket.socket, _Head]:
        """Send on an idle connection (a fresh one if the idle one was closed by the server)."""
        loop = asyncio.get_running_loop()
        while True:
            reused = bool(self._idle)
            sock = self._idle.pop() if reused else await self._connect()
            try:
                await loop.sock_sendall(sock, request)
                return sock, await self._read_head(sock)
            except (ConnectionError, OSError):
                sock.close()
                if not reused:
                    raise
            except BaseException:
                sock.close()
                raise

    def release(self, sock: socket.socket) -> None:
        """Keep a connection for the next GET, unless the server already closed it (some servers,
        moto's among them, close after every answer without saying so)."""
        try:
            if sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b"":
                sock.close()
                return
        except BlockingIOError:
            pass  # open and quiet: reusable
        except OSError:
            sock.close()
            return
        if len(self._idle) < _IDLE_MAX:
            self._idle.append(sock)
        else:
            sock.close()

    def close(self) -> None:
        for sock in self._idle:
            sock.close()
        self._idle.clear()

    async def _once(self, full_key: str, start: int, end: int | None, etag: str | None) -> FastBody:
        sock, head = await self._exchange(self._request(full_key, start, end, etag))
        if head.status in (200, 206):
            if "content-length" not in head.headers:
                sock.close()
                raise StorageError("S3 answered without Content-Length")
            keep = head.headers.get("connection", "").lower() != "close"
            return FastBody(self, sock, int(head.headers["content-length"]), head.extra, keep,
                            head.headers.get("etag"))
        body = await FastBody(self, sock, int(head.headers.get("content-length", 0)), head.extra,
                              head.headers.get("connection", "").lower() != "close", None).read_all()
        code = _xml(body, "Code")
        message = _xml(body, "Message")
        if head.status >= 500 or code in ("SlowDown", "Throttling", "RequestTimeout"):
            raise TransientHTTPError(head.status, code, message)
        raise HTTPStatusError(head.status, code, message)

    async def get(self, full_key: str, start: int, end: int | None, etag: str | None = None) -> FastBody:
        """Open the body of ``[start, end)``; retried on 5xx, throttling and broken connections."""

        async def attempt() -> FastBody:
            return await self._once(full_key, start, end, etag)

        return await retry_async(attempt, retryable=transient, attempts=self.attempts,
                                 what=f"GET s3 {self.bucket}/{full_key}")


def _xml(body: bytes, tag: str) -> str:
    m = re.search(rb"<%s>(.*?)</%s>" % (tag.encode(), tag.encode()), body, re.S)
    return m.group(1).decode("utf-8", "replace") if m else ""


class FastBody:
    """The remaining ``length`` bytes of one answer, received into the caller's buffers."""

    def __init__(self, getter: FastGetter, sock: socket.socket, length: int, extra: bytes, keep: bool,
                 etag: str | None) -> None:
        self._getter = getter
        self._sock: socket.socket | None = sock
        self.length = length
        self.remaining = length
        self._extra = memoryview(extra)
        self._keep = keep
        self.etag = etag

    async def readinto(self, buf: memoryview) -> int:
        if self.remaining == 0:
            self._finish()
            return 0
        if self._sock is None:
            raise ConnectionResetError("body already closed")
        want = min(len(buf), self.remaining)
        if self._extra:
            n = min(want, len(self._extra))
            buf[:n] = self._extra[:n]
            self._extra = self._extra[n:]
        else:
            try:
                # Bytes already in the socket buffer need no trip through the event loop.
                n = self._sock.recv_into(buf[:want])
            except (BlockingIOError, InterruptedError):
                loop = asyncio.get_running_loop()
                with anyio.fail_after(self._getter.timeout):
                    n = await loop.sock_recv_into(self._sock, buf[:want])
            if n == 0:
                self.close()
                raise ConnectionResetError(f"connection closed with {self.remaining} bytes of the body to come")
        self.remaining -= n
        if self.remaining == 0:
            self._finish()
        return n

    async def read_all(self) -> bytes:
        out = bytearray(self.remaining)
        view = memoryview(out)
        got = 0
        while got < len(out):
            got += await self.readinto(view[got:])
        return bytes(out)

    def _finish(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            if self._keep and not self._extra:
                self._getter.release(sock)
            else:
                sock.close()

    def close(self) -> None:
        """Drop the connection unless the body was read to its end (then it is reused)."""
        sock, self._sock = self._sock, None
        if sock is not None:
            if self.remaining == 0 and self._keep:
                self._getter.release(sock)
            else:
                sock.close()


class FastReader:
    """A :class:`moverd.Reader` over a fast GET, resumed from its position if the body breaks."""

    def __init__(self, getter: FastGetter, *, bucket: str, key: str, full_key: str, start: int, end: int,
                 body: FastBody | None) -> None:
        self._getter = getter
        self._bucket, self._key, self._full_key = bucket, key, full_key
        self._pos, self._end = start, end
        self._body = body
        self._etag = body.etag if body else None
        self._closed = False
        self.resumes = 0

    async def readinto(self, buf: memoryview) -> int:
        if self._closed or self._pos >= self._end or len(buf) == 0:
            return 0
        want = min(len(buf), self._end - self._pos)
        try:
            if self._body is None:
                raise ConnectionResetError("no body")
            n = await self._body.readinto(buf[:want])
        except (ConnectionError, TimeoutError, OSError) as exc:
            n = await self._resume(buf[:want], exc)
        self._pos += n
        return n

    async def _resume(self, buf: memoryview, first: BaseException) -> int:
        log.warning("s3 %s/%s: stream broke at byte %d (%s), resuming", self._bucket, self._key, self._pos, first)

        async def attempt() -> int:
            if self._body is not None:
                self._body.close()
                self._body = None
            self.resumes += 1
            self._body = await self._getter._once(self._full_key, self._pos, self._end, self._etag)
            return await self._body.readinto(buf)

        try:
            return await retry_async(
                attempt, retryable=transient, attempts=self._getter.attempts,
                what=f"resumed read of s3 {self._bucket}/{self._key} at byte {self._pos}",
            )
        except HTTPStatusError as exc:
            if exc.status == 412:
                raise StorageError(
                    f"s3 {self._bucket}/{self._key}: the object was replaced while being read (at byte {self._pos})"
                ) from None
            raise to_error(exc, self._bucket, self._key, f"read at byte {self._pos} (resumed)") from None
        except Exception as exc:
            raise to_error(exc, self._bucket, self._key, f"read at byte {self._pos} (resumed)") from exc

    async def aclose(self) -> None:
        self._closed = True
        if self._body is not None:
            self._body.close()
            self._body = None


def to_error(exc: BaseException, bucket: str, key: str, action: str = "") -> StorageError:
    place = f"s3 {bucket}/{key}"
    doing = f"{action} failed: " if action else ""
    if isinstance(exc, StorageError):
        return exc
    if isinstance(exc, HTTPStatusError):
        if exc.status == 404 and exc.code == "NoSuchBucket":
            return NotFoundError(f"{place}: bucket {bucket!r} does not exist")
        if exc.status == 404:
            return NotFoundError(f"{place}: no such object")
        return StorageError(f"{place}: {doing}{exc.code or 'HTTP ' + str(exc.status)}: {exc.message or 'error'}")
    return StorageError(f"{place}: {doing}{type(exc).__name__}: {exc}".rstrip(": "))
