"""The lean S3 client: GET object, ListObjectsV2 and HEAD over plain HTTP, in worker threads.

Why it exists: through aiobotocore, a GET costs about 2 ms of CPU on the event loop (request
construction, event hooks, response parsing) and every piece of the body arrives as a new
``bytes`` that is then copied into moverd's buffer; importing aioboto3 and making its client
costs half a second per CLI run. On a two-core machine that shares its CPU with the S3 server,
the event-loop thread is the bottleneck. For the landing zone on an internal ``http://`` MinIO,
this client does these reads with:

* **blocking sockets in worker threads.** Resolving (once per getter), connecting, sending,
  reading the answer's head and receiving the body (``recv_into`` straight into the caller's
  buffer, no copy) all happen in ``anyio.to_thread.run_sync`` calls, under a
  :class:`anyio.CapacityLimiter` of ``max_pool_connections`` owned by the getter, so that reads
  blocked on the network never take the default thread limiter's tokens that file writes need.
  Timeouts are socket timeouts: ``connect_timeout`` to connect, ``read_timeout`` for each wait
  for bytes. :meth:`FastReader.readinto_blocking` lets the core receive and hash a chunk in one
  thread hop.
* **lazy readers.** ``open_reader`` makes a :class:`FastReader` without I/O; its first read
  sends the GET and receives the first bytes in the same thread call, so that a small object
  costs one thread hop in all (each hop costs the event loop 150-250 µs of CPU). A missing
  object raises :class:`~moverd.NotFoundError` from that first read.
* **its own SigV4** (:mod:`.sigv4`): the same signature as botocore's, without importing it.
* **a kept-alive connection pool** shared by the worker threads; connections the server closed
  without saying (moto closes after every answer) are detected before reuse.

Everything else (uploads, deletes, presigning, ``https://`` endpoints, ``fast_get = false``)
stays on aiobotocore. The semantics match :class:`~.reader.S3Reader`: errors name bucket and key,
5xx, throttling and broken connections are retried with backoff, and a body that breaks half way
is resumed with a ranged GET pinned to the object's ETag with ``If-Match``.

Abandoning a blocking call: a task cancelled while its worker thread waits on a socket returns
at once (``abandon_on_cancel=True``); the thread is then stopped through an :class:`Interrupt`,
which shuts its sockets down and cuts short its backoff sleeps, so that no thread lingers for
``read_timeout`` and no connection is left behind. Until it notices, that thread may still write
into the buffer it was given.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
import xml.etree.ElementTree as ET
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple, TypeVar, TypeVarTuple
from urllib.parse import unquote_plus, urlsplit

import anyio

from moverd import ObjectInfo, StorageError, retry_blocking

from .errors import (
    HTTPStatusError,
    NoAnswerError,
    NotS3Error,
    TransientHTTPError,
    changed_error,
    check_version,
    not_s3_answer,
    quoted_etag,
    to_storage_error,
    total_size,
)
from .sigv4 import Signer, canonical_query, quote_key

log = logging.getLogger(__name__)

T = TypeVar("T")
Ts = TypeVarTuple("Ts")

_RECV = 65536
_HEAD_MAX = 64 * 1024
_SMALL_BODY_MAX = 64 * 1024 * 1024
"""Error documents and listing pages (about 300 KiB for 1000 keys); anything bigger is an error."""
_RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
_RETRY_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottled",
    "RequestThrottledException", "TooManyRequestsException", "RequestLimitExceeded",
    "BandwidthLimitExceeded", "RequestTimeout", "RequestTimeoutException", "PriorRequestNotComplete",
    "InternalError", "ServiceUnavailable",
})
"""Error codes retried whatever the status: botocore's standard-mode throttling and transient
codes, and S3's own names for a 500 and a 503."""


class ProtocolError(Exception):
    """An answer this client cannot read (no Content-Length on a body, garbled head)."""


class AbandonedError(Exception):
    """The blocking call was abandoned: its reader was closed or its task cancelled."""


class _NoAnswerError(ConnectionResetError):
    """The connection failed before any byte of the answer: a reused one may just be stale."""


class _ConnectTimeoutError(TimeoutError):
    """No connection within ``connect_timeout`` (a timeout of the answer is a plain one)."""


class _DeadlineError(TimeoutError):
    """The request's ``request_timeout`` ran out before another wait could start."""


def transient(exc: BaseException) -> bool:
    """Worth another attempt: a 5xx/throttling answer, a broken connection, a timeout."""
    return isinstance(exc, (TransientHTTPError, OSError))


