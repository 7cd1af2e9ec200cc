"""A fault-injecting HTTP/1.1 proxy for testing retries against a real server.

It sits on 127.0.0.1 in front of one upstream (moto's S3 server) and forwards requests as they
are, one upstream connection per request. Rules, consumed in order, make it misbehave:

* ``fail_next(n, status=503)`` answers the next ``n`` matching requests itself with an S3 error
  document (503 ``SlowDown``, 500 ``InternalError``, or any status/code) without forwarding them;
* ``reset_next(n, after_bytes=K)`` forwards the request but cuts the connection after ``K``
  bytes of the response body (with a TCP RST, or a plain close with ``rst=False``);
* ``drop_next(n)`` reads the next ``n`` matching requests, body included, then resets the
  connection without any answer (a server that died mid-request);
* ``fail_always(status)`` until ``clear()``;
* ``rewrite_header(name, value)`` forwards requests but, in responses that carry header
  ``name``, replaces its value (an S3 server that reports another checksum, or a restore that is
  still running: ``x-amz-restore: ongoing-request="true"``), until ``clear()``.

``seen`` lists every request's method, target and Range header, in order (to count
RestoreObject calls, and to see which byte ranges were read).

It is also a forward proxy of the kind ``HTTP_PROXY``/``HTTPS_PROXY`` name: a request whose
target is a whole URL is forwarded to the upstream like any other, and ``CONNECT host:port``
opens a tunnel to that address (on 127.0.0.1 only), which it relays untouched (no rules apply
inside: the bytes are TLS). ``proxy_authorizations`` lists the ``Proxy-Authorization`` header
of each request and CONNECT that carried one.

Each rule may be limited to one HTTP ``method`` (``"GET"``, ``"PUT"``...). It runs its own event
loop in a daemon thread, so sync and async tests (and any client library) can use it; the rule
methods are thread-safe. ``requests`` and ``faults`` count what it saw and did.

    with FaultProxy("127.0.0.1", 5000) as proxy:
        proxy.fail_next(2, status=503, method="PUT")
        ... client(endpoint_url=proxy.url) ...
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from dataclasses import dataclass, field
from typing import Any, Self

_REASONS = {
    500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable", 429: "Too Many Requests",
}
_CODES = {500: "InternalError", 503: "SlowDown", 429: "SlowDown", 502: "BadGateway"}
_MESSAGES = {
    "SlowDown": "Please reduce your request rate.",
    "InternalError": "We encountered an internal error. Please try again.",
    "ServiceUnavailable": "Service is unable to handle request.",
}


@dataclass
class Rule:
    kind: str  # "fail", "reset" or "drop"
    remaining: int | None  # None: forever
    method: str | None = None
    status: int = 503
    code: str = "SlowDown"
    after_bytes: int = 0
    rst: bool = True
    message: str | None = None

    def matches(self, method: str) -> bool:
        return self.method is None or self.method == method


@dataclass
class _Request:
    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes = b""
    chunks: list[bytes] = field(default_factory=list)

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return None


class FaultProxy:
    """See the module docstring. ``url`` is what clients use as their endpoint."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self._rules: list[Rule] = []
        self._rewrites: dict[str, tuple[str, str | None]] = {}
        self.seen: list[tuple[str, str, str | None]] = []
        self.proxy_authorizations: list[str] = []
        self._lock = threading.Lock()
        self.requests = 0
        self.faults = 0
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._ready = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- rules -------------------------------------------------------------------------------

    def fail_next(self, n: int = 1, *, status: int = 503, code: str | None = None,
                  method: str | None = None, message: str | None = None) -> None:
        """Answer the next ``n`` matching requests with ``status`` and an S3 error document (its
        ``Message`` the code's usual one, or ``message``: 403 ``AccessDenied`` "Request has
        expired" is S3's answer to a presigned URL used too late)."""
        self._add(Rule("fail", n, method, status, code or _CODES.get(status, "InternalError"), message=message))

    def fail_always(self, *, status: int = 503, code: str | None = None, method: str | None = None) -> None:
        """Answer every matching request with an error until :meth:`clear`."""
        self._add(Rule("fail", None, method, status, code or _CODES.get(status, "InternalError")))

    def reset_next(
        self, n: int = 1, *, after_bytes: int, method: str | None = "GET", rst: bool = True
    ) -> None:
        """Forward the next ``n`` matching requests but cut the response after ``after_bytes``
        bytes of body (responses with a shorter body pass unharmed and still count)."""
        self._add(Rule("reset", n, method, after_bytes=after_bytes, rst=rst))

    def drop_next(self, n: int = 1, *, method: str | None = None) -> None:
        """Read the next ``n`` matching requests, then reset the connection without answering."""
        self._add(Rule("drop", n, method))

    def rewrite_header(self, name: str, value: str, *, method: str | None = None) -> None:
        """In responses (to ``method`` requests, or any) that carry header ``name``, give it
        ``value`` instead, until :meth:`clear` or :meth:`stop_rewriting`."""
        with self._lock:
            self._rewrites[name.lower()] = (value, method)

    def stop_rewriting(self, name: str) -> None:
        with self._lock:
            self._rewrites.pop(name.lower(), None)

    def clear(self) -> None:
        with self._lock:
            self._rules.clear()
            self._rewrites.clear()

    def _rewritten(self, method: str, headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
        with self._lock:
            rewrites = {k: v for k, (v, m) in self._rewrites.items() if m is None or m == method}
        return [(k, rewrites.get(k.lower(), v)) for k, v in headers]

    def _add(self, rule: Rule) -> None:
        with self._lock:
            self._rules.append(rule)

    def _take(self, method: str) -> Rule | None:
        with self._lock:
            for rule in self._rules:
                if rule.matches(method):
                    if rule.remaining is not None:
                        rule.remaining -= 1
                        if rule.remaining <= 0:
                            self._rules.remove(rule)
                    self.faults += 1
                    return rule
            return None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> Self:
        self._thread = threading.Thread(target=self._run, name="faultproxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("fault proxy did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._server is not None:
            self._loop.call_soon_threadsafe(self._server.close)
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(5)
        self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop

        async def serve() -> None:
            self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
            self.port = self._server.sockets[0].getsockname()[1]
            self._ready.set()

        loop.run_until_complete(serve())
        try:
            loop.run_forever()
        finally:
            for task in asyncio.all_tasks(loop):
                task.cancel()
            with contextlib.suppress(Exception):
                loop.run_until_complete(asyncio.sleep(0))
            loop.close()

    # -- one client connection ---------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await self._read_head(reader)
                if head is None:
                    return
                req = _parse_request(head)
                self.requests += 1
                self.seen.append((req.method, req.target, req.header("range")))
                if (auth := req.header("proxy-authorization")) is not None:
                    self.proxy_authorizations.append(auth)
                if req.method == "CONNECT":
                    await self._tunnel(req.target, reader, writer)
                    return
                rule = self._take(req.method)
                if rule is not None and rule.kind == "fail":
                    # Answered before the body is read: the connection cannot be reused.
                    await self._send_error(writer, rule)
                    return
                if (req.header("expect") or "").lower() == "100-continue":
                    writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                    await writer.drain()
                await self._read_body(reader, req)
                if rule is not None and rule.kind == "drop":
                    await _cut(writer, rst=True)
                    return
                keep = await self._forward(req, writer, rule)
                if not keep:
                    return
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            return
        except asyncio.CancelledError:
            # stop() cancels idle keep-alive connections; ending quietly keeps asyncio from
            # logging the cancellation as an error in its stream callback.
            return
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    @staticmethod
    async def _tunnel(target: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """CONNECT: relay bytes both ways between the client and ``target`` until either ends."""
        host, _, port = target.rpartition(":")
        if host not in ("127.0.0.1", "localhost"):
            writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()
            return
        up_reader, up_writer = await asyncio.open_connection(host, int(port))
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        await writer.drain()

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except ConnectionError:
                pass
            finally:
                with contextlib.suppress(Exception):
                    dst.close()

        try:
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        finally:
            up_writer.close()

    @staticmethod
    async def _read_head(reader: asyncio.StreamReader) -> bytes | None:
        try:
            return await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return None

    @staticmethod
    async def _read_body(reader: asyncio.StreamReader, req: _Request) -> None:
        length = req.header("content-length")
        if length is not None:
            req.body = await reader.readexactly(int(length))
        elif (req.header("transfer-encoding") or "").lower() == "chunked":
            while True:
                line = await reader.readuntil(b"\r\n")
                size = int(line.split(b";")[0], 16)
                data = await reader.readexactly(size + 2)
                req.chunks.append(line + data)
                if size == 0:
                    # trailers end with an empty line (data already holds the first CRLF)
                    while data != b"\r\n":
                        data = await reader.readuntil(b"\r\n")
                        req.chunks.append(data)
                    break

    async def _send_error(self, writer: asyncio.StreamWriter, rule: Rule) -> None:
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{rule.code}</Code><Message>{rule.message or _MESSAGES.get(rule.code, 'Injected fault.')}"
            "</Message><RequestId>faultproxy</RequestId></Error>"
        ).encode()
        reason = _REASONS.get(rule.status, "Error")
        writer.write(
            f"HTTP/1.1 {rule.status} {reason}\r\nContent-Type: application/xml\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body
        )
        await writer.drain()

    async def _forward(self, req: _Request, writer: asyncio.StreamWriter, rule: Rule | None) -> bool:
        """Relay one request upstream and its response back; False when the client connection ends."""
        up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        try:
            lines = [f"{req.method} {req.target} HTTP/1.1"]
            lines += [f"{k}: {v}" for k, v in req.headers if k.lower() not in ("connection", "expect")]
            lines.append("Connection: close")
            up_writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
            up_writer.write(req.body)
            for chunk in req.chunks:
                up_writer.write(chunk)
            await up_writer.drain()
            head = await up_reader.readuntil(b"\r\n\r\n")
            status_line, resp_headers = _parse_headers(head)
            resp_headers = self._rewritten(req.method, resp_headers)
            framed = any(k.lower() in ("content-length", "transfer-encoding") for k, _ in resp_headers)
            out = [status_line] + [f"{k}: {v}" for k, v in resp_headers if k.lower() != "connection"]
            keep = framed and (req.header("connection") or "").lower() != "close"
            out.append("Connection: keep-alive" if keep else "Connection: close")
            writer.write(("\r\n".join(out) + "\r\n\r\n").encode("latin-1"))
            limit = rule.after_bytes if rule is not None and rule.kind == "reset" else None
            sent = 0
            while True:
                want = 65536 if limit is None else min(65536, limit - sent)
                data = await up_reader.read(want) if want > 0 else b""
                if not data:
                    break
                writer.write(data)
                sent += len(data)
                await writer.drain()
            if limit is not None and sent >= limit and not up_reader.at_eof():
                extra = await up_reader.read(1)
                if extra:  # the body really was longer: cut it here
                    await _cut(writer, rst=rule.rst if rule else True)
                    return False
            await writer.drain()
            return keep
        finally:
            up_writer.close()


async def _cut(writer: asyncio.StreamWriter, *, rst: bool) -> None:
    """Break the client connection mid-body: RST (SO_LINGER 0) or a plain early close."""
    await writer.drain()
    await asyncio.sleep(0.05)  # let the bytes already written leave the socket buffer
    sock = writer.get_extra_info("socket")
    if rst and sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()
    else:
        writer.close()


def _parse_headers(head: bytes) -> tuple[str, list[tuple[str, str]]]:
    text = head.decode("latin-1").rstrip("\r\n")
    first, *rest = text.split("\r\n")
    headers = []
    for line in rest:
        name, _, value = line.partition(":")
        headers.append((name.strip(), value.strip()))
    return first, headers


def _parse_request(head: bytes) -> _Request:
    first, headers = _parse_headers(head)
    method, target, _ = first.split(" ", 2)
    return _Request(method=method, target=target, headers=headers)


PROXY_VARIABLES = ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "NO_PROXY", "no_proxy")


def only_proxy(monkeypatch: Any, variable: str, url: str) -> None:
    """An environment whose one proxy setting is ``variable`` (``HTTP_PROXY``, ``HTTPS_PROXY``)
    = ``url``: none of the machine's proxies or bypasses leak into the test."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(variable, url)
