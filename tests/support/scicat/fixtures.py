"""pytest fixtures for the fake SciCat server.

One server runs per test session (started on first use, stopped at exit); the function-scoped
``scicat`` fixture resets its state so every test starts from the default accounts and no data.
Add ``"tests.support.scicat.fixtures"`` to the root conftest's ``pytest_plugins``, or import
``scicat`` into a test module.
"""

from __future__ import annotations

import atexit
import threading
from collections.abc import Iterator

import pytest

from .server import SciCatServer

_server: SciCatServer | None = None
_lock = threading.Lock()


def session_server() -> SciCatServer:
    """The session's server, started on first use."""
    global _server
    with _lock:
        if _server is None:
            _server = SciCatServer().start()
            atexit.register(_server.stop)
        return _server


@pytest.fixture
def scicat() -> Iterator[SciCatServer]:
    """A SciCat-compatible server with fresh state (default accounts, no data, no faults)."""
    server = session_server()
    server.reset()
    yield server
    server.reset()
