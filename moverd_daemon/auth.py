"""Who may call the job API: HTTP Basic against secret files, or Bearer JWTs of the identity provider.

Basic compares user name and password with :func:`hmac.compare_digest` (constant time, both always
compared). Bearer tokens are checked like Keycloak issues them: signature against the realm's JWKS,
issuer, audience, expiry (required), and optionally a role or a group. Signing keys are cached; a
token signed with an unknown ``kid`` triggers one refetch (the IdP rotated its keys), rate-limited
so that a stream of forged tokens cannot turn moverd into a load generator against the IdP.

Failures are :class:`AuthError` with the status (401: no or bad credentials, 403: valid but not
allowed, 503: the identity provider's keys cannot be had, so a token can be neither accepted nor
refused) and the ``WWW-Authenticate`` challenge the API sends back.

Waiting for the identity provider is bounded: a fetch of the keys gets ``jwks_timeout`` as a whole
(the connection at most :data:`CONNECT_TIMEOUT` of it), and a failed fetch is not tried again
for ``jwks_refresh_min_interval``, so that requests behind a silent identity provider are refused
at once instead of each waiting out its own timeout in turn.
"""

from __future__ import annotations

import hmac
import logging
import time
from base64 import b64decode
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx
import jwt

from .settings import AuthSettings

log = logging.getLogger(__name__)

REALM = "moverd"
CONNECT_TIMEOUT = 5.0
"""Longest wait for the identity provider's TCP (and TLS) connection, within ``jwks_timeout``."""