def usable(endpoint_url: str | None, access_key: str | None, secret_key: str | None) -> bool:
    """The lean client serves plain-HTTP endpoints with static credentials."""
    return bool(endpoint_url and endpoint_url.startswith("http://") and access_key and secret_key)


class Interrupt:
    """Stops a blocking call from another thread: shuts down the sockets it waits on and wakes
    its backoff sleeps. Shutting down (not closing) is what wakes a thread blocked in ``recv``;
    the thread closes the socket itself once it notices."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._event = threading.Event()

    @property
    def fired(self) -> bool:
        return self._event.is_set()

    def track(self, sock: socket.socket) -> None:
        """Register a socket the calling thread is about to block on (raises if already fired,
        after closing the socket: nobody else holds it)."""
        with self._lock:
            if not self._event.is_set():
                self._socks.append(sock)
                return
        sock.close()
        raise AbandonedError("abandoned")

    def untrack(self, sock: socket.socket) -> None:
        with self._lock:
            if sock in self._socks:
                self._socks.remove(sock)

    def fire(self) -> None:
        with self._lock:
            self._event.set()
            socks, self._socks = self._socks, []
        for sock in socks:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def sleep(self, seconds: float) -> None:
        """A backoff pause that ends early, with :class:`AbandonedError`, when fired."""
        if self._event.wait(seconds):
            raise AbandonedError("abandoned")


@dataclass
class _Head:
    status: int
    reason: str
    headers: dict[str, str]
    extra: bytes
    """Bytes received after the head: the start of the body."""
    keep: bool
    """The server keeps the connection open after this answer."""


class Listed(NamedTuple):
    """One entry of a ListObjectsV2 page, key in full (prefix included) and decoded."""

    key: str
    size: int
    mtime: float
    etag: str | None


class FastGetter:
    """Kept-alive HTTP/1.1 connections to one S3 endpoint and the requests the lean path makes.

    Blocking methods (``*_blocking``) run in worker threads and are safe to call from several at
    once; the async ones hand them to a thread under :attr:`limiter`.
    """

    def __init__(
        self, *, endpoint_url: str, region: str, bucket: str, access_key: str, secret_key: str,
        addressing_style: str, connect_timeout: float, read_timeout: float, attempts: int,
        max_connections: int, request_timeout: float = 120.0,
    ) -> None:
        url = urlsplit(endpoint_url)
        self.endpoint = endpoint_url
        self.host = url.hostname or "127.0.0.1"
        self.port = url.port or 80
        self.base = url.path.rstrip("/")
        self.bucket = bucket
        self.virtual = addressing_style == "virtual"
        self.host_header = f"{bucket}.{url.netloc}" if self.virtual else url.netloc
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.request_timeout = request_timeout
        self._deadlines = threading.local()
        """The ``time.monotonic()`` by which the request this thread makes must be answered."""
        self.attempts = attempts
        self.max_connections = max_connections
        self._signer = Signer(access_key, secret_key, region)
        self._addrs: list[tuple[Any, ...]] | None = None
        self._idle: deque[socket.socket] = deque()
        self._idle_lock = threading.Lock()
        self._limiter: anyio.CapacityLimiter | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- threads ---------------------------------------------------------------------------------

    @property
    def limiter(self) -> anyio.CapacityLimiter:
        """The worker-thread tokens of this endpoint (one per pooled connection), for the event
        loop that is running: a limiter's waiters belong to one loop."""
        loop = asyncio.get_running_loop()
        if self._limiter is None or self._loop is not loop:
            self._loop, self._limiter = loop, anyio.CapacityLimiter(self.max_connections)
        return self._limiter

    async def run(self, fn: Callable[[*Ts], T], *args: *Ts, interrupt: Callable[[], None]) -> T:
        """``fn(*args)`` in a worker thread; if the task is cancelled meanwhile, it returns at once
        and ``interrupt()`` stops the thread."""
        try:
            return await anyio.to_thread.run_sync(fn, *args, limiter=self.limiter, abandon_on_cancel=True)
        except BaseException as exc:
            if isinstance(exc, anyio.get_cancelled_exc_class()):
                interrupt()
            raise

    # -- connections -------------------------------------------------------------------------------

    def _connect(self, stop: Interrupt) -> socket.socket:
        """A new connection, tracked by ``stop`` (so that a connect in progress can be aborted)."""
        addrs = self._addrs
        if addrs is None:
            infos = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
            addrs = self._addrs = [(family, type_, proto, addr) for family, type_, proto, _, addr in infos]
        error: OSError = ConnectionRefusedError(f"no address for {self.host}")
        for family, type_, proto, addr in addrs:
            sock = socket.socket(family, type_, proto)
            stop.track(sock)
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.settimeout(self._wait(self.connect_timeout))
                try:
                    sock.connect(addr)
                except TimeoutError:
                    raise _ConnectTimeoutError(f"no connection within {self.connect_timeout:g} s") from None
                sock.settimeout(self.read_timeout)
            except OSError as exc:
                self._discard(sock, stop)
                if stop.fired:
                    raise AbandonedError("abandoned") from None
                error = exc
                continue
            except BaseException:
                self._discard(sock, stop)
                raise
            return sock
        self._addrs = None  # resolve again next time: the server may have moved
        raise error

    def _wait(self, longest: float) -> float:
        """How long the next socket wait of this thread's request may take: ``longest``, or what
        is left of its ``request_timeout`` if that is less."""
        deadline: float | None = getattr(self._deadlines, "at", None)
        if deadline is None:
            return longest
        left = deadline - time.monotonic()
        if left <= 0:
            raise _DeadlineError("request_timeout reached")
        return min(longest, left)

    def _quiet(self, sock: socket.socket) -> bool:
        """Open and with nothing to read: reusable. A server that closed the connection after its
        answer without saying so (moto does) shows up here as an end of stream."""
        try:
            # Non-blocking for the peek: with a timeout set, Python would wait for data first.
            sock.settimeout(0.0)
            try:
                sock.recv(1, socket.MSG_PEEK)
            finally:
                sock.settimeout(self.read_timeout)
        except BlockingIOError:
            return True
        except OSError:
            return False
        return False  # end of stream, or bytes nobody asked for: not reusable either way

    def _take_idle(self) -> socket.socket | None:
        while True:
            with self._idle_lock:
                if not self._idle:
                    return None
                sock = self._idle.pop()
            if self._quiet(sock):
                return sock
            sock.close()

    def release(self, sock: socket.socket) -> None:
        """Keep a connection whose answer was read to its end, for the next request."""
        if self._quiet(sock):
            with self._idle_lock:
                if len(self._idle) < self.max_connections:
                    self._idle.append(sock)
                    return
        sock.close()

    def close(self) -> None:
        """Close the idle connections (those in use close when their reader does)."""
        with self._idle_lock:
            socks = list(self._idle)
            self._idle.clear()
        for sock in socks:
            sock.close()

    # -- one exchange ----------------------------------------------------------------------------

    def _object_path(self, full_key: str) -> str:
        key = quote_key(full_key)
        return f"{self.base}/{key}" if self.virtual else f"{self.base}/{self.bucket}/{key}"

    def _bucket_path(self) -> str:
        return f"{self.base}/" if self.virtual else f"{self.base}/{self.bucket}"

    def _request(self, method: str, path: str, query: str, headers: dict[str, str]) -> bytes:
        headers = {"Host": self.host_header, **headers}
        headers.update(self._signer.sign(method, path, query, headers))
        lines = [f"{method} {path}?{query} HTTP/1.1" if query else f"{method} {path} HTTP/1.1"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        lines += ["Connection: keep-alive", "", ""]
        return "\r\n".join(lines).encode("latin-1")

    def _exchange(self, request: bytes, stop: Interrupt) -> tuple[socket.socket, _Head]:
        """Send on an idle connection, or a new one when the idle one turns out to be closed.
        The socket comes back tracked by ``stop``."""
        while True:
            sock = self._take_idle()
            reused = sock is not None
            if sock is None:
                sock = self._connect(stop)
            else:
                stop.track(sock)
            try:
                sock.settimeout(self._wait(self.read_timeout))
                try:
                    sock.sendall(request)
                except ConnectionError as exc:
                    raise _NoAnswerError(str(exc)) from exc
                head = self._read_head(sock)
                sock.settimeout(self.read_timeout)  # the body's waits: each up to read_timeout
                return sock, head
            except _NoAnswerError:
                self._discard(sock, stop)
                if not reused:
                    raise
            except BaseException:
                self._discard(sock, stop)
                raise

    @staticmethod
    def _discard(sock: socket.socket, stop: Interrupt) -> None:
        stop.untrack(sock)
        sock.close()

    def _read_head(self, sock: socket.socket) -> _Head:
        buf = b""
        while True:
            end = buf.find(b"\r\n\r\n")
            while end < 0:
                if len(buf) > _HEAD_MAX:
                    raise ProtocolError("S3 answer headers too long")
                try:
                    chunk = sock.recv(_RECV)
                except ConnectionError as exc:
                    if not buf:
                        raise _NoAnswerError(str(exc)) from exc
                    raise
                if not chunk:
                    if not buf:
                        raise _NoAnswerError("connection closed before the answer")
                    raise ConnectionResetError("connection closed in the middle of the answer's headers")
                buf += chunk
                end = buf.find(b"\r\n\r\n", max(0, len(buf) - len(chunk) - 3))
            head, extra = buf[:end].decode("latin-1"), buf[end + 4 :]
            status_line, *header_lines = head.split("\r\n")
            parts = status_line.split(" ", 2)
            try:
                status = int(parts[1])
            except (IndexError, ValueError):
                raise ProtocolError(f"not an HTTP answer: {status_line[:80]!r}") from None
            if 100 <= status < 200 and status != 101:
                buf = extra  # an interim answer (100 Continue): the real one follows
                continue
            headers: dict[str, str] = {}
            for line in header_lines:
                name, _, value = line.partition(":")
                name = name.strip().lower()
                value = value.strip()
                headers[name] = f"{headers[name]}, {value}" if name in headers else value
            connection = headers.get("connection", "").lower()
            keep = "close" not in connection if parts[0] == "HTTP/1.1" else "keep-alive" in connection
            return _Head(status, parts[2] if len(parts) > 2 else "", headers, extra, keep)

    def _read_small_body(self, sock: socket.socket, head: _Head, *, bodiless: bool) -> tuple[bytes, bool]:
        """The whole body of an answer that is not object content (an error, a listing), and
        whether the connection may serve another request."""
        if bodiless or head.status in (204, 304):
            return b"", head.keep and not head.extra
        stream = _Stream(sock, head.extra)
        if "chunked" in head.headers.get("transfer-encoding", "").lower():
            body = stream.read_chunked()
        elif "content-length" in head.headers:
            body = stream.read_exact(int(head.headers["content-length"]))
        else:
            return stream.read_to_eof(), False
        return body, head.keep and not stream.buf

    def _finish(self, sock: socket.socket, head: _Head, stop: Interrupt, *, bodiless: bool) -> bytes:
        """Read the rest of a small answer, then pool or close its connection."""
        try:
            body, reusable = self._read_small_body(sock, head, bodiless=bodiless)
        except BaseException:
            self._discard(sock, stop)
            raise
        stop.untrack(sock)
        if reusable:
            self.release(sock)
        else:
            sock.close()
        return body

    def _fetch(self, method: str, path: str, query: str, stop: Interrupt) -> tuple[_Head, bytes]:
        """One request whose answer is read whole; error answers raise :class:`HTTPStatusError`."""
        sock, head = self._exchange(self._request(method, path, query, {}), stop)
        bodiless = method == "HEAD"
        body = self._finish(sock, head, stop, bodiless=bodiless)
        if head.status >= 300:
            raise _status_error(head, body, bodiless=bodiless)
        return head, body

    def _retrying(self, op: Callable[[], T], what: str, stop: Interrupt) -> T:
        """``op`` with retries, all of them within ``request_timeout`` (each socket wait is cut
        to what is left of it); ``what`` (``GET bucket/key``) names the request in errors."""
        deadline = time.monotonic() + self.request_timeout
        tries = 0

        def attempt() -> T:
            nonlocal tries
            tries += 1
            return op()

        def retryable(exc: BaseException) -> bool:
            return transient(exc) and not stop.fired and time.monotonic() < deadline

        previous, self._deadlines.at = getattr(self._deadlines, "at", None), deadline
        try:
            return retry_blocking(
                attempt, retryable=retryable, attempts=self.attempts, what=f"s3 {what}",
                sleep=lambda seconds: stop.sleep(min(seconds, max(0.0, deadline - time.monotonic()))),
            )
        except TimeoutError as exc:
            if stop.fired:
                raise AbandonedError("abandoned") from None
            if isinstance(exc, _DeadlineError) or time.monotonic() >= deadline - 0.01:
                raise NoAnswerError(f"{what}", self.request_timeout, tries, request_timeout=True) from None
            connect = isinstance(exc, _ConnectTimeoutError)
            seconds = self.connect_timeout if connect else self.read_timeout
            raise NoAnswerError(what, seconds, tries, connect=connect) from None
        except OSError:
            if stop.fired:
                raise AbandonedError("abandoned") from None
            raise
        finally:
            self._deadlines.at = previous

    # -- GET object ----------------------------------------------------------------------------

    def open_blocking(self, full_key: str, start: int, end: int | None, etag: str | None,
                      stop: Interrupt) -> FastBody:
        """One GET of ``[start, end)`` (``end`` None: to the end of the object); the body is left
        to read. Error answers raise :class:`HTTPStatusError` (transient ones its subclass)."""
        headers: dict[str, str] = {}
        ranged = bool(start) or end is not None
        if ranged:
            headers["Range"] = f"bytes={start}-" if end is None else f"bytes={start}-{end - 1}"
        if etag:
            headers["If-Match"] = etag
        sock, head = self._exchange(self._request("GET", self._object_path(full_key), "", headers), stop)
        if head.status in (200, 206):
            length_text = head.headers.get("content-length")
            keep = head.keep
            if length_text is None or "chunked" in head.headers.get("transfer-encoding", "").lower():
                self._discard(sock, stop)
                raise ProtocolError("S3 answered without Content-Length")
            length = int(length_text)
            if head.status == 200 and ranged:
                # The server ignored Range: the body starts at byte 0.
                if start:
                    self._discard(sock, stop)
                    raise ProtocolError("S3 ignored the Range header")
                if end is not None and end < length:
                    length, keep = end, False
            return FastBody(self, sock, length, head.extra, keep, head.headers.get("etag"), stop,
                            head.headers.get("content-range"))
        raise _status_error(head, self._finish(sock, head, stop, bodiless=False))

    # -- HEAD ------------------------------------------------------------------------------------

    def head_blocking(self, full_key: str, stop: Interrupt) -> Listed:
        """Size, mtime and ETag of one object (HEAD), retried like any request."""
        from email.utils import parsedate_to_datetime  # a few ms: only for storages that stat

        def attempt() -> Listed:
            head, _ = self._fetch("HEAD", self._object_path(full_key), "", stop)
            modified = head.headers.get("last-modified")
            mtime = parsedate_to_datetime(modified).timestamp() if modified else 0.0
            etag = head.headers.get("etag")
            return Listed(full_key, int(head.headers.get("content-length", 0)), mtime,
                          etag.strip('"') if etag else None)

        return self._retrying(attempt, f"HEAD {self.bucket}/{full_key}", stop)

    async def head(self, full_key: str) -> Listed:
        stop = Interrupt()
        return await self.run(self.head_blocking, full_key, stop, interrupt=stop.fire)

    # -- ListObjectsV2 ---------------------------------------------------------------------------

    def list_page_blocking(self, prefix: str, token: str | None, stop: Interrupt) -> tuple[list[Listed], str | None]:
        """One page (up to 1000 keys) under ``prefix`` and the token of the next one, if any.

        Keys are asked URL-encoded (``encoding-type=url``, as botocore does): XML 1.0 cannot
        carry most control characters, which S3 allows in keys.
        """
        params = [("list-type", "2"), ("encoding-type", "url")]
        if prefix:
            params.append(("prefix", prefix))
        if token:
            params.append(("continuation-token", token))
        query = canonical_query(params)

        def attempt() -> tuple[list[Listed], str | None]:
            _, body = self._fetch("GET", self._bucket_path(), query, stop)
            return parse_list(body)

        return self._retrying(attempt, f"list {self.bucket}/{prefix}" if prefix else f"list {self.bucket}", stop)

    async def list_page(self, prefix: str, token: str | None) -> tuple[list[Listed], str | None]:
        stop = Interrupt()
        return await self.run(self.list_page_blocking, prefix, token, stop, interrupt=stop.fire)


class _Stream:
    """Buffered reads of a small body (error document, listing page) from a blocking socket."""

    def __init__(self, sock: socket.socket, data: bytes) -> None:
        self.sock = sock
        self.buf = bytearray(data)
        self.total = 0

    def _more(self) -> None:
        chunk = self.sock.recv(_RECV)
        if not chunk:
            raise ConnectionResetError("connection closed in the middle of an answer")
        self.total += len(chunk)
        if self.total > _SMALL_BODY_MAX:
            raise ProtocolError("S3 answer too long")
        self.buf += chunk

    def read_exact(self, n: int) -> bytes:
        if n > _SMALL_BODY_MAX:
            raise ProtocolError("S3 answer too long")
        while len(self.buf) < n:
            self._more()
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def read_line(self) -> bytes:
        while (i := self.buf.find(b"\r\n")) < 0:
            self._more()
        line = bytes(self.buf[:i])
        del self.buf[: i + 2]
        return line

    def read_chunked(self) -> bytes:
        out = bytearray()
        while True:
            try:
                size = int(self.read_line().split(b";")[0], 16)
            except ValueError:
                raise ProtocolError("bad chunk in S3 answer") from None
            if size == 0:
                while self.read_line():  # trailers, up to the empty line
                    pass
                return bytes(out)
            out += self.read_exact(size)
            if len(out) > _SMALL_BODY_MAX:
                raise ProtocolError("S3 answer too long")
            self.read_line()

    def read_to_eof(self) -> bytes:
        while True:
            try:
                self._more()
            except ConnectionResetError:
                return bytes(self.buf)


def _local(tag: str) -> str:
    return tag.rpartition("}")[2]


def _parse_error(body: bytes) -> tuple[str, str]:
    """``Code`` and ``Message`` of an S3 error document ("" when there is none)."""
    try:
        root = ET.fromstring(body)
    except ET.ParseError:
        return "", ""
    found = {_local(child.tag): (child.text or "").strip() for child in root}
    return found.get("Code", ""), found.get("Message", "")


def _status_error(head: _Head, body: bytes, *, bodiless: bool = False) -> Exception:
    """The error of an answer of status 300 or more. One that S3 would not give (HTML, no XML
    error document) is a :class:`NotS3Error`, so that a web server's 404 page is never taken for
    a missing object; 5xx and 429 answers stay worth retrying whatever they look like."""
    ctype = head.headers.get("content-type", "")
    transient_status = head.status in _RETRY_STATUS
    if not transient_status and not_s3_answer(head.status, ctype, None if bodiless else body):
        return NotS3Error(head.status, head.reason, ctype, body)
    if bodiless:  # HEAD: no document; botocore names the error by its status
        code, message = str(head.status), head.reason
    else:
        code, message = _parse_error(body)
    cls = TransientHTTPError if transient_status or code in _RETRY_CODES else HTTPStatusError
    return cls(head.status, code, message)


def parse_list(body: bytes) -> tuple[list[Listed], str | None]:
    """Entries and next continuation token of a ListObjectsV2 answer (any XML namespace)."""
    try:
        root = ET.fromstring(body)
    except ET.ParseError as exc:
        raise ProtocolError(f"unreadable ListObjectsV2 answer: {exc}") from None
    ns = root.tag[: root.tag.index("}") + 1] if root.tag.startswith("{") else ""
    url_encoded = (root.findtext(f"{ns}EncodingType") or "").lower() == "url"
    entries = []
    for item in root.iterfind(f"{ns}Contents"):
        key = item.findtext(f"{ns}Key") or ""
        if url_encoded:
            key = unquote_plus(key)
        modified = datetime.fromisoformat(item.findtext(f"{ns}LastModified") or "1970-01-01T00:00:00Z")
        if modified.tzinfo is None:
            modified = modified.replace(tzinfo=UTC)
        etag = item.findtext(f"{ns}ETag")
        entries.append(Listed(key, int(item.findtext(f"{ns}Size") or 0), modified.timestamp(),
                              etag.strip('"') if etag else None))
    truncated = (root.findtext(f"{ns}IsTruncated") or "").lower() == "true"
    token = root.findtext(f"{ns}NextContinuationToken") if truncated else None
    return entries, token or None


class FastBody:
    """The remaining ``length`` bytes of one answer, received into the caller's buffers.

    Used by one thread at a time. Its socket stays tracked by the reader's :class:`Interrupt`
    until the body is closed; read to its end, the connection goes back to the pool.
    """

    def __init__(self, getter: FastGetter, sock: socket.socket, length: int, extra: bytes, keep: bool,
                 etag: str | None, stop: Interrupt, content_range: str | None = None) -> None:
        self._getter = getter
        self.content_range = content_range
        self._sock: socket.socket | None = sock
        self._stop = stop
        self.length = length
        self.remaining = length
        if len(extra) > length:  # more than announced: the connection is out of step
            extra, keep = extra[:length], False
        self._extra = memoryview(extra)
        self._keep = keep
        self.etag = etag
        if length == 0:
            self.close()

    @property
    def buffered(self) -> int:
        """Bytes already received with the answer's head."""
        return len(self._extra)

    def take_buffered(self, buf: memoryview) -> int:
        """Copy bytes received with the head; no socket call (safe on the event loop)."""
        n = min(len(buf), len(self._extra), self.remaining)
        buf[:n] = self._extra[:n]
        self._extra = self._extra[n:]
        self.remaining -= n
        if self.remaining == 0:
            self.close()
        return n

    def readinto_blocking(self, buf: memoryview) -> int:
        """Receive up to ``len(buf)`` bytes (one ``recv_into``); raises ``OSError`` (a
        ``ConnectionResetError`` when the server closes early, ``TimeoutError`` after
        ``read_timeout`` without a byte)."""
        if self._extra:
            return self.take_buffered(buf)
        want = min(len(buf), self.remaining)
        if want == 0:
            return 0
        sock = self._sock
        if sock is None:
            raise ConnectionResetError("body already closed")
        n = sock.recv_into(buf, want)
        if n == 0:
            raise ConnectionResetError(f"connection closed with {self.remaining} bytes of the body to come")
        self.remaining -= n
        if self.remaining == 0:
            self.close()
        return n

    def close(self) -> None:
        """Give the connection back if the body was read to its end, else drop it."""
        sock, self._sock = self._sock, None
        if sock is None:
            return
        self._stop.untrack(sock)
        if self.remaining == 0 and self._keep and not self._extra:
            self._getter.release(sock)
        else:
            sock.close()


class FastReader:
    """A :class:`moverd.Reader` over lean GETs, opened by its first read and resumed from its
    position if the body breaks.

    Making one does no I/O: the first read sends the GET, in the worker thread that then receives
    the first bytes, so a small object costs one thread hop in all (the POSIX storage's reader
    opens its file the same way). A missing object therefore raises
    :class:`~moverd.NotFoundError` from the first read, not from ``open_reader``; every error a
    read raises is moverd's (:class:`~moverd.StorageError` naming bucket and key).

    Reading happens in :meth:`readinto_blocking`, called from a worker thread: by the core
    directly (receiving and hashing a chunk in one hop), or by :meth:`readinto`, which serves the
    bytes that came with the answer's head without a hop. One read at a time; :meth:`aclose` may
    come at any moment, a read in progress (the first GET included) then fails promptly.
    """

    def __init__(self, getter: FastGetter, *, bucket: str, key: str, full_key: str, start: int,
                 end: int | None, expect: ObjectInfo | None = None) -> None:
        self._getter = getter
        self._expect = expect
        """The listed version: its ETag pins every GET (``If-Match``), its size is checked."""
        self._bucket, self._key, self._full_key = bucket, key, full_key
        self._pos = start
        self._want_end = end
        self._end: int | None = start if end == start else None
        """Where the stream ends: unknown (None) until the first GET answered, since a range is cut
        at the object's end and ``end`` None means the object's end."""
        self._etag: str | None = quoted_etag(expect.etag) if expect is not None and expect.etag else None
        self._body: FastBody | None = None
        self._stop = Interrupt()
        self._lock = threading.Lock()
        self._busy = False
        self._closed = False
        self._failure: str | None = None
        self.resumes = 0
        """How many times the stream was re-opened after a break (for tests and metrics)."""

    @classmethod
    def empty(cls, getter: FastGetter, *, bucket: str, key: str, full_key: str) -> FastReader:
        return cls(getter, bucket=bucket, key=key, full_key=full_key, start=0, end=0)

    @property
    def limiter(self) -> anyio.CapacityLimiter:
        """The thread limiter of this reader's endpoint: what a caller running
        :meth:`readinto_blocking` in its own worker thread should pass to ``run_sync``."""
        return self._getter.limiter

    # -- the blocking side (worker threads) -------------------------------------------------------

    def _enter(self) -> bool:
        """Mark a read in progress; False when the reader is closed (read nothing)."""
        with self._lock:
            if self._closed:
                if self._failure:
                    raise StorageError(self._failure)
                return False
            if self._busy:
                raise RuntimeError("FastReader: one read at a time")
            self._busy = True
            return True

    def _leave(self) -> None:
        with self._lock:
            self._busy = False
            closed = self._closed
        if closed:
            self._drop_body()

    def _closed_error(self) -> StorageError:
        return StorageError(self._failure or f"s3 {self._bucket}/{self._key}: reader closed during a read")

    def _open(self) -> int:
        """The first GET, in the reading thread; its Content-Length fixes the end, which is
        returned. Errors are mapped as ``stat`` maps them (404 → NotFoundError...); a 416 (the
        range starts at or after the end) is sorted out with a HEAD in this same thread."""
        start, end, pinned = self._pos, self._want_end, self._etag
        try:
            body = self._getter._retrying(
                lambda: self._getter.open_blocking(self._full_key, start, end, pinned, self._stop),
                f"GET {self._bucket}/{self._full_key}", self._stop,
            )
        except AbandonedError:
            raise
        except Exception as exc:
            if self._stop.fired:
                raise AbandonedError("abandoned") from None
            if isinstance(exc, HTTPStatusError):
                if exc.status == 412 and self._expect is not None:
                    raise changed_error(self._bucket, self._key, self._expect) from None
                if exc.status == 416:
                    return self._past_end()
                raise self._error(exc, "") from None
            raise self._error(exc, "") from exc
        self._body, self._etag = body, pinned or body.etag
        if self._expect is not None:
            try:
                check_version(self._bucket, self._key, self._expect, etag=body.etag,
                              size=total_size(body.content_range, body.length, start))
            except BaseException:
                self._drop_body()
                raise
        self._end = start + body.length
        return self._end

    def _past_end(self) -> int:
        """S3 answers 416 to a range starting at or after the object's end: at the end when the
        offset is the size, an error beyond it."""
        try:
            head = self._getter.head_blocking(self._full_key, self._stop)
        except AbandonedError:
            raise
        except Exception as exc:
            if self._stop.fired:
                raise AbandonedError("abandoned") from None
            raise self._error(exc, "") from (None if isinstance(exc, HTTPStatusError) else exc)
        size = head.size
        if self._expect is not None:
            check_version(self._bucket, self._key, self._expect, etag=head.etag, size=size)
        if self._pos > size:
            raise StorageError(f"s3 {self._bucket}/{self._key}: offset {self._pos} is beyond the end ({size} bytes)")
        self._end = self._pos
        return self._end

    def readinto_blocking(self, buf: memoryview) -> int:
        """Fill ``buf`` as far as the range goes; return the count, 0 only at the end (or once
        closed). The first call sends the GET. Blocks: never call it on the event loop. A broken
        body is resumed here."""
        if not self._enter():
            return 0
        try:
            end = self._end
            if end is None:
                if not len(buf):
                    return 0
                end = self._open()
            if self._pos >= end:
                self._drop_body()
                return 0
            want = min(len(buf), end - self._pos)
            got = 0
            while got < want:
                view = buf[got:want]
                try:
                    body = self._body
                    if body is None:
                        raise ConnectionResetError("no body")
                    n = body.readinto_blocking(view)
                except OSError as exc:
                    if self._stop.fired:
                        raise AbandonedError("abandoned") from None
                    n = self._resume(view, end, exc)
                got += n
                self._pos += n
            return got
        except AbandonedError:
            raise self._closed_error() from None
        finally:
            self._leave()

    def _resume(self, view: memoryview, end: int, first: BaseException) -> int:
        log.warning("s3 %s/%s: stream broke at byte %d (%s: %s), resuming",
                    self._bucket, self._key, self._pos, type(first).__name__, first)

        def attempt() -> int:
            self._drop_body()
            self.resumes += 1
            body = self._getter.open_blocking(self._full_key, self._pos, end, self._etag, self._stop)
            self._body = body
            if body.length != end - self._pos:
                raise ProtocolError(f"resumed GET gave {body.length} bytes, expected {end - self._pos}")
            return body.readinto_blocking(view)

        action = f"read at byte {self._pos} (resumed)"
        try:
            return self._getter._retrying(
                attempt, f"GET {self._bucket}/{self._full_key} (resumed at byte {self._pos})", self._stop
            )
        except AbandonedError:
            raise
        except HTTPStatusError as exc:
            if exc.status == 412:
                if self._expect is not None:
                    raise changed_error(self._bucket, self._key, self._expect) from None
                raise StorageError(
                    f"s3 {self._bucket}/{self._key}: the object was replaced while being read (at byte {self._pos})"
                ) from None
            raise self._error(exc, action) from None
        except Exception as exc:
            raise self._error(exc, action) from exc

    def _error(self, exc: BaseException, action: str) -> StorageError:
        return to_storage_error(exc, bucket=self._bucket, key=self._key, endpoint=self._getter.endpoint,
                                action=action)

    def _drop_body(self) -> None:
        with self._lock:  # the loop (close) and a finishing reader thread may both get here
            body, self._body = self._body, None
        if body is not None:
            body.close()

    # -- the event-loop side -----------------------------------------------------------------------

    async def readinto(self, buf: memoryview) -> int:
        if self._closed:
            if self._failure:
                raise StorageError(self._failure)
            return 0
        end = self._end
        if end is not None:
            if self._pos >= end:
                self._drop_body()
                return 0
            body = self._body
            if body is not None and body.buffered:  # came with the head: no thread hop
                n = body.take_buffered(buf[: min(len(buf), end - self._pos)])
                self._pos += n
                return n
        if not len(buf):
            return 0
        # One hop: the bytes still to receive, and before them the GET if it was not sent yet.
        return await self._getter.run(self.readinto_blocking, buf, interrupt=self._cancelled)

    def _cancelled(self) -> None:
        self._failure = f"s3 {self._bucket}/{self._key}: a read was cancelled, the stream position is lost"
        self.close()

    def close(self) -> None:
        """Stop reading: the connection is dropped (or pooled, if the body was read to its end).
        A read in progress in another thread is woken up and fails."""
        with self._lock:
            self._closed = True
            busy = self._busy
        if busy:
            self._stop.fire()  # the reading thread drops the body when it notices
        else:
            self._drop_body()

    async def aclose(self) -> None:
        self.close()
