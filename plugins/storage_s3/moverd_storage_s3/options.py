"""The options of an ``s3`` storage, validated before any connection is made.

Limits that S3 itself enforces (part sizes, bucket names) are checked here so that a bad
configuration fails at startup with the key named, not hours later in the middle of an upload.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator

from moverd import ByteSize, Duration, Options, PositiveDuration, UnsafePathError, safe_key

log = logging.getLogger(__name__)

MIB = 1024**2
MIN_PART_SIZE = 5 * MIB
"""S3 refuses multipart parts below 5 MiB (except the last one)."""
MAX_PART_SIZE = 5 * 1024**3
"""...and above 5 GiB."""


DEFAULT_COLD_CLASSES = ("GLACIER", "DEEP_ARCHIVE")
"""Classes whose objects need a RestoreObject before a GET (GLACIER_IR is read directly)."""


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
    connect_timeout: PositiveDuration = 10.0
    """Longest wait for a TCP connection to the endpoint."""
    read_timeout: PositiveDuration = 30.0
    """Longest wait for the next bytes of an answer (its head, or more of its body)."""
    request_timeout: PositiveDuration = 120.0
    """Longest one request may take, its retries included (for an upload: sending the part too);
    a body that breaks is resumed within this much time. It is what bounds a silent endpoint:
    ``max_attempts`` waits of ``read_timeout`` would otherwise add up to many minutes."""
    max_pool_connections: int = Field(default=64, ge=1)
    create_bucket: bool = False
    """Create the bucket on first use when it is missing: for tests and development setups."""
    fast_get: bool | None = Field(default=None, deprecated="without effect: every read goes through the lean client")
    """Deprecated, without effect: reads, listings and HEADs always go through the lean client
    (a proxy of the environment included), which has the only read path's retries and resume.
    Accepted, with a warning, so that a configuration written for an older moverd still loads."""

    read_limit: int | None = Field(default=None, ge=1)
    """Concurrent datablock reads (LTS_READ_LIMIT) when this storage is the LTS; None: unbounded
    (a landing zone or retrieval bucket). With ``prefect.global_limits`` it holds across hosts."""
    write_limit: int | None = Field(default=None, ge=1)
    """Concurrent datablock writes (LTS_WRITE_LIMIT), as ``read_limit``."""
    storage_class: str | None = None
    """The S3 storage class of datablocks (``GLACIER``, ``DEEP_ARCHIVE``, ``GLACIER_IR``,
    ``STANDARD``, or whatever the endpoint accepts); None: the bucket's default. In a cold class
    (:data:`COLD_CLASSES`) objects are restored before they are read."""
    index_storage_class: str | None = "STANDARD"
    """The class of the member indexes beside the datablocks: readable without a restore, so a
    retrieval knows what to restore and which byte ranges to read, and a verify or an archive
    resume needs no restore to find the datablocks. None: the bucket's default."""
    cold_classes: list[str] = Field(default_factory=lambda: list(DEFAULT_COLD_CLASSES))
    """Storage classes whose objects cannot be read before a restore."""
    restore_reads: bool = False
    """Objects here may be in a cold class though moverd did not write them (a landing zone the
    ingestor fills in GLACIER): each one's restore state is looked up before it is read, and it is
    restored first if it needs it."""
    checksum_type: Literal["FULL_OBJECT", "COMPOSITE"] = "FULL_OBJECT"
    """The whole-object CRC32 of multipart uploads: FULL_OBJECT (a digest of the object's bytes)
    where the server supports it, else COMPOSITE (a digest of the parts' digests)."""
    verification: Literal["auto", "read-back", "server-checksum"] = "auto"
    """How datablocks written here are verified: ``read-back`` reads every byte back,
    ``server-checksum`` compares the CRC32 moverd computed while streaming with the one the
    server reports (HEAD with checksum mode). ``auto``: server-checksum for a cold class, where
    reads need a restore, read-back otherwise."""
    restore_days: int = Field(default=7, ge=1)
    """How long a restored copy stays readable (RestoreObject ``Days``)."""
    restore_tier: Literal["Expedited", "Standard", "Bulk"] = "Standard"
    restore_timeout: Duration = 12 * 3600.0
    """Longest a retrieval waits for a datablock's restore; then it fails (a system error) and a
    later run resumes the wait without requesting the restore again."""
    restore_poll: PositiveDuration = 5.0
    """First wait between two looks at a restore's progress (HEAD); it doubles up to
    ``restore_poll_max``."""
    restore_poll_max: PositiveDuration = 300.0

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

    @field_validator("ca_bundle")
    @classmethod
    def _ca_bundle(cls, value: Path | None) -> Path | None:
        if value is not None and not value.expanduser().is_file():
            raise ValueError(f"CA bundle {str(value)!r} does not exist")
        return value.expanduser() if value is not None else None

    @property
    def cold(self) -> bool:
        """Whether datablocks go to a class that needs a restore before a read."""
        return self.storage_class is not None and self.storage_class.upper() in {
            c.upper() for c in self.cold_classes
        }

    @field_validator("fast_get")
    @classmethod
    def _fast_get(cls, value: bool | None) -> bool | None:
        if value is not None:
            log.warning("s3 option fast_get is deprecated and has no effect: every read goes through "
                        "the lean client (proxies of the environment included); delete the key")
        return value

    @model_validator(mode="after")
    def _restore_tier(self) -> S3Options:
        # S3 refuses the request at restore time, hours or years after the configuration was
        # written: say so now.
        if self.restore_tier == "Expedited" and (self.storage_class or "").upper() == "DEEP_ARCHIVE":
            raise ValueError("restore_tier: S3 offers no Expedited restore from DEEP_ARCHIVE; choose "
                             "Standard (within 12 hours) or Bulk (within 48 hours)")
        return self

    @model_validator(mode="after")
    def _credentials_pair(self) -> S3Options:
        # One without the other is always a mistake; neither means botocore's default chain
        # (environment, ~/.aws, instance role).
        if (self.access_key_id is None) != (self.secret_access_key is None):
            raise ValueError("give both access_key_id and secret_access_key (or their *_file), or neither")
        return self
