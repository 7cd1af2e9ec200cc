"""The ``s3`` storage: a bucket (and a folder of it) as a moverd source or sink.

Reads, listings and HEADs go through the lean client (:mod:`.lean`: urllib3 and botocore's
signer, in worker threads), on every endpoint and through a proxy of the environment too; uploads,
deletes, restores, presigning and bucket creation through aiobotocore, which is imported on first
use only. So there is one read path, with one retry policy and one way to resume a broken body.
"""

from __future__ import annotations

import builtins
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable
from datetime import timedelta
from typing import Any, TypeVar

from moverd import (
    VERIFY_READ_BACK,
    VERIFY_SERVER_CHECKSUM,
    Context,
    NotFoundError,
    ObjectInfo,
    RestorePolicy,
    RestoreState,
    Slots,
    Storage,
    StorageError,
    join_key,
    safe_key,
)

from . import crc, lean, restore
from .client import S3Clients
from .errors import (
    Waits,
    check_version,
    client_error_code,
    to_storage_error,
    within,
)
from .options import S3Options
from .uploads import MAX_PRESIGN, S3DirectUploads
from .writer import MultipartWriter

log = logging.getLogger(__name__)

T = TypeVar("T")

DELETE_BATCH = 1000
"""DeleteObjects takes at most 1000 keys per request."""

EXPEDITED_PAUSE = 600.0
"""After S3 had no Expedited capacity, how long restores are asked as Standard."""


