"""The lean S3 read path: GET, ListObjectsV2 and HEAD as blocking calls in worker threads.

Why it exists: through aiobotocore, a GET costs about 2 ms of CPU on the event loop (request
construction, event hooks, response parsing) and every piece of the body arrives as a new
``bytes`` that is then copied into moverd's buffer. On a two-core host shared with the S3
server, the event-loop thread is the bottleneck. So reads keep the event loop out of the data
path, on maintained parts:

* **urllib3** carries the requests: its HTTP/1.1 connections (``http://`` and ``https://``,
  honouring ``verify_tls`` and ``ca_bundle``, connect timeouts), kept alive in a small pool of
  ours (:class:`_Connections`), and its responses, whose body is received straight into the
  caller's buffer (no copy, no ``bytes`` per chunk). Connections the server closed after its
  answer (moto does) are noticed before reuse.
* **botocore** signs (``S3SigV4Auth``, the signature its own clients send) and resolves the
  credentials: static keys, or its default chain (environment, ``~/.aws``, web identity, a
  container or instance role), refreshed when they expire. Each request signs with one frozen
  copy, so a refresh never mixes two key pairs.
* **worker threads**: every call runs under :attr:`LeanClient.limiter`, ``max_pool_connections``
  tokens of this storage's own, so reads blocked on the network never take the tokens of anyio's
  default limiter that file writes use. :meth:`LeanReader.readinto_blocking` lets the core
  receive and hash a chunk in one thread hop; the first one also sends the GET, so a small
  object costs one hop in all (each costs the event loop 150-250 µs of CPU).

Retries are moverd's policy (:func:`moverd.retry_blocking`, the transient errors of
:func:`.errors.is_transient`) within ``request_timeout``; a body that breaks is resumed with a
ranged GET pinned to the object's ETag with ``If-Match``. This is the storage's only read path.

Proxies: where botocore would go through a proxy of the environment (:func:`environment_proxy`),
so does this client, as urllib3's proxy manager does it (:func:`_through_proxy`): a CONNECT
tunnel for ``https://`` endpoints, whole-URL requests to the proxy for ``http://`` ones.

Abandoning a blocking call: a task cancelled while its worker thread waits returns at once
(``abandon_on_cancel=True``); the thread is then stopped by an :class:`Interrupt`, which shuts
down the socket it waits on (tracked from before the request is sent: the wait for the answer's
head can be stopped as well as the body) and cuts its backoff sleep short, so that no thread
lingers for ``read_timeout``. Until it notices, that thread may still write into the buffer it
was given. A TCP or TLS connect in progress is not stopped: it ends within ``connect_timeout``.
"""

from __future__ import annotations

import asyncio
import http.client
import logging
import socket
import threading
import time
import xml.etree.ElementTree as ET
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar, TypeVarTuple
from urllib.parse import quote, unquote_plus, urlsplit

import anyio
import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.exceptions import ConnectTimeoutError, NewConnectionError
from urllib3.response import HTTPResponse

from moverd import ObjectInfo, StorageError, retry_blocking

from .errors import (
    RETRY_CODES,
    RETRY_STATUS,
    HTTPStatusError,
    NoAnswerError,
    NotS3Error,
    PrematureEndError,
    TransientHTTPError,
    changed_error,
    check_version,
    is_transient,
    not_s3_answer,
    quoted_etag,
    replaced_error,
    to_storage_error,
    total_size,
)
from .options import S3Options

if TYPE_CHECKING:
    from botocore.credentials import Credentials, ReadOnlyCredentials

log = logging.getLogger(__name__)

T = TypeVar("T")
Ts = TypeVarTuple("Ts")

_SMALL_BODY_MAX = 64 * 1024 * 1024
"""Error documents and listing pages (about 300 KiB for 1000 keys); anything bigger is an error."""


class UnusableAnswerError(Exception):
    """An answer this client cannot use (no Content-Length on a body, a Range ignored)."""


class AbandonedError(Exception):
    """The blocking call was abandoned: its reader was closed or its task cancelled."""


class _DeadlineError(TimeoutError):
    """The request's ``request_timeout`` ran out before another wait could start."""


