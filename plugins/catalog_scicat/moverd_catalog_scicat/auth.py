"""The archiver's SciCat token: one login, reused until shortly before it expires.

SciCat answers a missing, invalid or expired token with 403 (the guard treats the caller as
anonymous), so the HTTP layer also asks for a fresh token when a call is refused; concurrent
callers that saw the same stale token share one login.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import anyio

Login = Callable[[], Awaitable[tuple[str, float]]]
"""Logs in; returns ``(access_token, expires_in seconds)``."""


def usable_lifetime(expires_in: float, margin: float) -> float:
    """How long to use a token: ``expires_in - margin``, but at least half its lifetime
    (short test TTLs, or a margin configured larger than the backend's JWT_EXPIRES_IN)."""
    if expires_in <= 0:
        return 0.0
    return expires_in - margin if expires_in - margin >= expires_in / 2 else expires_in / 2


class TokenCache:
    def __init__(self, login: Login, margin: float) -> None:
        self._login = login
        self._margin = margin
        self._token: str | None = None
        self._valid_until = 0.0
        self._lock = anyio.Lock()

    async def get(self, *, refresh: bool = False, stale: str | None = None) -> str:
        """A usable token. ``refresh`` forces a login; ``stale`` is a token the server refused:
        log in again unless someone already replaced it."""
        async with self._lock:
            current = self._token
            if current is not None and not refresh:
                if stale is not None and stale != current:
                    return current
                if stale is None and time.monotonic() < self._valid_until:
                    return current
            token, expires_in = await self._login()
            self._token = token
            self._valid_until = time.monotonic() + usable_lifetime(expires_in, self._margin)
            return token

    def forget(self) -> None:
        self._token = None
        self._valid_until = 0.0
