"""The ``[server]`` and ``[scheduler]`` sections of the configuration: what ``moverd serve`` reads.

They live here, next to the daemon: :class:`DaemonSettings` is the engine's ``Settings`` with
these two sections, and refuses unknown keys anywhere. The command line loads the configuration
as :class:`DaemonSettings` too, so that ``config check`` and every command see one file the same
way. Defaults
are for one machine (the embedded default): the API on loopback without credentials, a local
Prefect server with its UI, housekeeping on. A production host sets ``host``, credentials
(``auth.basic_*_file`` or the identity provider) and, for several hosts, ``PREFECT_API_URL``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

from moverd_flows.settings import FlowSettings
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from moverd.config import Settings
from moverd.options import Options
from moverd.units import ByteSize, Duration

if TYPE_CHECKING:
    from moverd.app import App

PositiveDuration = Annotated[Duration, Field(gt=0)]
LOOPBACK = ("127.0.0.1", "::1", "localhost")
JobTypeName = Literal["archive", "retrieve"]
JOB_TYPES: tuple[JobTypeName, ...] = ("archive", "retrieve")


def http_url(v: str | None) -> str | None:
    """An ``http(s)://`` base URL without its trailing slash; empty is unset."""
    if not v:
        return None
    if not v.startswith(("http://", "https://")):
        raise ValueError(f"must start with http:// or https://, not {v!r}")
    return v.rstrip("/")


