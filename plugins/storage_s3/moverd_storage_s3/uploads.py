"""Uploads by clients through presigned URLs (moverd's :class:`~moverd.DirectUploads`).

The daemon's ingest API hands these URLs out; the bytes go from the client straight to S3. A
multipart upload is created with ``ChecksumAlgorithm=SHA256`` (a composite checksum): S3 then
requires ``x-amz-checksum-sha256`` on every part, checks it against the bytes and keeps it, and
:meth:`list_parts` reads those values back for the daemon to compare with what the client claims.
Part URLs sign only ``host``, so that the headers the facility's client adds (its checksum,
``x-amz-storage-class``, an empty ``Content-Type``) are accepted as they come.

Single PUTs are signed by :class:`_PutSigner` where it can: botocore's ``generate_presigned_url``
resolves S3's endpoint rules anew for every key (its cache is keyed by the object key too),
about two thirds of its 0.6 ms a URL, which a client of many small files pays per file. The
signer resolves the endpoint once and signs each URL with botocore's own SigV4 query signer.
It is only used after it made, for a probe key and in the same second, the very URL botocore
makes; with other credentials (refreshable ones) or another outcome, botocore signs every URL.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import quote

from moverd import NotFoundError, OpenUpload, StorageError, UploadedPart, safe_key

if TYPE_CHECKING:
    from .client import S3Clients

T = TypeVar("T")
log = logging.getLogger(__name__)

MAX_PRESIGN = timedelta(days=7)
"""SigV4 refuses presigned URLs valid for longer than a week."""

_HEADER_PARAMS = {"x-amz-storage-class": "StorageClass", "content-type": "ContentType"}
"""Headers a client may be told to send, as the botocore parameters that sign them."""


def _seconds(expires: timedelta) -> int:
    seconds = expires.total_seconds()
    if seconds <= 0 or expires > MAX_PRESIGN:
        raise ValueError(f"presigned URL expiry must be more than 0 and at most 7 days, got {expires}")
    return max(1, math.floor(seconds))


def _params(headers: dict[str, str]) -> dict[str, str]:
    out = {}
    for name, value in headers.items():
        param = _HEADER_PARAMS.get(name.lower())
        if param is None:
            raise ValueError(f"cannot sign the header {name!r} into an S3 request")
        out[param] = value
    return out


PROBE_KEY = "moverd-presign-probe"
"""A key quoted alike by every path: the endpoint part of a URL is what precedes it."""


class _PutSigner:
    """Presigned single PUTs from one resolved endpoint: what botocore does per URL, less the
    endpoint rules (see the module docstring)."""

    def __init__(self, base: str, credentials: Any, region: str, headers: dict[str, str]) -> None:
        self.base, self.credentials, self.region, self.headers = base, credentials, region, headers

    def sign(self, full_key: str, seconds: int) -> str:
        from botocore.auth import S3SigV4QueryAuth
        from botocore.awsrequest import AWSRequest

        request = AWSRequest(method="PUT", url=self.base + quote(full_key, safe="/~"), headers=dict(self.headers))
        S3SigV4QueryAuth(self.credentials, "s3", self.region, expires=seconds).add_auth(request)
        return str(request.prepare().url)


async def _put_signer(signer: Any, bucket: str, probe_key: str, params: dict[str, str]) -> _PutSigner | None:
    """A :class:`_PutSigner` for ``signer`` (a botocore client) that makes botocore's URLs, or None."""
    from botocore.credentials import RefreshableCredentials

    credentials = getattr(getattr(signer, "_request_signer", None), "_credentials", None)
    if credentials is None or isinstance(credentials, RefreshableCredentials):
        return None
    frozen = await credentials.get_frozen_credentials()
    region = signer.meta.region_name
    headers = {_PARAM_HEADERS[k]: v for k, v in params.items()}
    for _ in range(3):
        second = int(time.time())
        theirs: str = await signer.generate_presigned_url(
            "put_object", Params={"Bucket": bucket, "Key": probe_key, **params}, ExpiresIn=60)
        path = theirs.split("?", 1)[0]
        quoted = quote(probe_key, safe="/~")
        if not path.endswith(quoted):
            break
        fast = _PutSigner(path[:-len(quoted)], frozen, region, headers)
        ours = fast.sign(probe_key, 60)
        if int(time.time()) != second:
            continue  # a second passed between the two: their dates differ
        if ours == theirs:
            return fast
        break
    log.info("s3: presigned PUTs signed by botocore per URL (the lighter signer's URL differed)")
    return None


_PARAM_HEADERS = {param: header for header, param in _HEADER_PARAMS.items()}