class AuthError(Exception):
    """Refused: ``status`` 401 or 403, ``challenge`` for the WWW-Authenticate header."""

    def __init__(self, status: int, message: str, challenge: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.challenge = challenge


@dataclass(frozen=True)
class Principal:
    """Who is calling: for logs and for the job's audit trail."""

    name: str
    method: str
    """``basic``, ``bearer`` or ``anonymous``."""
    claims: dict[str, Any] = field(default_factory=dict)


class JWKSCache:
    """The identity provider's signing keys by ``kid``, fetched lazily and refreshed on rotation."""

    def __init__(self, url: str, *, ttl: float, min_refresh_interval: float, timeout: float,
                 client: httpx.AsyncClient | None = None) -> None:
        self.url = url
        self.ttl = ttl
        self.min_refresh_interval = min_refresh_interval
        self.timeout = timeout
        self._client = client or httpx.AsyncClient(
            timeout=httpx.Timeout(timeout, connect=min(CONNECT_TIMEOUT, timeout)))
        self._own_client = client is None
        self._failure: str | None = None
        """Why the last fetch failed (``None`` after a success): the answer until the next try."""
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched = 0.0
        """monotonic time of the last fetch attempt (successful or not)."""
        self._loaded = 0.0
        self._lock = anyio.Lock()
        self.fetches = 0

    async def aclose(self) -> None:
        if self._own_client:
            await self._client.aclose()

    async def _fetch(self) -> None:
        self._fetched = time.monotonic()
        self.fetches += 1
        try:
            with anyio.fail_after(self.timeout):
                resp = await self._client.get(self.url)
                resp.raise_for_status()
                data = resp.json()
        except (httpx.HTTPError, ValueError, TimeoutError) as exc:
            self._failure = self._describe(exc)
            log.warning("cannot fetch the signing keys: %s", self._failure)
            if not self._keys:
                raise self._unavailable() from None
            return
        self._failure = None
        keys: dict[str, jwt.PyJWK] = {}
        for entry in data.get("keys", []) if isinstance(data, dict) else []:
            if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
                continue
            try:
                key = jwt.PyJWK(entry)
            except jwt.PyJWTError as exc:
                log.debug("skipping JWKS entry %s: %s", entry.get("kid"), exc)
                continue
            keys[str(entry.get("kid", ""))] = key
        self._keys = keys
        self._loaded = self._fetched
        log.info("loaded %d signing key(s) from %s", len(keys), self.url)

    def _describe(self, exc: BaseException) -> str:
        """What was awaited from whom: httpx's timeouts often carry no message at all."""
        t = f"{self.timeout:g} s"
        if isinstance(exc, httpx.ConnectTimeout):
            return f"{self.url}: no connection within {min(CONNECT_TIMEOUT, self.timeout):g} s"
        if isinstance(exc, (httpx.ReadTimeout, httpx.WriteTimeout, httpx.PoolTimeout, TimeoutError)):
            return f"{self.url}: no complete answer within {t} (jwks_timeout)"
        if isinstance(exc, httpx.HTTPStatusError):
            return f"{self.url}: answered {exc.response.status_code}"
        if isinstance(exc, ValueError):
            return f"{self.url}: the answer is not JSON"
        return f"{self.url}: {type(exc).__name__}: {exc}".rstrip(": ")

    def _unavailable(self) -> AuthError:
        return AuthError(503, f"the identity provider's signing keys are unavailable ({self._failure})",
                         bearer_challenge("temporarily_unavailable", "signing keys unavailable"))

    async def key(self, kid: str) -> jwt.PyJWK | None:
        async with self._lock:
            now = time.monotonic()
            stale = not self._loaded or now - self._loaded > self.ttl
            unknown = kid not in self._keys
            may_refetch = now - self._fetched >= self.min_refresh_interval or not self._fetched
            if (stale or unknown) and (may_refetch or (stale and self._failure is None)):
                await self._fetch()
            elif not self._keys and self._failure is not None:
                raise self._unavailable()  # failed moments ago: not waited for again yet
            return self._keys.get(kid)


def bearer_challenge(error: str | None = None, description: str | None = None) -> str:
    parts = [f'Bearer realm="{REALM}"']
    if error:
        parts.append(f'error="{error}"')
    if description:
        parts.append('error_description="{}"'.format(description.replace('"', "'")))
    return ", ".join(parts)


class Authenticator:
    """Checks the ``Authorization`` header of a request against the configured methods."""

    def __init__(self, settings: AuthSettings, *, anonymous: bool) -> None:
        self.settings = settings
        self.anonymous = anonymous
        self.jwks: JWKSCache | None = None
        url = settings.effective_jwks_url
        if settings.jwt_enabled and url:
            self.jwks = JWKSCache(url, ttl=settings.jwks_cache_ttl,
                                  min_refresh_interval=settings.jwks_refresh_min_interval,
                                  timeout=settings.jwks_timeout)

    async def aclose(self) -> None:
        if self.jwks is not None:
            await self.jwks.aclose()

    def challenge(self) -> str:
        """Every accepted scheme, for a 401 without credentials."""
        schemes = []
        if self.settings.jwt_enabled:
            schemes.append(bearer_challenge())
        if self.settings.basic_enabled:
            schemes.append(f'Basic realm="{REALM}", charset="UTF-8"')
        return ", ".join(schemes) or f'Basic realm="{REALM}"'

    async def authenticate(self, authorization: str | None) -> Principal:
        if not authorization:
            if self.anonymous:
                return Principal("anonymous", "anonymous")
            raise AuthError(401, "credentials are required", self.challenge())
        scheme, _, value = authorization.partition(" ")
        scheme = scheme.lower()
        value = value.strip()
        if scheme == "basic" and self.settings.basic_enabled:
            return self._basic(value)
        if scheme == "bearer" and self.settings.jwt_enabled:
            return await self._bearer(value)
        if self.anonymous and not (self.settings.basic_enabled or self.settings.jwt_enabled):
            return Principal("anonymous", "anonymous")
        raise AuthError(401, f"the {scheme or 'given'} authentication scheme is not accepted here", self.challenge())

    def _basic(self, value: str) -> Principal:
        s = self.settings
        assert s.basic_username is not None and s.basic_password is not None
        try:
            user, sep, password = b64decode(value, validate=True).decode("utf-8").partition(":")
        except (ValueError, UnicodeDecodeError):
            raise AuthError(401, "malformed Basic credentials", self.challenge()) from None
        # Both comparisons always run: the time taken says nothing about which part was wrong.
        ok_user = hmac.compare_digest(user.encode(), s.basic_username.get_secret_value().encode())
        ok_pass = hmac.compare_digest(password.encode(), s.basic_password.get_secret_value().encode())
        if not (sep and ok_user and ok_pass):
            raise AuthError(401, "wrong user name or password", self.challenge())
        return Principal(user, "basic")

    async def _bearer(self, token: str) -> Principal:
        s = self.settings
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise AuthError(401, "malformed token", bearer_challenge("invalid_token", "malformed token")) from None
        alg = header.get("alg")
        if alg not in s.algorithms:
            raise AuthError(401, f"token algorithm {alg!r} is not accepted",
                            bearer_challenge("invalid_token", "algorithm not accepted"))
        assert self.jwks is not None
        key = await self.jwks.key(str(header.get("kid", "")))
        if key is None:
            raise AuthError(401, "token signed with an unknown key",
                            bearer_challenge("invalid_token", "unknown signing key"))
        try:
            claims: dict[str, Any] = jwt.decode(
                token, key=key, algorithms=s.algorithms, audience=s.audiences or None,
                issuer=s.effective_issuer, leeway=s.leeway,
                options={"require": ["exp"] + (["iss"] if s.effective_issuer else []), "verify_aud": True},
            )
        except jwt.ExpiredSignatureError:
            raise AuthError(401, "token expired", bearer_challenge("invalid_token", "token expired")) from None
        except jwt.InvalidAudienceError:
            raise AuthError(401, "token is for another audience",
                            bearer_challenge("invalid_token", "wrong audience")) from None
        except jwt.InvalidIssuerError:
            raise AuthError(401, "token from another issuer",
                            bearer_challenge("invalid_token", "wrong issuer")) from None
        except jwt.PyJWTError as exc:
            raise AuthError(401, f"invalid token: {exc}", bearer_challenge("invalid_token", "invalid token")) from None
        self._authorize(claims)
        name = str(claims.get("preferred_username") or claims.get("sub") or "?")
        return Principal(name, "bearer", claims)

    def _authorize(self, claims: dict[str, Any]) -> None:
        s = self.settings
        if s.required_role and s.required_role not in token_roles(claims, s.role_client):
            raise AuthError(403, f"the token lacks the role {s.required_role!r}",
                            bearer_challenge("insufficient_scope", "missing role"))
        if s.required_group:
            groups = {str(g).strip("/") for g in claims.get("groups") or [] if isinstance(g, str)}
            if s.required_group.strip("/") not in groups:
                raise AuthError(403, f"the token lacks the group {s.required_group!r}",
                                bearer_challenge("insufficient_scope", "missing group"))


def token_roles(claims: dict[str, Any], client: str | None = None) -> set[str]:
    """Keycloak roles of a token: realm roles and client roles (only ``client``'s when given)."""
    roles: set[str] = set()

    def add(container: Any) -> None:
        if isinstance(container, dict) and isinstance(container.get("roles"), list):
            roles.update(str(r) for r in container["roles"])

    access = claims.get("resource_access")
    if client is not None:
        if isinstance(access, dict):
            add(access.get(client))
        return roles
    add(claims.get("realm_access"))
    if isinstance(access, dict):
        for entry in access.values():
            add(entry)
    return roles