class AuthSettings(Options):
    """Who may call the job API: HTTP Basic, Bearer JWTs of the identity provider, or both.

    The reference used Basic; SciCat's URL action can send either. Secrets can be given as
    ``*_file`` keys (the deployment keeps them in files): ``basic_password_file = "/run/secrets/x"``.
    """

    basic_username: SecretStr | None = None
    """HTTP Basic user name (also ``basic_username_file``)."""
    basic_password: SecretStr | None = None
    """HTTP Basic password (also ``basic_password_file``); compared in constant time."""
    idp_url: str | None = None
    """Keycloak base URL, e.g. ``https://kc.psi.ch`` (the seed's IDP_URL). Enables Bearer JWTs."""
    idp_realm: str | None = None
    """Keycloak realm (IDP_REALM): the issuer is ``{idp_url}/realms/{idp_realm}``."""
    idp_audience: list[str] | str = Field(default_factory=list)
    """Accepted ``aud`` values (IDP_AUDIENCE, e.g. ``["account"]``, or one as a string); a token
    must name one of them."""
    issuer: str | None = None
    """Expected ``iss``; default ``{idp_url}/realms/{idp_realm}``."""
    jwks_url: str | None = None
    """Where the signing keys are; default ``{issuer}/protocol/openid-connect/certs``."""
    algorithms: list[str] = Field(default_factory=lambda: ["RS256"])
    """Accepted signature algorithms (asymmetric only: the keys come from the JWKS)."""
    required_role: str | None = None
    """A role the token must carry: in ``realm_access.roles`` or in ``resource_access.*.roles``."""
    role_client: str | None = None
    """Only look for ``required_role`` in ``resource_access.<role_client>.roles``."""
    required_group: str | None = None
    """A group the token's ``groups`` claim must contain (``/ops`` and ``ops`` are the same)."""
    leeway: Duration = 30.0
    """Clock skew tolerated on ``exp``/``nbf``/``iat``."""
    jwks_cache_ttl: PositiveDuration = 600.0
    """How long fetched keys are trusted before they are fetched again."""
    jwks_refresh_min_interval: Duration = 30.0
    """A token with an unknown ``kid`` refetches the keys (key rotation), at most this often, so
    that forged tokens cannot make moverd hammer the identity provider."""
    jwks_timeout: PositiveDuration = 10.0
    """Bound of one JWKS request as a whole (connecting, sending, the answer's last byte); the
    connection alone gets at most 5 s of it. A request with a token never waits longer for the
    keys: a silent identity provider answers 503, it does not hang the API."""
    anonymous: bool | None = None
    """Accept requests without credentials. Default (unset): only when nothing else is configured
    and the API listens on loopback; a daemon reachable from the network refuses to start without
    credentials unless this is ``true``."""

    @field_validator("idp_url", "issuer", "jwks_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        return http_url(v)

    @field_validator("idp_audience")
    @classmethod
    def _audience(cls, v: list[str] | str) -> list[str]:
        # IDP_AUDIENCE is one value in the seed; a string is a list of one.
        return [v] if isinstance(v, str) else v

    @property
    def audiences(self) -> list[str]:
        return [self.idp_audience] if isinstance(self.idp_audience, str) else list(self.idp_audience)

    @field_validator("algorithms")
    @classmethod
    def _algorithms(cls, v: list[str]) -> list[str]:
        allowed = {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
        bad = [a for a in v if a not in allowed]
        if bad or not v:
            raise ValueError(f"unsupported: {bad or v}; use some of {sorted(allowed)}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> AuthSettings:
        if (self.basic_username is None) != (self.basic_password is None):
            raise ValueError("give both basic_username and basic_password (or their *_file), or neither")
        if self.idp_url and not (self.idp_realm or self.issuer):
            raise ValueError("idp_url needs idp_realm (or an explicit issuer)")
        if self.jwt_enabled and not self.idp_audience:
            raise ValueError("Bearer tokens need idp_audience: a token for another client must not be accepted")
        return self

    @property
    def basic_enabled(self) -> bool:
        return self.basic_username is not None

    @property
    def jwt_enabled(self) -> bool:
        return bool(self.idp_url or self.issuer or self.jwks_url)

    @property
    def effective_issuer(self) -> str | None:
        if self.issuer:
            return self.issuer
        if self.idp_url and self.idp_realm:
            return f"{self.idp_url}/realms/{self.idp_realm}"
        return None

    @property
    def effective_jwks_url(self) -> str | None:
        if self.jwks_url:
            return self.jwks_url
        issuer = self.effective_issuer
        return f"{issuer}/protocol/openid-connect/certs" if issuer else None


class ServerSettings(BaseModel):
    """The HTTP API and job execution of ``moverd serve``."""

    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    """Address the API listens on (``0.0.0.0`` in a container)."""
    port: int = Field(8080, ge=0, le=65535)
    """API port; 0 takes a free one (printed at start)."""
    root_path: str = "/archiver/api/v1"
    """Prefix of every route (the seed's API_ROOT_PATH)."""
    name: str | None = None
    """This daemon's name in Prefect (flow-run labels, worker name); default ``<hostname>:<port>``."""
    job_types: list[JobTypeName] = Field(default_factory=lambda: list(JOB_TYPES), min_length=1)
    """Job types this daemon runs. With a shared Prefect server, a daemon polls only the work pools
    of these types (the seed's separate archival and retrieval workers); ``POST /jobs`` of another
    type still creates the deployment run, for a daemon that runs that type."""
    max_jobs: int = Field(2, ge=1, le=256)
    """Jobs this daemon runs at once; more wait in the queue (LTS slots bound the bytes anyway)."""
    shutdown_grace: Duration = 300.0
    """On SIGTERM: how long running jobs may go on before they are aborted (no partial datablock is
    left; an aborted job resumes at the next start). Keep systemd's TimeoutStopSec above it."""
    poll_interval: PositiveDuration = 2.0
    """With a Prefect server: how often the work pools are polled for deployment runs."""
    takeover_after: Duration = Field(90.0, ge=10.0)
    """With a Prefect server: a running job whose daemon sent no heartbeat for this long is marked
    Orphaned and another daemon of the pool takes it over (at least 10 s, Prefect's shortest
    window). ``moverd prefect setup`` writes it into the server's ``moverd-takeover`` automation,
    whose window the daemons then follow; with global limits keep it above ``prefect.slot_lease``,
    so that a daemon cut off from Prefect has stopped writing before its job moves."""
    metrics_auth: bool = False
    """Put ``/metrics`` behind the same authentication as the job API."""
    docs: bool = True
    """Serve the OpenAPI document and its browsable docs (behind authentication)."""
    access_log: bool = False
    """Log every HTTP request."""
    max_body_size: ByteSize = Field(64 * 1024, ge=1024)
    """Largest request body (the job API takes small JSON documents); a bigger one is answered
    413 without being read, and a body declared bigger by ``Content-Length`` before any of it."""
    max_header_size: ByteSize = Field(32 * 1024, ge=4096)
    """Largest request line plus headers (a Keycloak token with many groups takes a few KiB); more
    is answered 431 without being buffered."""
    prefect_request_timeout: PositiveDuration = 30.0
    """Connect, read, write and pool timeout of each request of the daemon's Prefect client (it is
    ``PREFECT_API_REQUEST_TIMEOUT`` when that is not set in the environment; Prefect's default is
    60 s). Prefect retries a timed-out request up to ``PREFECT_CLIENT_MAX_RETRIES`` times; the
    daemon's own check of Prefect at start and readiness are bounded as a whole."""
    readiness_timeout: PositiveDuration = 5.0
    """Per-check timeout of ``/health/readyz`` (catalog, each storage, Prefect)."""
    prefect_ui: bool = True
    """Without ``PREFECT_API_URL``: start a local Prefect server with its UI for this daemon
    (database under ``<state_dir>/prefect``); false uses Prefect's ephemeral mode (no UI)."""
    prefect_host: str = "127.0.0.1"
    """Where the local Prefect server listens."""
    prefect_port: int = Field(4200, ge=0, le=65535)
    """Its port; when taken, a free one is used instead (0: always a free one)."""
    prefect_start_timeout: PositiveDuration = 180.0
    """How long the local Prefect server may take to start (its first start creates the database);
    with ``prefect_ui = false``, Prefect's ephemeral server (unless
    ``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS`` is set)."""
    journal: Path | None = None
    """SQLite file of the jobs this daemon took, to resume them after a crash or a restart;
    default ``<state_dir>/daemon.sqlite``."""
    auth: AuthSettings = Field(default_factory=AuthSettings)

    @model_validator(mode="before")
    @classmethod
    def _moved(cls, data: object) -> object:
        if isinstance(data, dict) and "plugins" in data:
            raise ValueError("plugins is a top-level setting now (plugins = [...] before any section), "
                             "so that every command and flow run loads them too")
        return data

    @field_validator("root_path")
    @classmethod
    def _root(cls, v: str) -> str:
        v = "/" + v.strip().strip("/")
        if v != "/" and not re.fullmatch(r"(/[A-Za-z0-9._~-]+)+", v):
            raise ValueError(f"not a URL path: {v!r}")
        return "" if v == "/" else v

    @property
    def loopback(self) -> bool:
        return self.host in LOOPBACK

    @model_validator(mode="after")
    def _auth_needed(self) -> ServerSettings:
        a = self.auth
        if a.anonymous is None and not self.loopback and not (a.basic_enabled or a.jwt_enabled):
            raise ValueError(
                f"the API listens on {self.host!r}, beyond this machine, but no credentials are configured: "
                "set server.auth.basic_username/basic_password (or their *_file), server.auth.idp_url, "
                "or server.auth.anonymous = true"
            )
        return self

    def anonymous_allowed(self) -> bool:
        a = self.auth
        if a.anonymous is not None:
            return a.anonymous
        return self.loopback and not (a.basic_enabled or a.jwt_enabled)


class SchedulerSettings(BaseModel):
    """Housekeeping the daemon runs on a timer (APScheduler). An interval of 0 turns a task off."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    """Run the housekeeping at all."""
    poll_catalog_interval: Duration = 0.0
    """Look for submitted jobs nobody triggered this often (0: off; SciCat triggers jobs itself).
    Needs a catalog that can list jobs (the local catalog can)."""
    retrieval_cleanup_interval: Duration = 3600.0
    """Delete objects of the retrieval storage whose download links expired, this often."""
    retrieval_cleanup_margin: Duration = 3600.0
    """Keep objects this long after their links expired (clock skew, a download in progress)."""
    stale_temp_interval: Duration = 3600.0
    """Remove temporary files that crashed writers left on the LTS, this often."""
    stale_temp_age: PositiveDuration = 6 * 3600.0
    """A temporary file untouched this long is stale (live writers touch theirs all the time)."""
    journal_retention: Duration = 90 * 86400.0
    """Forget ended jobs this long after they ended (checked daily; 0: keep them for ever). Never
    less than the download links' lifetime plus ``retrieval_cleanup_margin``: the retrieval
    cleanup reads the journal."""
    free_space_interval: Duration = 60.0
    """Publish the free space of the storages (the ``moverd_storage_free_bytes`` metric), and the
    landing quota of the upload API (``moverd_landing_bytes``), this often."""
    pickup_interrupted: bool = True
    """At start, resume the jobs a crash or a restart interrupted (from the journal)."""


class IngestSettings(Options):
    """The upload API (``/s3/*`` and ``/token``): clients write into the landing storage through
    presigned URLs, within a quota. Off unless ``enabled``; the landing storage must be one that
    clients can write to directly (``s3``). Secrets can be given as ``*_file`` keys."""

    enabled: bool = False
    """Serve the upload routes."""
    landing_space: ByteSize | None = None
    """Size of the landing zone, e.g. ``"100TB"``; uploads are granted while what is stored plus
    what is reserved stays within it. None: the landing storage's own free space, when it can
    tell, else no limit."""
    reservation_ttl: PositiveDuration = 7 * 86400.0
    """A reservation that is neither finalized nor aborted is dropped this long after it was made
    (the client gave up); its objects stay until an abort or an operator removes them."""
    url_expiry: Annotated[Duration, Field(gt=0, le=7 * 86400)] = 3600.0
    """How long presigned upload URLs stay valid (the reference's URL_EXPIRATION_SECONDS); at
    most 7 days, SigV4's limit."""
    storage_class: str | None = None
    """Storage class signed into single-PUT URLs and set on multipart uploads (the reference
    used ``GLACIER``). None (the default) sets none: the archive reads the landing zone without
    restoring objects first, and an object of an archive class cannot be read before a restore
    (S3 answers InvalidObjectState). The facility's client sends ``x-amz-storage-class: GLACIER``
    anyway; the URLs do not sign it, so where S3 honours the unsigned header its single-PUT
    objects still land in that class (see docs/ingest.md)."""
    min_part_size: ByteSize = 5 * 1024**2
    """Parts below this (except the last) are refused at complete: S3's own minimum."""
    submit_jobs: bool = True
    """Run the archive job that finalize creates at once, in this daemon (as SciCat's call of
    ``/jobs`` would; a later call for the same job finds it running)."""
    check_groups: bool = True
    """A Bearer token may upload a dataset only when its ``groups`` claim names the dataset's
    owner group or one of its access groups. Tokens of the service account (``username``, whose
    tokens ``POST /token`` hands to every ingestor) are not group-checked: the exchange checked
    the SciCat user's ingestor groups instead."""
    scicat_url: str | None = None
    """``POST /token``: SciCat's API base (with its prefix, e.g. ``https://scicat/api/v3``), where
    ``/users/my/identity`` checks the caller's SciCat token."""
    ingestor_groups: list[str] = Field(default_factory=list)
    """``POST /token``: the caller's SciCat ``accessGroups`` must name one of these (the
    reference's SCICAT_INGESTOR_GROUPS)."""
    token_url: str | None = None
    """``POST /token``: the identity provider's token endpoint for the password grant; default
    ``{issuer}/protocol/openid-connect/token`` of ``server.auth``."""
    client_id: str | None = None
    """The service account's client (IDP_CLIENT_ID)."""
    client_secret: SecretStr | None = None
    """Its secret (``client_secret_file``)."""
    username: str | None = None
    """The service account (IDP_USERNAME)."""
    password: SecretStr | None = None
    """Its password (``password_file``)."""
    http_timeout: PositiveDuration = 10.0
    """Bound of each request to SciCat and to the identity provider."""

    @field_validator("scicat_url", "token_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        return http_url(v)


class DaemonSettings(FlowSettings):
    """The whole configuration file: the engine's sections, the Prefect layer's ``[prefect]``,
    and the daemon's ``[server]``, ``[scheduler]`` and ``[ingest]``."""

    model_config = SettingsConfigDict(**{**Settings.model_config, "extra": "forbid"})  # type: ignore[typeddict-item]

    server: ServerSettings = Field(default_factory=ServerSettings)
    """``moverd serve``: the job API and job execution."""
    scheduler: SchedulerSettings = Field(default_factory=SchedulerSettings)
    """``moverd serve``: housekeeping on a timer."""
    ingest: IngestSettings = Field(default_factory=IngestSettings)
    """``moverd serve``: the upload API into the landing zone."""


def daemon_settings(app: App) -> DaemonSettings:
    """The daemon's view of ``app``'s settings (the daemon builds its App from DaemonSettings)."""
    settings = app.settings
    if not isinstance(settings, DaemonSettings):
        raise TypeError("the daemon's App must be built from DaemonSettings (moverd_daemon.settings)")
    return settings