class S3Storage(S3DirectUploads, Storage):
    """Objects under ``prefix`` in one bucket; keys are relative to that prefix."""

    type_name = "s3"
    # An object appears only once its upload completed and is replaced whole, as a new ETag that
    # the pinned reads refuse: no second listing is needed after an archive.
    files_change_in_place = False

    def __init__(self, name: str, options: S3Options, context: Context | None = None) -> None:
        self.name = name
        self.options = options
        self.bucket = options.bucket
        self.prefix = options.prefix
        self.clients = S3Clients(options)
        self._fast = lean.LeanClient(options)
        if self._fast.proxy is not None:
            from botocore.httpsession import mask_proxy_url

            log.info("storage %r: %s is reached through the proxy %s (HTTP(S)_PROXY)",
                     name, options.endpoint_url or "AWS S3", mask_proxy_url(self._fast.proxy))
        self._bucket_ready = not options.create_bucket
        self._standard_until = 0.0
        """Until when restores go as Standard: S3 had no Expedited capacity (monotonic clock)."""
        self.waits = Waits(options.connect_timeout, options.read_timeout, options.max_attempts)
        if options.verification == "auto":
            self.verification = VERIFY_SERVER_CHECKSUM if options.cold else VERIFY_READ_BACK
        else:
            self.verification = options.verification
        self.needs_restore = options.cold or options.restore_reads
        if options.read_limit is not None:
            self.read_slots = Slots(f"{name}.read", options.read_limit)
        if options.write_limit is not None:
            self.write_slots = Slots(f"{name}.write", options.write_limit)
        self.restore_policy = RestorePolicy(
            timeout=options.restore_timeout, poll=options.restore_poll, poll_max=options.restore_poll_max
        )

    # -- keys -------------------------------------------------------------------------------

    def _full(self, key: str) -> str:
        return join_key(self.prefix, key)

    def _folder(self, prefix: str) -> str:
        """The bucket prefix for the folder ``prefix`` ("" = everything of this storage)."""
        rel = safe_key(prefix, allow_empty=True)
        full = join_key(self.prefix, rel) if rel else self.prefix
        return f"{full}/" if full else ""

    def _relative(self, full_key: str) -> str:
        return full_key[len(self.prefix) + 1 :] if self.prefix else full_key

    def _error(self, exc: BaseException, key: str | None, action: str = "", request: str = "") -> StorageError:
        return to_storage_error(
            exc, bucket=self.bucket, key=key, endpoint=self.clients.endpoint, action=action,
            request=request, waits=self.waits,
        )

    async def _bounded(self, call: Awaitable[T], method: str, key: str | None) -> T:
        asked = f"{method} {self.bucket}/{key}" if key else f"{method} {self.bucket}"
        return await within(call, self.options.request_timeout, endpoint=self.clients.endpoint, request=asked)

    async def _client(self) -> Any:
        try:
            return await self._bounded(self.clients.get(), "HeadBucket/CreateBucket", None)
        except StorageError:
            raise
        except Exception as exc:
            raise self._error(exc, None, "connect") from exc

    async def _lean(self) -> lean.LeanClient:
        """The lean client. With ``create_bucket``, the aiobotocore client (which creates the
        bucket) is opened first, once: that option is for tests and development setups, where the
        import does not matter."""
        if not self._bucket_ready:
            await self._client()
            self._bucket_ready = True
        return self._fast

    # -- reading ----------------------------------------------------------------------------

    async def _pages(self, folder: str) -> AsyncIterator[builtins.list[lean.Listed]]:
        """ListObjectsV2 pages under ``folder``, following continuation tokens."""
        fast = await self._lean()
        token: str | None = None
        while True:
            try:
                page, token = await fast.list_page(folder, token)
            except Exception as exc:
                raise self._error(exc, folder or None, "list", self._listing(folder)) from exc
            yield page
            if token is None:
                return

    def _listing(self, folder: str) -> str:
        return f"list {self.bucket}/{folder}" if folder else f"list {self.bucket}"

    async def list(self, prefix: str = "") -> AsyncIterator[ObjectInfo]:
        async for page in self._pages(self._folder(prefix)):
            for obj in page:
                if obj.key.endswith("/"):
                    continue  # a "folder" marker some S3 consoles create: not a file
                yield ObjectInfo(key=self._relative(obj.key), size=obj.size, mtime=obj.mtime, etag=obj.etag)

    async def stat(self, key: str) -> ObjectInfo:
        full = self._full(key)
        fast = await self._lean()
        try:
            head = await fast.head(full)
        except Exception as exc:
            raise self._error(exc, key, request=f"HEAD {self.bucket}/{full}") from exc
        return ObjectInfo(key=key, size=head.size, mtime=head.mtime, etag=head.etag)

    async def open_reader(
        self, key: str, offset: int = 0, length: int | None = None, *, uncached: bool = False,
        expect: ObjectInfo | None = None,
    ) -> lean.LeanReader:
        """Stream ``length`` bytes from ``offset`` (to the end when None).

        With ``expect`` (the listing's entry) every GET, resumed ones included, carries
        ``If-Match`` on the listed ETag and the object's size is checked against the listed one:
        S3 replaces objects whole, so a matching ETag is the listed version's bytes, and any other
        version fails with :class:`~moverd.SourceChangedError` rather than being archived.

        This does no I/O (but for ``length == 0``, which stats the object): the GET is sent by the
        first read, in the worker thread that receives the first bytes, which saves a thread hop
        per object. So a missing object raises :class:`~moverd.NotFoundError` from there (see
        :class:`.lean.LeanReader`); bad keys and negative ranges raise here.
        """
        # ``uncached`` needs nothing here: every GET is served by the S3 server, not a local cache.
        if offset < 0 or (length is not None and length < 0):
            raise ValueError(f"offset and length must not be negative (got {offset}, {length})")
        full = self._full(key)
        fast = await self._lean()
        if length == 0:
            info = await self.stat(key)  # a missing key is still an error
            if expect is not None:
                check_version(self.bucket, key, expect, etag=info.etag, size=info.size)
            return lean.LeanReader.empty(fast, bucket=self.bucket, key=key, full_key=full)
        end = None if length is None else offset + length
        return lean.LeanReader(fast, bucket=self.bucket, key=key, full_key=full, start=offset, end=end, expect=expect)

    # -- writing ----------------------------------------------------------------------------

    async def open_writer(self, key: str, size_hint: int | None = None) -> MultipartWriter:
        return await self._writer(key, size_hint, self.options.storage_class)

    async def _writer(self, key: str, size_hint: int | None, storage_class: str | None) -> MultipartWriter:
        await self._client()  # fail early (unreachable endpoint, missing bucket creation)
        return MultipartWriter(
            client=self._client, bucket=self.bucket, key=key, full_key=self._full(key),
            endpoint=self.clients.endpoint, part_size=self.options.part_size,
            concurrency=self.options.upload_concurrency, size_hint=size_hint,
            deadline=self.options.request_timeout, waits=self.waits, storage_class=storage_class,
            checksum_type=self.options.checksum_type,
        )

    async def put_index(self, key: str, data: memoryview | bytes) -> None:
        """In ``index_storage_class`` (STANDARD by default), readable without a restore."""
        await self.write_whole(await self._writer(key, len(data), self.options.index_storage_class), data)

    async def restore_state(self, key: str) -> RestoreState:
        client = await self._client()
        full = self._full(key)
        try:
            resp = await self._bounded(client.head_object(Bucket=self.bucket, Key=full), "HEAD", full)
        except Exception as exc:
            raise self._error(exc, key, request=f"HEAD {self.bucket}/{full}") from exc
        return restore.state_of(resp.get("Restore"), resp.get("StorageClass"), self.options.cold_classes)

    async def request_restore(self, key: str) -> None:
        """RestoreObject with ``restore_days`` and ``restore_tier``; one already running is fine.

        An Expedited restore that S3 cannot serve now (``GlacierExpeditedRetrievalNotAvailable``,
        a 503 once botocore's retries are spent: expedited capacity is not guaranteed) is asked
        again in the Standard tier, with a warning: the job would otherwise fail, and a later
        one wait longer still. The restores of the next :data:`EXPEDITED_PAUSE` seconds are
        asked as Standard straight away, rather than each spending the retries first."""
        tier = self.options.restore_tier
        if tier == "Expedited" and time.monotonic() < self._standard_until:
            tier = "Standard"
        while True:
            try:
                await self._restore(key, tier)
                return
            except _ExpeditedUnavailableError:
                log.warning("storage %r: no Expedited restore available for %s now; asking for a Standard one, "
                            "and so for the next %g s (Standard restores take hours: restore_timeout is %g s)",
                            self.name, key, EXPEDITED_PAUSE, self.options.restore_timeout)
                self._standard_until = time.monotonic() + EXPEDITED_PAUSE
                tier = "Standard"

    async def _restore(self, key: str, tier: str) -> None:
        client = await self._client()
        full = self._full(key)
        request = {"Days": self.options.restore_days, "GlacierJobParameters": {"Tier": tier}}
        try:
            await self._bounded(
                client.restore_object(Bucket=self.bucket, Key=full, RestoreRequest=request), "RestoreObject", full
            )
        except Exception as exc:
            code = client_error_code(exc)
            if code == "RestoreAlreadyInProgress":
                return
            if code == "GlacierExpeditedRetrievalNotAvailable" and tier == "Expedited":
                raise _ExpeditedUnavailableError() from exc
            raise self._error(exc, key, "restore", f"POST {self.bucket}/{full}?restore") from exc

    async def stored_checksum(self, key: str) -> str | None:
        """The CRC32 the server keeps for the object (HEAD with checksum mode), which needs no
        restore: ``crc32:<base64>``, with ``-N`` for a COMPOSITE multipart value."""
        client = await self._client()
        full = self._full(key)
        try:
            resp = await self._bounded(
                client.head_object(Bucket=self.bucket, Key=full, ChecksumMode="ENABLED"), "HEAD", full
            )
        except Exception as exc:
            raise self._error(exc, key, request=f"HEAD {self.bucket}/{full}") from exc
        value = resp.get("ChecksumCRC32")
        if not value:
            return None
        parts = str(resp.get("ETag") or "").strip('"').rpartition("-")[2]
        if resp.get("ChecksumType") == "COMPOSITE" and "-" not in value and parts.isdigit():
            # Some servers (moto) leave the part count off a composite value; the ETag has it.
            value = f"{value}-{parts}"
        return f"{crc.PREFIX}{value}"

    async def delete(self, key: str) -> None:
        client = await self._client()
        full = self._full(key)
        try:
            await self._bounded(client.delete_object(Bucket=self.bucket, Key=full), "DELETE", full)
        except Exception as exc:
            err = self._error(exc, key, "delete", f"DELETE {self.bucket}/{full}")
            if isinstance(err, NotFoundError) and not _is_bucket_error(exc):
                return
            raise err from exc

    async def delete_prefix(self, prefix: str) -> int:
        folder = self._folder(prefix)
        client = await self._client()
        deleted = 0
        batch: builtins.list[dict[str, str]] = []
        async for page in self._pages(folder):
            for obj in page:
                batch.append({"Key": obj.key})
                if len(batch) == DELETE_BATCH:
                    deleted += await self._delete_batch(client, batch, prefix)
                    batch = []
        if batch:
            deleted += await self._delete_batch(client, batch, prefix)
        return deleted

    async def _delete_batch(self, client: Any, batch: builtins.list[dict[str, str]], prefix: str) -> int:
        try:
            resp = await self._bounded(
                client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True}),
                "DeleteObjects", None,
            )
        except Exception as exc:
            raise self._error(exc, prefix or None, "delete") from exc
        errors = resp.get("Errors") or []
        if errors:
            first = errors[0]
            raise StorageError(
                f"s3 {self.bucket}/{self._relative(first.get('Key', '?'))}: delete failed: "
                f"{first.get('Code')}: {first.get('Message')} ({len(errors)} of {len(batch)} keys failed)"
            )
        return len(batch)

    # -- capabilities -------------------------------------------------------------------------

    async def presign(self, key: str, expires: timedelta) -> str:
        seconds = expires.total_seconds()
        if seconds <= 0:
            raise ValueError(f"presigned URL expiry must be positive, got {expires}")
        if expires > MAX_PRESIGN:
            raise ValueError(
                f"presigned URL expiry must be at most 7 days (S3 SigV4 limit), got {expires}"
            )
        try:
            signer = await self.clients.presigner()
            url: str = await signer.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": self._full(key)},
                ExpiresIn=max(1, math.floor(seconds)),
            )
        except StorageError:
            raise
        except Exception as exc:
            raise self._error(exc, key, "presign") from exc
        return url

    async def aclose(self) -> None:
        if self._fast is not None:
            self._fast.close()
        await self.clients.aclose()

    def describe(self) -> dict[str, Any]:
        return {
            "type": self.type_name,
            "name": self.name,
            "endpoint": self.options.endpoint_url or f"AWS S3 ({self.options.region})",
            "external_endpoint": self.options.external_endpoint_url,
            "region": self.options.region,
            "bucket": self.bucket,
            "prefix": self.prefix,
            "storage_class": self.options.storage_class,
            "index_storage_class": self.options.index_storage_class,
            "verification": self.verification,
            "restore": {"tier": self.options.restore_tier, "days": self.options.restore_days,
                        "timeout": self.options.restore_timeout} if self.needs_restore else None,
        }


class _ExpeditedUnavailableError(Exception):
    """S3 has no Expedited restore capacity now."""


def _is_bucket_error(exc: BaseException) -> bool:
    return client_error_code(exc) == "NoSuchBucket"
