"""One aioboto3 session and one long-lived S3 client per storage, opened on first use.

A client owns an aiohttp connection pool; creating one per request would pay a TCP (and TLS)
handshake every time and defeat keep-alive. It is created lazily because storages are built
synchronously from the configuration, before any event loop runs, and it belongs to the event
loop that created it: when a storage is used from another loop (a new ``anyio.run``), a fresh
client is opened there instead of touching the old loop's connections.

Presigned URLs for users are signed by a second client whose endpoint is the external one: SigV4
signs the ``Host`` header, so a URL cannot be rewritten to another host after signing.

aioboto3 (with aiobotocore and aiohttp: about half a second) is imported when the first client
is opened, not with this module: a storage whose reads and listings go through the lean client
(:mod:`.lean`) and that never writes never needs it.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Any

import anyio

from moverd import StorageError

from .errors import NOT_S3_KEY, NotS3Error, error_code, not_s3_answer, to_storage_error
from .options import S3Options

if TYPE_CHECKING:
    import aioboto3
    from aiobotocore.config import AioConfig

log = logging.getLogger(__name__)


def make_config(opts: S3Options) -> AioConfig:
    """botocore settings: standard retries (5xx, throttling, resets), timeouts, pool, addressing.

    ``max_attempts`` counts every attempt, the first included, as AWS's own config files do; it
    is botocore's ``total_max_attempts`` (its ``max_attempts`` key would count retries only).

    Checksums are computed only where S3 requires them (DeleteObjects): the newer "when
    supported" default adds CRC headers that several S3-compatible servers (older MinIO, Ceph)
    reject, and transfer integrity is already covered by TLS and moverd's own checksums.
    """
    from aiobotocore.config import AioConfig

    return AioConfig(
        region_name=opts.region,
        signature_version="s3v4",
        retries={"total_max_attempts": opts.max_attempts, "mode": "standard"},
        connect_timeout=opts.connect_timeout,
        read_timeout=opts.read_timeout,
        max_pool_connections=opts.max_pool_connections,
        s3={"addressing_style": opts.addressing_style},
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )


def _flag_non_s3_answer(
    operation_model: Any, response_dict: dict[str, Any], customized_response_dict: dict[str, Any], **_: Any
) -> None:
    """Mark an error answer that is not S3's before botocore parses it: botocore would turn an
    HTML 404 page into the error code ``404``, which reads as a missing object. The mark (what
    the answer looked like) reaches the ``ClientError``'s response, where
    :func:`.errors.to_storage_error` finds it."""
    status = int(response_dict.get("status_code") or 0)
    if status < 300:
        return
    headers = response_dict.get("headers") or {}
    ctype = str(next((v for k, v in headers.items() if str(k).lower() == "content-type"), ""))
    body = response_dict.get("body")
    raw = body if isinstance(body, bytes) else None
    if operation_model.http.get("method") == "HEAD":
        raw = None  # no document: only the content type can tell
    if not_s3_answer(status, ctype, raw) and status not in (429, 500, 502, 503, 504):
        customized_response_dict[NOT_S3_KEY] = str(NotS3Error(status, _reason(status), ctype, raw or b""))


def _reason(status: int) -> str:
    from http import HTTPStatus

    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


class S3Clients:
    """The storage's API client and, when an external endpoint is set, its presigning client."""

    def __init__(self, opts: S3Options) -> None:
        self._opts = opts
        self._lock = anyio.Lock()
        self._session: aioboto3.Session | None = None
        self._stack: AsyncExitStack | None = None
        self._client: Any = None
        self._presigner: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def endpoint(self) -> str:
        return self._opts.endpoint_url or f"AWS S3 ({self._opts.region})"

    def _new_session(self) -> aioboto3.Session:
        import aioboto3

        o = self._opts
        return aioboto3.Session(
            aws_access_key_id=o.access_key_id.get_secret_value() if o.access_key_id else None,
            aws_secret_access_key=o.secret_access_key.get_secret_value() if o.secret_access_key else None,
            region_name=o.region,
        )

    def _verify(self) -> bool | str | None:
        if self._opts.ca_bundle is not None:
            return str(self._opts.ca_bundle)
        return None if self._opts.verify_tls else False

    async def _open(self, endpoint_url: str | None) -> Any:
        assert self._session is not None and self._stack is not None
        cm = self._session.client(
            "s3", endpoint_url=endpoint_url, config=make_config(self._opts), verify=self._verify()
        )
        client = await self._stack.enter_async_context(cm)
        client.meta.events.register("before-parse.s3", _flag_non_s3_answer)
        return client

    def _check_loop(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is loop:
            return
        if self._loop is not None:
            # The old loop's connections cannot be closed from here; they go with that loop.
            log.debug("s3 %s: event loop changed, opening a new client", self._opts.bucket)
        self._loop = loop
        self._lock = anyio.Lock()
        self._client = self._presigner = self._stack = None

    async def get(self) -> Any:
        """The API client, opened (and the bucket created, if asked) on first use."""
        self._check_loop()
        if self._client is not None:
            return self._client
        async with self._lock:
            if self._client is None:
                self._session = self._session or self._new_session()
                self._stack = AsyncExitStack()
                try:
                    client = await self._open(self._opts.endpoint_url)
                    if self._opts.create_bucket:
                        await self._ensure_bucket(client)
                except BaseException:
                    stack, self._stack = self._stack, None
                    await stack.aclose()
                    raise
                self._client = client
            return self._client

    async def presigner(self) -> Any:
        """The client whose endpoint appears in URLs handed to users."""
        client = await self.get()
        if not self._opts.external_endpoint_url:
            return client
        async with self._lock:
            if self._presigner is None:
                self._presigner = await self._open(self._opts.external_endpoint_url)
            return self._presigner

    async def _ensure_bucket(self, client: Any) -> None:
        from botocore.exceptions import ClientError

        bucket = self._opts.bucket
        try:
            await client.head_bucket(Bucket=bucket)
            return
        except ClientError as exc:
            if error_code(exc) not in ("404", "NoSuchBucket", "NotFound"):
                raise to_storage_error(exc, bucket=bucket, key=None, endpoint=self.endpoint) from None
        kwargs: dict[str, Any] = {"Bucket": bucket}
        if self._opts.region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self._opts.region}
        try:
            await client.create_bucket(**kwargs)
            log.info("s3: created bucket %r at %s", bucket, self.endpoint)
        except ClientError as exc:
            if error_code(exc) not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise StorageError(
                    f"s3 {bucket}: cannot create bucket: {error_code(exc)}: "
                    f"{exc.response.get('Error', {}).get('Message', '')}"
                ) from None

    async def aclose(self) -> None:
        """Close the connection pools; a later call to :meth:`get` opens new ones."""
        self._check_loop()
        async with self._lock:
            stack, self._stack = self._stack, None
            self._client = self._presigner = None
            if stack is not None:
                await stack.aclose()
