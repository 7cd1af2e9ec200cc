"""The systemd notify protocol (``Type=notify``), in plain socket code.

systemd passes ``NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract namespace) and, with
``WatchdogSec=``, ``WATCHDOG_USEC``/``WATCHDOG_PID``. The daemon says ``READY=1`` once the API
answers and jobs can run, updates ``STATUS=`` as it goes, pings ``WATCHDOG=1`` from its event loop
(so a stuck loop gets the service restarted), and says ``STOPPING=1`` on SIGTERM, extending the
stop timeout while running jobs drain. Without ``NOTIFY_SOCKET`` every call is a no-op.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        addr = env.get("NOTIFY_SOCKET") or None
        if addr and addr.startswith("@"):
            addr = "\0" + addr[1:]
        self.address = addr
        self.watchdog_usec = 0
        usec = env.get("WATCHDOG_USEC")
        pid = env.get("WATCHDOG_PID")
        if usec and usec.isdigit() and (not pid or pid == str(os.getpid())):
            self.watchdog_usec = int(usec)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between pings: half the watchdog timeout, as sd_notify(3) recommends."""
        return self.watchdog_usec / 2e6 if self.watchdog_usec else None

    def send(self, *lines: str) -> bool:
        if self.address is None:
            return False
        message = "\n".join(lines).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(self.address)
                sock.sendall(message)
            return True
        except OSError as exc:
            log.warning("systemd notify to %r failed: %s", self.address, exc)
            return False

    def ready(self, status: str) -> bool:
        return self.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def status(self, status: str) -> bool:
        return self.send(f"STATUS={status}")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def stopping(self, status: str, extend_seconds: float | None = None) -> bool:
        lines = ["STOPPING=1", f"STATUS={status}"]
        if extend_seconds:
            lines.append(f"EXTEND_TIMEOUT_USEC={int(extend_seconds * 1e6)}")
        return self.send(*lines)