class S3DirectUploads:
    """Mixed into :class:`~.storage.S3Storage`, whose attributes these are."""

    bucket: str
    prefix: str
    clients: S3Clients

    if TYPE_CHECKING:  # S3Storage's
        def _full(self, key: str) -> str: ...
        def _relative(self, full_key: str) -> str: ...
        def _error(self, exc: BaseException, key: str | None, action: str = "",
                   request: str = "") -> StorageError: ...
        async def _bounded(self, call: Awaitable[T], method: str, key: str | None) -> T: ...
        async def _client(self) -> Any: ...

    def client_key(self, key: str) -> str:
        return self._full(key)

    def storage_key(self, client_key: str) -> str | None:
        if self.prefix:
            if not client_key.startswith(self.prefix + "/"):
                return None
            return client_key[len(self.prefix) + 1:]
        return client_key

    async def presign_put(self, key: str, expires: timedelta, *, headers: dict[str, str]) -> str:
        signer = await self.clients.presigner()
        extra = _params(headers)
        params = {"Bucket": self.bucket, "Key": self._full(key), **extra}
        try:
            fast = await self._put_signer_for(signer, extra)
            if fast is not None:
                return fast.sign(params["Key"], _seconds(expires))
            url: str = await signer.generate_presigned_url("put_object", Params=params, ExpiresIn=_seconds(expires))
        except Exception as exc:
            raise self._error(exc, key, "presign") from exc
        return url

    async def _put_signer_for(self, signer: Any, params: dict[str, str]) -> _PutSigner | None:
        """The lighter signer for these headers, made (and checked) on first use per client."""
        cache: dict[Any, Any] = self.__dict__.setdefault("_put_signers", {})
        if cache.get("client") is not signer:  # a client opened anew
            cache.clear()
            cache["client"] = signer
        which = tuple(sorted(params.items()))
        if which not in cache:
            cache[which] = await _put_signer(signer, self.bucket, self._full(PROBE_KEY), params)
        fast: _PutSigner | None = cache[which]
        return fast

    async def create_upload(self, key: str, *, headers: dict[str, str]) -> str:
        client = await self._client()
        full = self._full(key)
        try:
            resp = await self._bounded(client.create_multipart_upload(
                Bucket=self.bucket, Key=full, ChecksumAlgorithm="SHA256", **_params(headers)),
                "CreateMultipartUpload", full)
        except Exception as exc:
            raise self._error(exc, key, "create upload") from exc
        return str(resp["UploadId"])

    async def presign_part(self, key: str, upload_id: str, number: int, expires: timedelta) -> str:
        signer = await self.clients.presigner()
        params = {"Bucket": self.bucket, "Key": self._full(key), "UploadId": upload_id, "PartNumber": number}
        try:
            url: str = await signer.generate_presigned_url("upload_part", Params=params, ExpiresIn=_seconds(expires))
        except Exception as exc:
            raise self._error(exc, key, "presign") from exc
        return url

    async def list_parts(self, key: str, upload_id: str) -> list[UploadedPart]:
        client = await self._client()
        full = self._full(key)
        parts: list[UploadedPart] = []
        marker = 0
        while True:
            try:
                resp = await self._bounded(client.list_parts(
                    Bucket=self.bucket, Key=full, UploadId=upload_id, PartNumberMarker=marker),
                    "ListParts", full)
            except Exception as exc:
                raise self._error(exc, key, "list parts") from exc
            for p in resp.get("Parts") or []:
                parts.append(UploadedPart(int(p["PartNumber"]), int(p["Size"]), str(p["ETag"]).strip('"'),
                                          p.get("ChecksumSHA256")))
            if not resp.get("IsTruncated"):
                return sorted(parts, key=lambda p: p.number)
            marker = int(resp["NextPartNumberMarker"])

    async def complete_upload(self, key: str, upload_id: str, parts: list[UploadedPart]) -> str:
        client = await self._client()
        full = self._full(key)
        listed = []
        for p in parts:
            entry: dict[str, Any] = {"PartNumber": p.number, "ETag": f'"{p.etag}"'}
            if p.checksum_sha256:
                entry["ChecksumSHA256"] = p.checksum_sha256
            listed.append(entry)
        try:
            resp = await self._bounded(client.complete_multipart_upload(
                Bucket=self.bucket, Key=full, UploadId=upload_id, MultipartUpload={"Parts": listed}),
                "CompleteMultipartUpload", full)
        except Exception as exc:
            raise self._error(exc, key, "complete upload") from exc
        return str(resp.get("Location") or f"{self.clients.endpoint}/{self.bucket}/{full}")

    async def abort_upload(self, key: str, upload_id: str) -> None:
        client = await self._client()
        full = self._full(key)
        try:
            await self._bounded(client.abort_multipart_upload(Bucket=self.bucket, Key=full, UploadId=upload_id),
                                "AbortMultipartUpload", full)
        except Exception as exc:
            err = self._error(exc, key, "abort upload")
            if not isinstance(err, NotFoundError):
                raise err from exc

    async def open_uploads(self, prefix: str = "") -> AsyncIterator[OpenUpload]:
        client = await self._client()
        rel = safe_key(prefix, allow_empty=True)
        folder = self._full(rel) + "/" if rel else (self.prefix + "/" if self.prefix else "")
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": folder}
        while True:
            try:
                resp = await self._bounded(client.list_multipart_uploads(**kwargs), "ListMultipartUploads", None)
            except Exception as exc:
                raise self._error(exc, prefix or None, "list uploads") from exc
            for u in resp.get("Uploads") or []:
                yield OpenUpload(self._relative(str(u["Key"])), str(u["UploadId"]))
            if not resp.get("IsTruncated"):
                return
            kwargs["KeyMarker"] = resp.get("NextKeyMarker", "")
            kwargs["UploadIdMarker"] = resp.get("NextUploadIdMarker", "")
