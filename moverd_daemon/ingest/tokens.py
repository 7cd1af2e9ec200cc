"""``POST /token``: a caller with a SciCat token gets the service account's tokens from the
identity provider, as the reference hands them to the facility's upload client.

A token with a ``kid`` is the identity provider's own and is checked like every Bearer token of
the API (:class:`~moverd_daemon.auth.Authenticator`); any other is SciCat's, checked by asking
SciCat who it is (``/users/my/identity``): its ``profile.accessGroups`` must name one of
``ingest.ingestor_groups``. The service tokens come from a password grant whose secrets are read
from files. Every wait is bounded (``ingest.http_timeout``), unlike the reference's.
"""

from __future__ import annotations

import logging
from typing import Any

import httpx
import jwt

from ..auth import Authenticator, AuthError, bearer_challenge
from ..settings import AuthSettings, IngestSettings
from .models import CreateServiceTokenResp
from .service import IngestError

log = logging.getLogger(__name__)


class TokenExchange:
    def __init__(self, settings: IngestSettings, auth_settings: AuthSettings, auth: Authenticator) -> None:
        self.settings, self.auth = settings, auth
        issuer = auth_settings.effective_issuer
        self.token_url = settings.token_url or (f"{issuer}/protocol/openid-connect/token" if issuer else None)
        self._http = httpx.AsyncClient(timeout=settings.http_timeout)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def exchange(self, authorization: str | None) -> CreateServiceTokenResp:
        token = _bearer(authorization)
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            header = {}
        if header.get("kid"):
            await self.auth.authenticate(f"Bearer {token}")
        else:
            await self._check_scicat(token)
        return await self._service_tokens()

    async def _check_scicat(self, token: str) -> None:
        s = self.settings
        if not s.scicat_url or not s.ingestor_groups:
            raise AuthError(401, "SciCat tokens are not accepted here (ingest.scicat_url, ingest.ingestor_groups)",
                            bearer_challenge("invalid_token"))
        url = f"{s.scicat_url}/users/my/identity"
        try:
            resp = await self._http.get(url, headers={"Authorization": f"Bearer {token}"})
        except httpx.HTTPError as exc:
            raise AuthError(503, f"SciCat at {url} cannot check the token: {type(exc).__name__}: {exc}") from None
        if not resp.is_success:
            raise AuthError(401, f"SciCat refused the token ({resp.status_code})", bearer_challenge("invalid_token"))
        groups = _access_groups(resp)
        if not groups & set(s.ingestor_groups):
            raise AuthError(401, "the caller is in none of the ingestor groups", bearer_challenge("invalid_token"))

    async def _service_tokens(self) -> CreateServiceTokenResp:
        s = self.settings
        what = "Failed to create service token"
        if not (self.token_url and s.client_id and s.username and s.password):
            raise IngestError(500, what, "ingest.client_id, username and password (or their *_file) are not set")
        form = {"grant_type": "password", "client_id": s.client_id, "username": s.username,
                "password": s.password.get_secret_value()}
        if s.client_secret is not None:
            form["client_secret"] = s.client_secret.get_secret_value()
        try:
            resp = await self._http.post(self.token_url, data=form)
        except httpx.HTTPError as exc:
            raise IngestError(500, what, f"{self.token_url}: {type(exc).__name__}: {exc}") from None
        if resp.status_code != 200:
            raise IngestError(500, what, f"{self.token_url} answered {resp.status_code}: {resp.text[:200]}")
        try:
            answer = CreateServiceTokenResp.model_validate(resp.json())
        except ValueError as exc:
            raise IngestError(500, what, f"{self.token_url}: not a token answer: {exc}") from None
        if answer.expires_in is None:  # the facility's client dereferences it
            raise IngestError(500, what, f"{self.token_url}: the answer has no expires_in")
        return answer


def _bearer(authorization: str | None) -> str:
    scheme, _, value = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise AuthError(401, "a SciCat token is required (Authorization: Bearer ...)", bearer_challenge())
    return value.strip()


def _access_groups(resp: httpx.Response) -> set[str]:
    try:
        doc: Any = resp.json()
    except ValueError:
        return set()
    profile = doc.get("profile") if isinstance(doc, dict) else None
    groups = profile.get("accessGroups") if isinstance(profile, dict) else None
    return {g for g in groups or [] if isinstance(g, str)}
