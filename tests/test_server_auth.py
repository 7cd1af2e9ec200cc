"""The authenticator in-process, against a JWKS served on 127.0.0.1: the cases that do not need a
whole daemon (roles of one client, groups, algorithm confusion, an IdP that is down, key cache)."""

from __future__ import annotations

import base64
import time

import anyio
import jwt
import pytest

from moverd_daemon.auth import Authenticator, AuthError, token_roles
from moverd_daemon.settings import AuthSettings
from tests.support.daemon import JWKSServer
from tests.support.silent import SilentServer

pytestmark = pytest.mark.anyio


def authenticator(idp: JWKSServer, anonymous: bool = False, **extra: object) -> Authenticator:
    return Authenticator(AuthSettings(**idp.auth_settings(**extra)), anonymous=anonymous)


async def refused(auth: Authenticator, header: str | None) -> AuthError:
    with pytest.raises(AuthError) as info:
        await auth.authenticate(header)
    return info.value


async def test_roles_of_one_client_and_groups(jwks: JWKSServer) -> None:
    auth = authenticator(jwks, required_role="archiver", role_client="scicat", required_group="facility-ops")
    try:
        realm_only = jwks.mint()  # the role as a realm role: not enough when role_client is set
        assert (await refused(auth, f"Bearer {realm_only}")).status == 403
        good = jwks.mint(resource_access={"scicat": {"roles": ["archiver"]}})
        who = await auth.authenticate(f"Bearer {good}")
        assert who.method == "bearer" and who.name == "scicat-backend"
        other_group = jwks.mint(resource_access={"scicat": {"roles": ["archiver"]}}, groups=["/others"])
        err = await refused(auth, f"Bearer {other_group}")
        assert err.status == 403 and "group" in err.message
    finally:
        await auth.aclose()


async def test_algorithm_confusion_and_unsigned_tokens_are_refused(jwks: JWKSServer) -> None:
    auth = authenticator(jwks)
    try:
        now = int(time.time())
        claims = {"iss": jwks.issuer, "aud": "moverd-api", "exp": now + 60, "iat": now}
        public_pem = jwks.keys[0].jwk()["n"]  # an attacker signs with public material as an HMAC key
        hs = jwt.encode(claims, public_pem, algorithm="HS256", headers={"kid": jwks.keys[0].kid})
        assert (await refused(auth, f"Bearer {hs}")).status == 401
        header = base64.urlsafe_b64encode(b'{"alg":"none","typ":"JWT"}').rstrip(b"=").decode()
        body = base64.urlsafe_b64encode(jwt.api_jws.json.dumps(claims).encode()).rstrip(b"=").decode()
        assert (await refused(auth, f"Bearer {header}.{body}.")).status == 401
        assert (await refused(auth, "Basic dXNlcjpwYXNz")).status == 401  # Basic is not configured here
        assert (await refused(auth, None)).challenge.startswith("Bearer")  # type: ignore[union-attr]
    finally:
        await auth.aclose()


async def test_identity_provider_down_and_key_cache(jwks: JWKSServer) -> None:
    auth = authenticator(jwks, jwks_refresh_min_interval=0, jwks_cache_ttl=0.5)
    down = Authenticator(AuthSettings(idp_url="http://127.0.0.1:1", idp_realm="x", idp_audience="a",
                                      jwks_timeout=2), anonymous=False)
    try:
        err = await refused(down, f"Bearer {jwks.mint()}")
        assert err.status == 503 and "unavailable" in err.message and "127.0.0.1:1" in err.message
        token = jwks.mint()
        for _ in range(5):
            await auth.authenticate(f"Bearer {token}")
        assert jwks.requests == 1  # cached
        await anyio.sleep(0.6)
        await auth.authenticate(f"Bearer {token}")
        assert jwks.requests == 2  # the cache expired
    finally:
        await auth.aclose()
        await down.aclose()


async def test_anonymous_only_when_allowed(jwks: JWKSServer) -> None:
    open_auth = Authenticator(AuthSettings(), anonymous=True)
    assert (await open_auth.authenticate(None)).method == "anonymous"
    closed = Authenticator(AuthSettings(basic_username="u", basic_password="p"), anonymous=False)
    err = await refused(closed, None)
    assert err.status == 401 and err.challenge is not None and err.challenge.startswith("Basic")
    ok = base64.b64encode(b"u:p").decode()
    assert (await closed.authenticate(f"Basic {ok}")).name == "u"
    assert (await refused(closed, "Basic " + base64.b64encode(b"u:p:x").decode())).status == 401


def test_token_roles() -> None:
    claims = {"realm_access": {"roles": ["a"]}, "resource_access": {"c1": {"roles": ["b"]}, "c2": {"roles": ["c"]}}}
    assert token_roles(claims) == {"a", "b", "c"}
    assert token_roles(claims, "c1") == {"b"}
    assert token_roles({"realm_access": "garbage"}) == set()


def test_settings_refuse_half_configurations() -> None:
    with pytest.raises(ValueError, match="both basic_username and basic_password"):
        AuthSettings(basic_username="u")
    with pytest.raises(ValueError, match="idp_audience"):
        AuthSettings(idp_url="https://kc.example", idp_realm="r")
    with pytest.raises(ValueError, match="idp_realm"):
        AuthSettings(idp_url="https://kc.example", idp_audience="a")


async def test_a_silent_identity_provider_is_waited_for_within_the_bound(jwks: JWKSServer) -> None:
    """The keys' URL accepts connections and never answers: a token is refused within
    ``jwks_timeout``, saying whom it waited for, and the requests behind it do not queue up."""
    with SilentServer() as silent:
        auth = Authenticator(AuthSettings(jwks_url=f"{silent.url}/certs", issuer=jwks.issuer, idp_audience="a",
                                          jwks_timeout=1.5), anonymous=False)
        try:
            token = f"Bearer {jwks.mint()}"
            t0 = time.monotonic()
            err = await refused(auth, token)
            took = time.monotonic() - t0
            assert err.status == 503, err.message
            assert silent.url in err.message and "no complete answer within 1.5 s" in err.message, err.message
            assert 1.0 < took < 3.0, took
            assert silent.accepted >= 1  # it did connect: the wait was for the answer
            t0 = time.monotonic()
            async with anyio.create_task_group() as tg:  # ten at once: not ten waits in a row
                for _ in range(10):
                    tg.start_soon(refused, auth, token)
            assert time.monotonic() - t0 < 3.0
        finally:
            await auth.aclose()


async def test_a_slow_drip_identity_provider_is_cut_off_as_a_whole(jwks: JWKSServer) -> None:
    """An answer that trickles in, a byte at a time within every read timeout, still gets only
    ``jwks_timeout`` in all."""
    with SilentServer(drip=b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n"
                      + b" " * 1000) as drip:
        auth = Authenticator(AuthSettings(jwks_url=f"{drip.url}/certs", issuer=jwks.issuer, idp_audience="a",
                                          jwks_timeout=2), anonymous=False)
        try:
            t0 = time.monotonic()
            err = await refused(auth, f"Bearer {jwks.mint()}")
            assert time.monotonic() - t0 < 4.0
            assert err.status == 503 and "no complete answer within 2 s" in err.message, err.message
        finally:
            await auth.aclose()
