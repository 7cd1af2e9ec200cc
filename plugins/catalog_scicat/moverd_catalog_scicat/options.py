"""Options of the SciCat catalog (the ``[catalog]`` table with ``type = "scicat"``)."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator

from moverd import Duration, Options, PositiveDuration, read_secret_file


def _prefix(value: str) -> str:
    value = value.strip()
    if not value.startswith("/"):
        value = "/" + value
    return value.rstrip("/")


class SciCatOptions(Options):
    url: str
    """Base URL of the SciCat backend, e.g. ``https://dacat.psi.ch`` (no ``/api``)."""
    api_prefix: str = "/api/v3"
    """Prefix of the dataset and origdatablock routes (``/api/v3`` or ``/api/v4``)."""
    auth_prefix: str = "/api/v3"
    """Prefix of ``auth/login`` (the backend has it only under v3)."""
    datablocks_prefix: str = "/api/v3"
    """Prefix of the datablock routes (v3 only in the backend)."""
    job_api: Literal["v3", "v4"] = "v3"
    """How job status is written: v3 ``jobStatusMessage``; v4 ``statusCode`` + ``statusMessage``."""
    jobs_prefix: str | None = None
    """Prefix of the job routes; default ``/api/v3`` or ``/api/v4`` after ``job_api``."""
    username: str
    """The archiver's SciCat account (also as ``username_file``)."""
    password: SecretStr
    """Its password (also as ``password_file``)."""
    timeout: PositiveDuration = 30.0
    """Longest wait for the next bytes of an answer, or to send the next bytes of a request."""
    connect_timeout: PositiveDuration = 10.0
    """Longest wait for a connection to ``url``."""
    request_timeout: PositiveDuration = 120.0
    """Longest one call may take, its retries and a re-login included: ``max_attempts`` waits of
    ``timeout`` on a silent server would otherwise add up to several minutes."""
    max_attempts: int = Field(default=6, ge=1)
    """Attempts per call for 502/503/504, timeouts and connection errors."""
    retry_delay: Duration = 0.5
    """First backoff delay; it doubles per attempt (with jitter) up to ``retry_max_delay``."""
    retry_max_delay: Duration = 30.0
    token_refresh_margin: Duration = 60.0
    """Log in again this long before the token expires."""
    storage_location: str | None = None
    """Written to the lifecycle's ``storageLocation`` when a dataset reaches the archive."""
    verify_tls: bool = True

    @model_validator(mode="before")
    @classmethod
    def _username_file(cls, data: Any) -> Any:
        # Not a secret, but the deployment keeps it in a file too (SCICAT_USER_FILE).
        if isinstance(data, dict) and "username_file" in data:
            data = dict(data)
            path = data.pop("username_file")
            if path not in (None, ""):
                if data.get("username") not in (None, ""):
                    raise ValueError("give either username or username_file, not both")
                data["username"] = read_secret_file(path, "username_file").get_secret_value()
        return data

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        value = value.strip().rstrip("/")
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"url must start with http:// or https://, not {value!r}")
        if re.search(r"/api(/v\d+)?$", value, re.IGNORECASE):
            raise ValueError(f"url is the server's base URL without /api (prefixes are separate): {value!r}")
        return value

    @field_validator("api_prefix", "auth_prefix", "datablocks_prefix")
    @classmethod
    def _prefixes(cls, value: str) -> str:
        return _prefix(value)

    @field_validator("jobs_prefix")
    @classmethod
    def _jobs_prefix(cls, value: str | None) -> str | None:
        return None if value is None else _prefix(value)

    @property
    def effective_jobs_prefix(self) -> str:
        return self.jobs_prefix or ("/api/v4" if self.job_api == "v4" else "/api/v3")

    @property
    def api_v4(self) -> bool:
        """Whether datasets/origdatablocks are read through the v4 API."""
        return self.api_prefix.rstrip("/").lower().endswith("/v4")
