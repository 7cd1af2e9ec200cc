"""HTTP to SciCat: bearer token, one re-login on 401/403, retries with backoff on 502/503/504,
timeouts and connection errors. A call that still fails raises :class:`moverd.CatalogError`
naming the method, the path and the answer; any other answer is returned for the caller to map.

Every wait is bounded: ``connect_timeout`` to connect, ``timeout`` for each wait for bytes, and
``request_timeout`` for the whole call with its retries, so that a server that accepts
connections and never answers fails a job within minutes rather than hanging it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import httpx

from moverd import CatalogError, retry_async

from .auth import TokenCache
from .options import SciCatOptions

log = logging.getLogger("moverd_catalog_scicat")

RETRY_STATUSES = frozenset({502, 503, 504})
AUTH_STATUSES = frozenset({401, 403})


class _RetryableAnswerError(Exception):
    def __init__(self, what: str, response: httpx.Response) -> None:
        super().__init__(f"{what}: {response.status_code} {message_of(response)}")
        self.response = response


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, _RetryableAnswerError):
        return True
    return isinstance(exc, (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError))


def message_of(response: httpx.Response) -> str:
    """The backend's error message (Nest ``message`` may be a list), or the start of the body."""
    try:
        data = response.json()
    except ValueError:
        text = " ".join(response.text.split())
        return text[:200] if text else response.reason_phrase
    if isinstance(data, dict) and "message" in data:
        msg = data["message"]
        return "; ".join(str(m) for m in msg) if isinstance(msg, list) else str(msg)
    return str(data)[:200]


def route_missing(response: httpx.Response) -> bool:
    """A 404 of the router itself (``Cannot GET /api/v5/...``), not of a missing document."""
    return response.status_code == 404 and message_of(response).startswith("Cannot ")


def error_for(response: httpx.Response, what: str) -> CatalogError:
    hint = ""
    if route_missing(response):
        hint = " (SciCat has no such route: check url and the *_prefix options)"
    elif response.status_code in AUTH_STATUSES:
        hint = " (the SciCat account lacks a permission this call needs; see docs/catalog-scicat.md)"
    return CatalogError(f"SciCat {what} failed: {response.status_code} {message_of(response)}{hint}")


class SciCatHTTP:
    def __init__(self, opts: SciCatOptions) -> None:
        self.opts = opts
        self._client: httpx.AsyncClient | None = None
        self.tokens = TokenCache(self._login, opts.token_refresh_margin)

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                base_url=self.opts.url,
                timeout=httpx.Timeout(self.opts.timeout, connect=self.opts.connect_timeout),
                verify=self.opts.verify_tls,
                headers={"Accept": "application/json", "User-Agent": "moverd-catalog-scicat"},
                follow_redirects=False,
            )
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def _once(
        self, method: str, path: str, what: str, *, json: Any = None, params: Any = None,
        token: str | None = None,
    ) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else None
        response = await self.client.request(method, path, json=json, params=params, headers=headers)
        if response.status_code in RETRY_STATUSES:
            raise _RetryableAnswerError(what, response)
        return response

    def _no_answer(self, what: str, seconds: float, tries: int, why: str) -> CatalogError:
        notes = ", ".join([*([f"{tries} attempts"] if tries > 1 else []), *([why] if why else [])])
        return CatalogError(
            f"SciCat {self.opts.url}: no answer to {what} within {seconds:g} s{f' ({notes})' if notes else ''}"
        )

    async def _retrying(self, what: str, op: Callable[[], Awaitable[httpx.Response]]) -> httpx.Response:
        tries = 0
        deadline = time.monotonic() + self.opts.request_timeout

        async def counted() -> httpx.Response:
            nonlocal tries
            tries += 1
            return await op()

        def after() -> str:
            return f"after {tries} attempts" if tries > 1 else "after 1 attempt"

        def retryable(exc: BaseException) -> bool:
            return _retryable(exc) and time.monotonic() < deadline

        try:
            with anyio.fail_after(max(0.0, deadline - time.monotonic())):
                return await retry_async(
                    counted, retryable=retryable, attempts=self.opts.max_attempts,
                    base_delay=self.opts.retry_delay, max_delay=self.opts.retry_max_delay, what=f"SciCat {what}",
                )
        except TimeoutError:
            raise self._no_answer(what, self.opts.request_timeout, tries, "request_timeout") from None
        except httpx.ConnectTimeout:
            raise CatalogError(
                f"SciCat {self.opts.url}: no connection for {what} within {self.opts.connect_timeout:g} s"
                f"{f' ({tries} attempts)' if tries > 1 else ''}"
            ) from None
        except httpx.TimeoutException:
            raise self._no_answer(what, self.opts.timeout, tries, "") from None
        except _RetryableAnswerError as exc:
            raise CatalogError(
                f"SciCat {what} failed {after()}: {exc.response.status_code} {message_of(exc.response)}"
            ) from None
        except httpx.HTTPError as exc:
            raise CatalogError(
                f"SciCat {what} failed {after()}: {type(exc).__name__}: {exc or 'no detail'}"
            ) from None

    async def _login(self) -> tuple[str, float]:
        path = f"{self.opts.auth_prefix}/auth/login"
        what = f"POST {path}"
        body = {"username": self.opts.username, "password": self.opts.password.get_secret_value()}
        response = await self._retrying(what, lambda: self._once("POST", path, what, json=body))
        if response.status_code == 401:
            raise CatalogError(
                f"SciCat login as {self.opts.username!r} was refused (401 {message_of(response)}): "
                "check the username and password"
            )
        if response.status_code not in (200, 201):
            raise error_for(response, what)
        try:
            data = response.json()
            token = data["access_token"]
            expires_in = float(data.get("expires_in") or data.get("ttl") or 3600)
        except (ValueError, KeyError, TypeError):
            raise CatalogError(f"SciCat {what}: unexpected answer without access_token") from None
        if not isinstance(token, str) or not token:
            raise CatalogError(f"SciCat {what}: unexpected answer without access_token")
        log.debug("logged in to SciCat as %s (token valid %.0fs)", self.opts.username, expires_in)
        return token, expires_in

    async def login(self) -> None:
        """Log in now (readiness check)."""
        await self.tokens.get(refresh=True)

    async def request(
        self, method: str, path: str, *, json: Any = None, params: Any = None
    ) -> httpx.Response:
        """One logical call: retried on transient failures, re-authenticated once on 401/403."""
        what = f"{method} {path}"
        relogged = False

        async def attempt() -> httpx.Response:
            nonlocal relogged
            token = await self.tokens.get()
            response = await self._once(method, path, what, json=json, params=params, token=token)
            if response.status_code in AUTH_STATUSES and not relogged:
                relogged = True
                log.info("SciCat refused %s with %d; logging in again", what, response.status_code)
                token = await self.tokens.get(stale=token)
                response = await self._once(method, path, what, json=json, params=params, token=token)
            return response

        return await self._retrying(what, attempt)