class Interrupt:
    """Stops a blocking call from another thread: shuts down the socket it waits on and wakes its
    backoff sleep. Shutting down (not closing) is what wakes a thread blocked in ``recv``; the
    connection is then closed by the thread that holds it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._event = threading.Event()

    @property
    def fired(self) -> bool:
        return self._event.is_set()

    def track(self, sock: Any) -> None:
        """Register the socket the calling thread is about to wait on (raises when fired): the
        plain one under it, when it is TLS inside TLS (an ``https://`` endpoint through an
        ``https://`` proxy: urllib3's ``SSLTransport`` over the proxy's TLS socket)."""
        while not isinstance(sock, socket.socket):
            sock = sock.socket
        with self._lock:
            if self._event.is_set():
                raise AbandonedError("abandoned")
            if sock not in self._socks:
                self._socks.append(sock)

    def untrack_all(self) -> None:
        with self._lock:
            self._socks.clear()

    def fire(self) -> None:
        with self._lock:
            self._event.set()
            socks, self._socks = self._socks, []
        for sock in socks:
            try:
                # The plain socket's shutdown, also for a TLS one: its own would drop the TLS
                # state under the thread that is reading with it.
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
            except OSError:
                pass

    def sleep(self, seconds: float) -> None:
        """A backoff pause that ends early, with :class:`AbandonedError`, when fired."""
        if self._event.wait(seconds):
            raise AbandonedError("abandoned")


class _Connections:
    """Idle kept-alive urllib3 connections to one host, for the worker threads to share.

    urllib3's own pool would add its request layer (``urlopen``: retries, redirects, timeouts
    objects, 25-40 µs of CPU per request here) to what this client does itself, and would hide
    the connection's socket from :class:`Interrupt` until the answer's head has come.
    """

    def __init__(self, make: Callable[[], HTTPConnection], most: int) -> None:
        self._make = make
        self._most = most
        self._idle: deque[HTTPConnection] = deque()
        self._lock = threading.Lock()

    def take(self) -> tuple[HTTPConnection, bool]:
        """A connection and whether it served a request before; idle ones the server closed
        meanwhile (moto closes after every answer) are dropped here."""
        while True:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            if conn is None:
                return self._make(), False
            if conn.is_connected:
                return conn, True
            conn.close()

    def give(self, conn: HTTPConnection) -> None:
        """Keep a connection whose answer was read to its end, for the next request."""
        if conn.sock is not None:
            with self._lock:
                if len(self._idle) < self._most:
                    self._idle.append(conn)
                    return
        conn.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, deque()
        for conn in idle:
            conn.close()


class Listed(NamedTuple):
    """One entry of a ListObjectsV2 page, key in full (prefix included) and decoded."""

    key: str
    size: int
    mtime: float
    etag: str | None


class _Signer:
    """SigV4 by botocore, with credentials resolved once (in a worker thread: the default chain
    may ask an instance-metadata service) and refreshed by botocore when they expire. botocore is
    imported by the first request, not when the storage is made from the configuration."""

    def __init__(self, opts: S3Options) -> None:
        self._opts = opts
        self._lock = threading.Lock()
        self._credentials: Credentials | None = None
        self._sign: Callable[[ReadOnlyCredentials, Any], None] | None = None
        self._request_cls: Any = None

    def _prepare(self) -> Credentials:
        with self._lock:
            if self._credentials is None:
                from botocore.auth import S3SigV4Auth
                from botocore.awsrequest import AWSRequest
                from botocore.credentials import Credentials

                region = self._opts.region
                self._request_cls = AWSRequest
                self._sign = lambda frozen, request: S3SigV4Auth(frozen, "s3", region).add_auth(request)
                o = self._opts
                if o.access_key_id is not None and o.secret_access_key is not None:
                    self._credentials = Credentials(
                        o.access_key_id.get_secret_value(), o.secret_access_key.get_secret_value()
                    )
                else:
                    import botocore.session
                    from botocore.exceptions import NoCredentialsError

                    found = botocore.session.get_session().get_credentials()
                    if found is None:
                        raise NoCredentialsError()
                    self._credentials = found
            return self._credentials

    def headers(self, method: str, url: str, headers: dict[str, str]) -> dict[str, str]:
        """``headers`` with the SigV4 ones (date, payload hash, token, Authorization) added."""
        credentials = self._credentials or self._prepare()
        assert self._sign is not None
        request = self._request_cls(method=method, url=url, headers=headers)
        # One frozen copy per request: a refresh in between cannot mix two key pairs.
        self._sign(credentials.get_frozen_credentials(), request)
        return dict(request.headers.items())


class LeanClient:
    """The pooled connections to one S3 endpoint and the requests the lean path makes.

    Blocking methods (``*_blocking``) run in worker threads and are safe to call from several at
    once; the async ones hand them to a thread under :attr:`limiter`.
    """

    def __init__(self, opts: S3Options) -> None:
        endpoint_url = opts.endpoint_url or f"https://s3.{opts.region}.amazonaws.com"
        url = urlsplit(endpoint_url)
        self.endpoint = opts.endpoint_url or f"AWS S3 ({opts.region})"
        """What errors name (as the aiobotocore client's do)."""
        self.bucket = opts.bucket
        self.virtual = opts.addressing_style == "virtual"
        self.netloc = f"{opts.bucket}.{url.netloc}" if self.virtual else url.netloc
        self.origin = f"{url.scheme}://{self.netloc}"
        self.base = url.path.rstrip("/")
        self.connect_timeout = opts.connect_timeout
        self.read_timeout = opts.read_timeout
        self.request_timeout = opts.request_timeout
        self.attempts = opts.max_attempts
        self.max_connections = opts.max_pool_connections
        self._signer = _Signer(opts)
        host = f"{opts.bucket}.{url.hostname}" if self.virtual else (url.hostname or "127.0.0.1")
        https = url.scheme == "https"
        port = url.port or (443 if https else 80)
        ca = str(opts.ca_bundle) if opts.ca_bundle is not None else _default_ca()
        tls: dict[str, Any] = dict(
            cert_reqs="CERT_REQUIRED" if opts.verify_tls else "CERT_NONE",
            ca_certs=ca if opts.verify_tls else None, assert_hostname=None if opts.verify_tls else False,
        )
        self.proxy = environment_proxy(endpoint_url)
        """The proxy of the environment that carries this endpoint's requests, as botocore
        decides it (so uploads and reads take the same way); None: straight to the endpoint."""
        self._forward = False
        self._proxy_headers: dict[str, str] = {}
        make: Callable[[], HTTPConnection]
        if self.proxy is None:
            make = (lambda: HTTPSConnection(host, port, **tls)) if https else (lambda: HTTPConnection(host, port))
        else:
            make, self._forward, self._proxy_headers = _through_proxy(self.proxy, host, port, https, tls)
        self._connections = _Connections(make, opts.max_pool_connections)
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

    def close(self) -> None:
        """Close the idle connections (those in use close when their reader does)."""
        self._connections.close()

    # -- one exchange ----------------------------------------------------------------------------

    def object_path(self, full_key: str) -> str:
        # As botocore's serializer writes S3 keys: UTF-8, everything but unreserved, '/' and '~'.
        key = quote(full_key, safe="/~")
        return f"{self.base}/{key}" if self.virtual else f"{self.base}/{self.bucket}/{key}"

    def _bucket_path(self) -> str:
        return f"{self.base}/" if self.virtual else f"{self.base}/{self.bucket}"

    def _wait(self, longest: float, deadline: float) -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise _DeadlineError("request_timeout reached")
        return min(longest, left)

    def send(self, method: str, target: str, headers: dict[str, str], stop: Interrupt, deadline: float,
             *, preload: bool) -> tuple[HTTPConnection, HTTPResponse]:
        """One signed request and its answer's head (its body too when ``preload``), on an idle
        connection or a new one. The connection's socket is tracked by ``stop`` from before the
        request is sent until :meth:`Interrupt.untrack_all`; the caller gives the connection
        back (:meth:`release`) or closes it."""
        signed = self._signer.headers(method, self.origin + target, {"Host": self.netloc, **headers})
        if self._forward:  # to a proxy that forwards it: the whole URL, and the proxy's credentials
            target = self.origin + target
            signed.update(self._proxy_headers)
        while True:
            conn, reused = self._connections.take()
            try:
                if conn.sock is None:
                    conn.timeout = self._wait(self.connect_timeout, deadline)
                    try:
                        conn.connect()
                    except TimeoutError:  # in the TLS handshake: still connecting
                        raise ConnectTimeoutError(f"no connection within {conn.timeout:g} s") from None
                assert conn.sock is not None
                stop.track(conn.sock)
                conn.timeout = self._wait(self.read_timeout, deadline)
                conn.request(method, target, headers=signed, preload_content=preload, decode_content=False)
                response = conn.getresponse()
                return conn, response
            except (ConnectionError, http.client.BadStatusLine):
                # A kept-alive connection the server dropped just now: not a failed attempt.
                conn.close()
                stop.untrack_all()
                if not reused or stop.fired:
                    raise
            except BaseException:
                conn.close()
                stop.untrack_all()
                raise

    def release(self, conn: HTTPConnection, response: HTTPResponse) -> None:
        """Pool ``conn`` if its answer was read to the end (anything left would be taken for the
        next request's answer), else close it."""
        if response.isclosed():
            self._connections.give(conn)
        else:
            conn.close()

    def _fetch(self, method: str, target: str, stop: Interrupt, deadline: float) -> HTTPResponse:
        """One request whose answer is read whole; error answers raise :class:`HTTPStatusError`."""
        conn, response = self.send(method, target, {}, stop, deadline, preload=True)
        stop.untrack_all()
        self.release(conn, response)
        if response.status >= 300:
            raise _status_error(response, response.data, bodiless=method == "HEAD")
        return response

    def retrying(self, op: Callable[[float], T], what: str, stop: Interrupt) -> T:
        """``op(deadline)`` with moverd's retries, all of them within ``request_timeout`` (each
        wait is cut to what is left of it); ``what`` (``GET bucket/key``) names the request."""
        deadline = time.monotonic() + self.request_timeout
        tries = 0

        def attempt() -> T:
            nonlocal tries
            tries += 1
            return op(deadline)

        def retryable(exc: BaseException) -> bool:
            return is_transient(exc) and not stop.fired and time.monotonic() < deadline

        try:
            return retry_blocking(
                attempt, retryable=retryable, attempts=self.attempts, what=f"s3 {what}",
                sleep=lambda seconds: stop.sleep(min(seconds, max(0.0, deadline - time.monotonic()))),
            )
        except AbandonedError:
            raise
        except Exception as exc:
            if stop.fired:
                raise AbandonedError("abandoned") from None
            if _timed_out(exc):
                if isinstance(exc, _DeadlineError) or time.monotonic() >= deadline - 0.01:
                    raise NoAnswerError(what, self.request_timeout, tries, request_timeout=True) from None
                connect = isinstance(exc, ConnectTimeoutError)
                seconds = self.connect_timeout if connect else self.read_timeout
                raise NoAnswerError(what, seconds, tries, connect=connect) from None
            raise

    # -- GET object ----------------------------------------------------------------------------

    def open_blocking(self, full_key: str, start: int, end: int | None, etag: str | None,
                      stop: Interrupt, deadline: float) -> LeanBody:
        """One GET of ``[start, end)`` (``end`` None: to the end of the object); the body is left
        to read. Error answers raise :class:`HTTPStatusError` (transient ones its subclass)."""
        headers: dict[str, str] = {}
        ranged = bool(start) or end is not None
        if ranged:
            headers["Range"] = f"bytes={start}-" if end is None else f"bytes={start}-{end - 1}"
        if etag:
            headers["If-Match"] = etag
        conn, response = self.send("GET", self.object_path(full_key), headers, stop, deadline, preload=False)
        try:
            if response.status not in (200, 206):
                body = response.read(_SMALL_BODY_MAX)
                stop.untrack_all()
                self.release(conn, response)
                raise _status_error(response, body)
            length_text = response.headers.get("content-length")
            if length_text is None:
                raise UnusableAnswerError("S3 answered without Content-Length")
            length = int(length_text)
            if response.status == 200 and ranged:
                if start:  # the server ignored Range: the body starts at byte 0
                    raise UnusableAnswerError("S3 ignored the Range header")
                if end is not None and end < length:
                    length = end
            # The body's waits are read_timeout each, whatever was left of request_timeout for the head.
            if conn.sock is not None:
                conn.sock.settimeout(self.read_timeout)
        except BaseException:
            stop.untrack_all()
            conn.close()
            raise
        return LeanBody(self, conn, response, length, response.headers.get("etag"), stop,
                        response.headers.get("content-range"))

    # -- HEAD ------------------------------------------------------------------------------------

    def head_blocking(self, full_key: str, stop: Interrupt) -> Listed:
        """Size, mtime and ETag of one object (HEAD), retried like any request."""
        from email.utils import parsedate_to_datetime

        def attempt(deadline: float) -> Listed:
            response = self._fetch("HEAD", self.object_path(full_key), stop, deadline)
            modified = response.headers.get("last-modified")
            mtime = parsedate_to_datetime(modified).timestamp() if modified else 0.0
            etag = response.headers.get("etag")
            return Listed(full_key, int(response.headers.get("content-length", 0)), mtime,
                          etag.strip('"') if etag else None)

        return self.retrying(attempt, f"HEAD {self.bucket}/{full_key}", stop)

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
        query = "&".join(f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}" for k, v in sorted(params))

        def attempt(deadline: float) -> tuple[list[Listed], str | None]:
            response = self._fetch("GET", f"{self._bucket_path()}?{query}", stop, deadline)
            return parse_list(response.data)

        return self.retrying(attempt, f"list {self.bucket}/{prefix}" if prefix else f"list {self.bucket}", stop)

    async def list_page(self, prefix: str, token: str | None) -> tuple[list[Listed], str | None]:
        stop = Interrupt()
        return await self.run(self.list_page_blocking, prefix, token, stop, interrupt=stop.fire)


def environment_proxy(endpoint_url: str) -> str | None:
    """The proxy of the environment (``HTTP_PROXY``/``HTTPS_PROXY``, ``NO_PROXY``) that botocore
    sends this endpoint's requests through, decided and completed by botocore's own calls (its
    clients' ``get_environ_proxies`` of the endpoint URL, ``ProxyConfiguration.proxy_url_for``),
    so that reads and uploads take the same way; None when there is none. botocore is imported
    only when the environment names a proxy at all."""
    import urllib.request

    if not urllib.request.getproxies():
        return None
    from botocore.httpsession import ProxyConfiguration
    from botocore.utils import get_environ_proxies

    proxy: str | None = ProxyConfiguration(get_environ_proxies(endpoint_url)).proxy_url_for(endpoint_url)
    return proxy


def _through_proxy(
    proxy: str, host: str, port: int, https: bool, tls: dict[str, Any]
) -> tuple[Callable[[], HTTPConnection], bool, dict[str, str]]:
    """How to reach ``host:port`` through ``proxy``, as urllib3's ProxyManager does it: an
    ``https://`` endpoint through a CONNECT tunnel (TLS end to end with the endpoint, inside TLS
    to the proxy when the proxy's URL is ``https://``); an ``http://`` one by sending the proxy
    each request with the whole URL (``forward``). Also botocore's ``Proxy-Authorization``
    header of the user and password in the proxy's URL (only with both). An ``https://``
    proxy's certificate is checked as the endpoint's is (``verify_tls``, ``ca_bundle``: one
    bundle may hold both CAs), as botocore checks it for a tunnel."""
    from botocore.httpsession import ProxyConfiguration, mask_proxy_url
    from urllib3.connection import ProxyConfig
    from urllib3.util import parse_url

    url = parse_url(proxy)
    if url.host is None:
        raise ValueError(f"proxy {mask_proxy_url(proxy)!r} names no host")
    secure = url.scheme == "https"
    proxy_port = url.port or (443 if secure else 80)
    headers: dict[str, str] = ProxyConfiguration().proxy_headers_for(proxy)
    proxy_host: str = url.host
    if https:
        config = ProxyConfig(None, False, None, None)

        def tunnel() -> HTTPConnection:
            conn = HTTPSConnection(proxy_host, proxy_port, proxy=url, proxy_config=config, **tls)
            conn.set_tunnel(host, port, headers=headers, scheme="https" if secure else "http")
            return conn

        return tunnel, False, {}
    if secure:
        return (lambda: HTTPSConnection(proxy_host, proxy_port, **tls)), True, headers
    return (lambda: HTTPConnection(proxy_host, proxy_port)), True, headers


def _default_ca() -> str | None:
    """botocore's default CA bundle (certifi's), so both paths trust the same servers."""
    try:
        import certifi

        return str(certifi.where())
    except ImportError:
        return None


def _timed_out(exc: BaseException) -> bool:
    """A wait that ran out (not a refused connection, which urllib3 also files as a connect
    timeout)."""
    if isinstance(exc, NewConnectionError):
        return False
    return isinstance(exc, (TimeoutError, urllib3.exceptions.TimeoutError))


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


def _status_error(response: HTTPResponse, body: bytes, *, bodiless: bool = False) -> Exception:
    """The error of an answer of status 300 or more. One that S3 would not give (HTML, no XML
    error document) is a :class:`NotS3Error`, so that a web server's 404 page is never taken for
    a missing object; 5xx and 429 answers stay worth retrying whatever they look like."""
    status = response.status
    reason = response.reason or ""
    ctype = response.headers.get("content-type", "")
    transient_status = status in RETRY_STATUS
    if not transient_status and not_s3_answer(status, ctype, None if bodiless else body):
        return NotS3Error(status, reason, ctype, body)
    if bodiless:  # HEAD: no document; botocore names the error by its status
        code, message = str(status), reason
    else:
        code, message = _parse_error(body)
    cls = TransientHTTPError if transient_status or code in RETRY_CODES else HTTPStatusError
    return cls(status, code, message)


def parse_list(body: bytes) -> tuple[list[Listed], str | None]:
    """Entries and next continuation token of a ListObjectsV2 answer (any XML namespace)."""
    try:
        root = ET.fromstring(body)
    except ET.ParseError as exc:
        raise UnusableAnswerError(f"unreadable ListObjectsV2 answer: {exc}") from None
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


class LeanBody:
    """The remaining ``length`` bytes of one GET answer, received into the caller's buffers.

    Used by one thread at a time. Its socket stays tracked by the reader's :class:`Interrupt`
    until the body is closed; read to its end, the connection goes back to the pool.
    """

    def __init__(self, client: LeanClient, conn: HTTPConnection, response: HTTPResponse, length: int,
                 etag: str | None, stop: Interrupt, content_range: str | None = None) -> None:
        self._client = client
        self._conn = conn
        self._response: HTTPResponse | None = response
        self._stop = stop
        self.length = length
        self.remaining = length
        self.etag = etag
        self.content_range = content_range
        # http.client's response under urllib3's: its ``readinto`` receives into the caller's
        # buffer, where urllib3's reads a new ``bytes`` and copies it (a third more CPU per GiB).
        raw = response._fp
        self._readinto: Callable[[memoryview], int] = raw.readinto if raw is not None else response.readinto
        if length == 0:
            self.close()

    def readinto_blocking(self, buf: memoryview) -> int:
        """Receive up to ``len(buf)`` bytes; raises ``OSError`` or urllib3's errors when the
        connection breaks, :class:`PrematureEndError` when the body ends early."""
        want = min(len(buf), self.remaining)
        if want == 0:
            return 0
        if self._response is None:
            raise PrematureEndError("body already closed")
        n = self._readinto(buf[:want])
        if n == 0:
            raise PrematureEndError(f"connection closed with {self.remaining} bytes of the body to come")
        self.remaining -= n
        if self.remaining == 0:
            self.close()
        return n

    def close(self) -> None:
        """Give the connection back if the body was read to its end, else drop it."""
        response, self._response = self._response, None
        if response is None:
            return
        self._stop.untrack_all()
        if self.remaining == 0 and not self._stop.fired:
            self._client.release(self._conn, response)
        else:
            self._conn.close()


class LeanReader:
    """A :class:`moverd.Reader` over lean GETs, opened by its first read and resumed from its
    position if the body breaks.

    Making one does no I/O: the first read sends the GET, in the worker thread that then receives
    the first bytes, so a small object costs one thread hop in all (the POSIX storage's reader
    opens its file the same way). A missing object therefore raises
    :class:`~moverd.NotFoundError` from the first read, not from ``open_reader``; every error a
    read raises is moverd's (:class:`~moverd.StorageError` naming bucket and key).

    Reading happens in :meth:`readinto_blocking`, called from a worker thread: by the core
    directly (receiving and hashing a chunk in one hop), or by :meth:`readinto`. One read at a
    time; :meth:`aclose` may come at any moment, a read in progress (the first GET included) then
    fails promptly.
    """

    def __init__(self, client: LeanClient, *, bucket: str, key: str, full_key: str, start: int,
                 end: int | None, expect: ObjectInfo | None = None) -> None:
        self._client = client
        self._expect = expect
        """The listed version: its ETag pins every GET (``If-Match``), its size is checked."""
        self._bucket, self._key, self._full_key = bucket, key, full_key
        self._pos = start
        self._want_end = end
        self._end: int | None = start if end == start else None
        """Where the stream ends: unknown (None) until the first GET answered, since a range is cut
        at the object's end and ``end`` None means the object's end."""
        self._etag: str | None = quoted_etag(expect.etag) if expect is not None and expect.etag else None
        self._body: LeanBody | None = None
        self._stop = Interrupt()
        self._lock = threading.Lock()
        self._busy = False
        self._closed = False
        self._failure: str | None = None
        self.resumes = 0
        """How many times the stream was re-opened after a break (for tests and metrics)."""

    @classmethod
    def empty(cls, client: LeanClient, *, bucket: str, key: str, full_key: str) -> LeanReader:
        return cls(client, bucket=bucket, key=key, full_key=full_key, start=0, end=0)

    @property
    def limiter(self) -> anyio.CapacityLimiter:
        """The thread limiter of this reader's endpoint: what a caller running
        :meth:`readinto_blocking` in its own worker thread should pass to ``run_sync``."""
        return self._client.limiter

    # -- the blocking side (worker threads) -------------------------------------------------------

    def _enter(self) -> bool:
        """Mark a read in progress; False when the reader is closed (read nothing)."""
        with self._lock:
            if self._closed:
                if self._failure:
                    raise StorageError(self._failure)
                return False
            if self._busy:
                raise RuntimeError("LeanReader: one read at a time")
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

    def _request(self) -> str:
        return f"GET {self._bucket}/{self._full_key}"

    def _open(self) -> int:
        """The first GET, in the reading thread; its Content-Length fixes the end, which is
        returned. Errors are mapped as ``stat`` maps them (404 → NotFoundError...); a 416 (the
        range starts at or after the end) is sorted out with a HEAD in this same thread."""
        start, end, pinned = self._pos, self._want_end, self._etag
        try:
            body = self._client.retrying(
                lambda deadline: self._client.open_blocking(self._full_key, start, end, pinned, self._stop, deadline),
                self._request(), self._stop,
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
            head = self._client.head_blocking(self._full_key, self._stop)
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
                        raise PrematureEndError("no body")
                    n = body.readinto_blocking(view)
                except Exception as exc:
                    if self._stop.fired:
                        raise AbandonedError("abandoned") from None
                    if not is_transient(exc):
                        raise self._error(exc, f"read at byte {self._pos}") from exc
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

        def attempt(deadline: float) -> int:
            self._drop_body()
            self.resumes += 1
            body = self._client.open_blocking(self._full_key, self._pos, end, self._etag, self._stop, deadline)
            self._body = body
            if body.length != end - self._pos:
                raise UnusableAnswerError(f"resumed GET gave {body.length} bytes, expected {end - self._pos}")
            return body.readinto_blocking(view)

        action = f"read at byte {self._pos} (resumed)"
        try:
            return self._client.retrying(attempt, f"{self._request()} (resumed at byte {self._pos})", self._stop)
        except AbandonedError:
            raise
        except HTTPStatusError as exc:
            if exc.status == 412:
                raise replaced_error(self._bucket, self._key, self._expect, self._pos) from None
            raise self._error(exc, action) from None
        except Exception as exc:
            raise self._error(exc, action) from exc

    def _error(self, exc: BaseException, action: str) -> StorageError:
        return to_storage_error(exc, bucket=self._bucket, key=self._key, endpoint=self._client.endpoint,
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
        if end is not None and self._pos >= end:
            self._drop_body()
            return 0
        if not len(buf):
            return 0
        # One hop: the bytes still to receive, and before them the GET if it was not sent yet.
        return await self._client.run(self.readinto_blocking, buf, interrupt=self._cancelled)

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
