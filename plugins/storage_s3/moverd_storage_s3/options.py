"""The options of an ``s3`` storage, validated before any connection is made.

Limits that S3 itself enforces (part sizes, bucket names) are checked here so that a bad
configuration fails at startup with the key named, not hours later in the middle of an upload.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator

from moverd import ByteSize, Duration, Options, UnsafePathError, safe_key

MIB = 1024**2
MIN_PART_SIZE = 5 * MIB
"""S3 refuses multipart parts below 5 MiB (except the last one)."""
MAX_PART_SIZE = 5 * 1024**3
"""...and above 5 GiB."""


class S3Options(Options):
    """Where the bucket is, how to authenticate, and how hard to push the connection."""

    endpoint_url: str | None = None
    """``https://minio.example.org:9000``; None means AWS S3 for ``region``. MinIO needs it."""
    external_endpoint_url: str | None = None
    """The host users reach: presigned URLs are signed for it (the deployment's S3_EXTERNAL_ENDPOINT)."""
    region: str = "us-east-1"
    bucket: str = Field(min_length=3, max_length=63)
    prefix: str = ""
    """Every key of this storage lives under this folder of the bucket."""
    access_key_id: SecretStr | None = None
    secret_access_key: SecretStr | None = None
    addressing_style: Literal["path", "virtual"] = "path"
    verify_tls: bool = True
    ca_bundle: Path | None = None
    part_size: ByteSize = 16 * MIB
    upload_concurrency: int = Field(default=4, ge=1, le=64)
    max_attempts: int = Field(default=8, ge=1, le=50)
    connect_timeout: Duration = 10.0
    """Longest wait for a TCP connection to the endpoint."""
    read_timeout: Duration = 30.0
    """Longest wait for the next bytes of an answer (its head, or more of its body)."""
    request_timeout: Duration = 120.0
    """Longest one request may take, its retries included (for an upload: sending the part too);
    a body that breaks is resumed within this much time. It is what bounds a silent endpoint:
    ``max_attempts`` waits of ``read_timeout`` would otherwise add up to many minutes."""
    max_pool_connections: int = Field(default=64, ge=1)
    create_bucket: bool = False
    """Create the bucket on first use when it is missing: for tests and development setups."""
    fast_get: bool = True
    """Over plain ``http://`` endpoints with static credentials, read objects (GET), list and stat
    (HEAD) with moverd's lean client: blocking sockets in worker threads, its own SigV4, bodies
    received straight into moverd's buffers, no botocore import. False: aiobotocore for every
    request. TLS endpoints, uploads, deletes and presigning always use aiobotocore."""

    @field_validator("endpoint_url", "external_endpoint_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if not value:
            return None
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"must start with http:// or https://, got {value!r}")
        return value.rstrip("/")

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        try:
            return safe_key(value, allow_empty=True)
        except UnsafePathError as exc:
            raise ValueError(str(exc)) from None

    @field_validator("part_size")
    @classmethod
    def _part_size(cls, value: int) -> int:
        if value < MIN_PART_SIZE:
            raise ValueError(f"must be at least 5 MiB ({MIN_PART_SIZE} bytes): S3 refuses smaller parts")
        if value > MAX_PART_SIZE:
            raise ValueError(f"must be at most 5 GiB ({MAX_PART_SIZE} bytes): S3 refuses bigger parts")
        return value

    @field_validator("connect_timeout", "read_timeout", "request_timeout")
    @classmethod
    def _positive(cls, value: float) -> float:
        if value <= 0:
            raise ValueError("must be greater than 0")
        return value

    @field_validator("ca_bundle")
    @classmethod
    def _ca_bundle(cls, value: Path | None) -> Path | None:
        if value is not None and not value.expanduser().is_file():
            raise ValueError(f"CA bundle {str(value)!r} does not exist")
        return value.expanduser() if value is not None else None

    @model_validator(mode="after")
    def _credentials_pair(self) -> S3Options:
        # One without the other is always a mistake; neither means botocore's default chain
        # (environment, ~/.aws, instance role).
        if (self.access_key_id is None) != (self.secret_access_key is None):
            raise ValueError("give both access_key_id and secret_access_key (or their *_file), or neither")
        return self
