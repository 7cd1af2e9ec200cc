"""A TCP endpoint on 127.0.0.1 that accepts connections and never answers (or answers one byte at
a time): the remote end that makes an unbounded wait hang for ever.

    with SilentServer() as silent:          # accepts, reads, says nothing
        ... client(url=silent.url) ...
    with SilentServer(drip=b"HTTP/1.1 200 OK\r\n...") as slow:   # one byte every ``interval``
"""

from __future__ import annotations

import socket
import threading
from typing import Self


class SilentServer:
    def __init__(self, drip: bytes = b"", interval: float = 0.2) -> None:
        self.drip = drip
        self.interval = interval
        self.accepted = 0
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._sock.settimeout(0.2)
        self._stop = threading.Event()
        self._conns: list[socket.socket] = []
        self._thread = threading.Thread(target=self._serve, daemon=True, name="silent-server")
        self._thread.start()

    @property
    def port(self) -> int:
        return int(self._sock.getsockname()[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            self._conns.append(conn)
            if self.drip:
                threading.Thread(target=self._trickle, args=(conn,), daemon=True).start()

    def _trickle(self, conn: socket.socket) -> None:
        for i in range(len(self.drip)):
            if self._stop.wait(self.interval):
                return
            try:
                conn.sendall(self.drip[i:i + 1])
            except OSError:
                return

    def close(self) -> None:
        self._stop.set()
        self._sock.close()
        self._thread.join(2)
        for conn in self._conns:
            conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
