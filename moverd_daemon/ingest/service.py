"""The upload API's logic, without HTTP: what each route of :mod:`.routes` does.

Clients write into the landing storage through presigned URLs (its :class:`~moverd.DirectUploads`
capability), so no byte of an upload passes through the daemon: it signs URLs, keeps the quota,
checks what S3 recorded against what the client claims, and finalizes the dataset in the catalog.

What the reference left open is closed here: an object name must lie under its dataset's landing
prefix and be a safe key; a caller must be in the dataset's groups; complete compares each part
(number, ETag, size, checksum) with S3's own list of parts and the whole-object checksum with the
parts' checksums; finalize checks the landing zone against the catalog's file list before the
dataset becomes archivable, and a retry finds the finalize already done (no second job).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import anyio

from moverd import (
    CatalogError,
    Dataset,
    DirectUploads,
    Job,
    JobDataset,
    JobOwner,
    JobType,
    LifecycleUpdate,
    NotFoundError,
    StorageError,
    UnknownDatasetError,
    UnsafePathError,
    UploadedPart,
    checksums,
    safe_key,
)
from moverd.app import App
from moverd.models import ArchiveStatus
from moverd.services.folders import landing_prefix

from ..auth import Principal
from ..settings import IngestSettings
from .models import MAX_PARTS
from .quota import IngestState, LandingQuota, NoLandingSpaceError, Usage

log = logging.getLogger(__name__)

GIB = 1024**3
DATASET_TTL = 30.0
"""How long a dataset read from the catalog answers the group check of later requests: a client
asks for every file and every complete, and the owner and access groups do not change while a
dataset uploads."""
_COMPOSITE = re.compile(r"^(?P<value>[A-Za-z0-9+/=]+?)(?:-(?P<parts>\d+))?$")

Submit = Callable[[Job], Awaitable[None]]
"""Hands a new archive job to the daemon's dispatcher."""


@dataclass
class IngestError(Exception):
    """A refusal, with the HTTP status and the body the facility's client reads."""

    status: int
    message: str
    details: str
    extra: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.message}: {self.details}"

    def body(self) -> dict[str, Any]:
        return {"message": self.message, "details": self.details, "detail": f"{self.message}: {self.details}",
                **self.extra}


def reserved_bytes(size_gib: int) -> int:
    """The reservation for a dataset the client reports as ``size_gib``: it rounds down, so the
    dataset is smaller than one GiB more (0 GiB still reserves 1 GiB)."""
    return (size_gib + 1) * GIB


def composite_sha256(part_checksums: list[str]) -> str:
    """:func:`moverd.checksums.composite_sha256`, a bad value refused as the client's error."""
    try:
        return checksums.composite_sha256(part_checksums)
    except ValueError as exc:
        raise IngestError(422, "Failed to complete upload", str(exc)) from None


def user_groups(who: Principal) -> set[str] | None:
    """The caller's groups from its token; None for callers without one (HTTP Basic, anonymous:
    the operator's own credentials), whom the group check does not apply to."""
    if who.method != "bearer":
        return None
    groups = who.claims.get("groups") or []
    return {str(g).strip("/") for g in groups if isinstance(g, str)}


class Ingest:
    """The upload API of one daemon."""

    def __init__(self, app: App, state: IngestState, settings: IngestSettings, *,
                 submit: Submit | None = None, on_usage: Callable[[Usage], None] | None = None) -> None:
        storage = app.storage("landing")
        if not isinstance(storage, DirectUploads):
            raise TypeError(f"the landing storage ({storage.type_name}) cannot take uploads through presigned URLs")
        self.app, self.state, self.settings = app, state, settings
        self.landing: DirectUploads = storage
        self.quota = LandingQuota(storage, state, limit=settings.landing_space, ttl=settings.reservation_ttl)
        self.submit = submit
        self.on_usage = on_usage or (lambda usage: None)
        self.expiry = timedelta(seconds=settings.url_expiry)
        self.headers = {"x-amz-storage-class": settings.storage_class} if settings.storage_class else {}
        self._datasets: dict[str, tuple[float, Dataset]] = {}
        self._finalizing: dict[str, anyio.Lock] = {}

    # -- checks ---------------------------------------------------------------------------------

    async def dataset(self, pid: str, who: Principal, what: str) -> Dataset:
        """The dataset ``pid``, when the caller may upload it."""
        if not pid:
            raise IngestError(422, what, "dataset_id is empty")
        dataset = await self._dataset(pid, what)
        groups = user_groups(who)
        if self.settings.check_groups and groups is not None and not self._service_account(who):
            allowed = {g for g in (dataset.owner_group, *dataset.access_groups) if g}
            if not groups & allowed:
                raise IngestError(403, what, f"{who.name} is in none of dataset {pid}'s owner or access groups")
        return dataset

    def _service_account(self, who: Principal) -> bool:
        """The account ``POST /token`` hands out: every ingestor's client uploads with its tokens
        (as with the reference), after the exchange checked that the SciCat user is an ingestor."""
        name = self.settings.username
        return bool(name) and who.claims.get("preferred_username") == name

    async def _dataset(self, pid: str, what: str) -> Dataset:
        now = time.monotonic()
        cached = self._datasets.get(pid)
        if cached is not None and now - cached[0] < DATASET_TTL:
            return cached[1]
        try:
            dataset = await self.app.catalog.get_dataset(pid)
        except UnknownDatasetError:
            raise IngestError(404, what, f"the catalog has no dataset {pid!r}") from None
        except CatalogError as exc:
            raise IngestError(500, what, f"the catalog failed: {exc}") from None
        if len(self._datasets) > 1000:
            self._datasets = {k: v for k, v in self._datasets.items() if now - v[0] < DATASET_TTL}
        self._datasets[pid] = (now, dataset)
        return dataset

    def prefix(self, pid: str) -> str:
        return landing_prefix(self.app, pid)

    def key(self, pid: str, object_name: str, what: str) -> str:
        """The landing storage's key of ``object_name``, which must lie under ``pid``'s prefix."""
        try:
            safe_key(object_name)
        except UnsafePathError as exc:
            raise IngestError(422, what, str(exc)) from None
        key = self.landing.storage_key(object_name)
        folder = self.prefix(pid)
        if key is None or (folder and not key.startswith(folder + "/")):
            expected = self.landing.client_key(folder) if folder else "the landing zone"
            raise IngestError(422, what, f"object {object_name!r} is not under {expected}/, the landing folder "
                                         f"of dataset {pid}")
        return safe_key(key)

    async def _reservation_for(self, pid: str, what: str) -> None:
        if await self.state.reservation(pid) is None:
            raise IngestError(409, what, f"dataset {pid} has no upload in progress: request it first "
                                         "(requestDatasetUpload)")

    # -- routes ---------------------------------------------------------------------------------

    async def request_upload(self, pid: str, size_gib: int, who: Principal) -> Usage:
        what = "Failed to request the dataset upload"
        await self.dataset(pid, who, what)
        if await self.state.finalized(pid) is not None:
            raise IngestError(409, what, f"dataset {pid} was already finalized")
        size = reserved_bytes(size_gib)
        try:
            usage = await self.quota.reserve(pid, self.prefix(pid), size)
        except NoLandingSpaceError as exc:
            self.on_usage(exc.usage)
            raise IngestError(507, f"Not enough free space for dataset {pid}",
                              f"{size} bytes asked for, {exc.usage.free} free",
                              {"dataset_id": pid, "requested_size_gib": size_gib}) from None
        except StorageError as exc:
            raise IngestError(500, what, f"the landing storage failed: {exc}") from None
        self.on_usage(usage)
        log.info("upload of dataset %s granted: %d bytes reserved for %s", pid, size, who.name)
        return usage

    async def presigned_urls(self, pid: str, object_name: str, parts: int, who: Principal,
                             upload_id: str | None = None) -> tuple[str, list[str]]:
        what = "Failed to get presigned urls"
        if parts > MAX_PARTS:
            raise IngestError(422, what, f"{parts} parts asked for; S3 takes at most {MAX_PARTS}")
        key = self.key(pid, object_name, what)
        await self.dataset(pid, who, what)
        await self._reservation_for(pid, what)
        try:
            if upload_id:
                await self.landing.list_parts(key, upload_id)  # it exists, for this key
            elif parts == 1:
                return "", [await self.landing.presign_put(key, self.expiry, headers=self.headers)]
            else:
                upload_id = await self.landing.create_upload(key, headers=self.headers)
            urls = [await self.landing.presign_part(key, upload_id, n, self.expiry) for n in range(1, parts + 1)]
        except NotFoundError:
            raise IngestError(422, what, f"no open upload {upload_id!r} of {object_name!r}") from None
        except StorageError as exc:
            raise IngestError(500, what, str(exc)) from None
        return upload_id, urls

    async def presigned_puts(self, pid: str, object_names: list[str], who: Principal) -> list[str]:
        """moverd's batch of single PUTs: one presigned URL per object, in order. The dataset, the
        caller's groups and the reservation are checked once for the batch, where the per-file
        route checks them for every file (most of its cost for small files)."""
        what = "Failed to get presigned urls"
        keys = [self.key(pid, name, what) for name in object_names]
        await self.dataset(pid, who, what)
        await self._reservation_for(pid, what)
        try:
            return [await self.landing.presign_put(key, self.expiry, headers=self.headers) for key in keys]
        except StorageError as exc:
            raise IngestError(500, what, str(exc)) from None

    async def upload_state(self, pid: str, who: Principal) -> tuple[str, list[tuple[str, int]],
                                                                     list[tuple[str, str, list[UploadedPart]]]]:
        """The dataset's folder, its objects and its open uploads with their parts (for resuming)."""
        what = "Failed to read the upload's state"
        await self.dataset(pid, who, what)
        prefix = self.prefix(pid)
        try:
            objects = [(self.landing.client_key(i.key), i.size)
                       async for i in self.app.storage("landing").list(prefix)]
            uploads = [(self.landing.client_key(u.key), u.upload_id, await self.landing.list_parts(u.key, u.upload_id))
                       async for u in self.landing.open_uploads(prefix)]
        except StorageError as exc:
            raise IngestError(500, what, str(exc)) from None
        return self.landing.client_key(prefix), objects, uploads

    async def complete(self, pid: str, object_name: str, upload_id: str, parts: list[UploadedPart],
                       checksum: str, who: Principal) -> tuple[str, str]:
        """Publish a multipart upload after checking it; returns (location, object name).

        Every refusal is 422 or 500: the facility's client counts any other status as success."""
        what = "Failed to complete upload"
        key = self.key(pid, object_name, what)
        try:
            await self.dataset(pid, who, what)
        except IngestError as exc:
            raise IngestError(422 if exc.status < 500 else 500, exc.message, exc.details) from None
        if not upload_id:
            return await self._complete_single(key, object_name, what)
        claimed = self._check_claims(parts, checksum, what)
        try:
            stored = await self.landing.list_parts(key, upload_id)
        except NotFoundError:
            raise IngestError(422, what, f"no open upload {upload_id!r} of {object_name!r}") from None
        except StorageError as exc:
            raise IngestError(500, what, str(exc)) from None
        self._check_stored(claimed, stored, what)
        total = sum(p.size for p in stored)
        await self._check_quota(pid, total, what)
        final = [UploadedPart(p.number, s.size, s.etag, p.checksum_sha256)
                 for p, s in zip(claimed, stored, strict=True)]
        try:
            location = await self.landing.complete_upload(key, upload_id, final)
        except StorageError as exc:
            raise IngestError(500, what, str(exc)) from None
        log.info("upload of %s completed: %d parts, %d bytes", object_name, len(final), total)
        return location, object_name

    def _check_claims(self, parts: list[UploadedPart], checksum: str, what: str) -> list[UploadedPart]:
        if not parts:
            raise IngestError(422, what, "the upload lists no parts")
        if len(parts) > MAX_PARTS:
            raise IngestError(422, what, f"{len(parts)} parts; S3 takes at most {MAX_PARTS}")
        numbers = [p.number for p in parts]
        if numbers != list(range(1, len(parts) + 1)):
            raise IngestError(422, what, "parts must be numbered 1, 2, ... in order, each once")
        m = _COMPOSITE.match(checksum.strip())
        if m is None or (m["parts"] is not None and int(m["parts"]) != len(parts)):
            raise IngestError(422, what, f"checksum_sha256 {checksum!r} is not a composite checksum of "
                                         f"{len(parts)} parts")
        expected = composite_sha256([p.checksum_sha256 or "" for p in parts])
        if m["value"] != expected:
            raise IngestError(422, what, f"the whole-object checksum {checksum!r} does not match its parts' "
                                         f"checksums (expected {expected})")
        return parts

    def _check_stored(self, claimed: list[UploadedPart], stored: list[UploadedPart], what: str) -> None:
        have = {p.number: p for p in stored}
        missing = [p.number for p in claimed if p.number not in have]
        if missing:
            raise IngestError(422, what, f"part(s) {_numbers(missing)} were never uploaded")
        extra = sorted(set(have) - {p.number for p in claimed})
        if extra:
            raise IngestError(422, what, f"part(s) {_numbers(extra)} were uploaded but are not listed")
        last = claimed[-1].number
        for p in claimed:
            s = have[p.number]
            if p.etag.strip('"') != s.etag:
                raise IngestError(422, what, f"part {p.number}: ETag {p.etag!r} is not the uploaded part's "
                                             f"({s.etag!r})")
            if s.checksum_sha256 is not None and s.checksum_sha256 != p.checksum_sha256:
                raise IngestError(422, what, f"part {p.number}: checksum {p.checksum_sha256!r} is not the one S3 "
                                             f"recorded for the uploaded bytes ({s.checksum_sha256!r})")
            if p.number != last and s.size < self.settings.min_part_size:
                raise IngestError(422, what, f"part {p.number} has {s.size} bytes; every part but the last needs "
                                             f"at least {self.settings.min_part_size}")

    async def _check_quota(self, pid: str, size: int, what: str) -> None:
        """An upload that outgrows its dataset's reservation takes more, if the quota has it."""
        reservation = await self.state.reservation(pid)
        if reservation is None:
            raise IngestError(422, what, f"dataset {pid} has no upload in progress (aborted, finalized or expired)")
        stored = await self._stored_bytes(pid)
        if stored + size <= reservation.bytes:
            return
        try:
            self.on_usage(await self.quota.reserve(pid, reservation.prefix, stored + size))
        except NoLandingSpaceError as exc:
            self.on_usage(exc.usage)
            raise IngestError(422, what, f"dataset {pid} outgrew its reservation of {reservation.bytes} bytes and "
                                         f"the landing zone has {exc.usage.free} bytes free") from None

    async def _stored_bytes(self, pid: str) -> int:
        return sum([info.size async for info in self.app.storage("landing").list(self.prefix(pid))])

    async def _complete_single(self, key: str, object_name: str, what: str) -> tuple[str, str]:
        """The client's exact-chunk-size case: one part, sent to a single-PUT URL, then completed
        with an empty ``upload_id``. The object is whole already: say so if it is there."""
        try:
            await self.app.storage("landing").stat(key)
        except NotFoundError:
            raise IngestError(422, what, f"upload_id is empty and {object_name!r} was not uploaded") from None
        except StorageError as exc:
            raise IngestError(500, what, str(exc)) from None
        return object_name, object_name

    async def abort_multipart(self, pid: str, object_name: str, upload_id: str, who: Principal) -> None:
        """Abort one upload. The facility's client sends no ``dataset_id``: then the dataset is
        the one with an upload in progress whose landing folder holds the key."""
        what = "Failed to abort multipart upload"
        if not pid:
            pid = await self._dataset_of(object_name, what)
        key = self.key(pid, object_name, what)
        await self.dataset(pid, who, what)
        try:
            await self.landing.abort_upload(key, upload_id)
        except StorageError as exc:
            raise IngestError(500, what, str(exc)) from None

    async def _dataset_of(self, object_name: str, what: str) -> str:
        key = self.landing.storage_key(object_name) or ""
        for r in await self.state.reservations():
            if r.prefix and key.startswith(r.prefix + "/"):
                return r.pid
        raise IngestError(422, what, f"{object_name!r} lies in no landing folder of an upload in progress")

    async def abort_dataset(self, pid: str, who: Principal) -> int:
        """Delete what was uploaded, abort the open uploads, release the reservation."""
        what = "Failed to abort dataset upload"
        await self.dataset(pid, who, what)
        if await self.state.finalized(pid) is not None:
            raise IngestError(409, what, f"dataset {pid} was finalized; its upload can no longer be aborted")
        prefix = self.prefix(pid)
        if not prefix:
            raise IngestError(500, what, "archive.landing_prefix does not name a folder per dataset")
        try:
            aborted = 0
            async for upload in self.landing.open_uploads(prefix):
                await self.landing.abort_upload(upload.key, upload.upload_id)
                aborted += 1
            deleted = await self.app.storage("landing").delete_prefix(prefix)
        except StorageError as exc:
            raise IngestError(500, what, str(exc)) from None
        await self.state.release(pid)
        self.on_usage(await self.quota.usage())
        log.info("upload of dataset %s aborted: %d open upload(s) aborted, %d object(s) deleted", pid, aborted, deleted)
        return deleted

    async def finalize(self, pid: str, owner: JobOwner, create_job: bool, who: Principal) -> str | None:
        """Check the landing zone against the catalog, mark the dataset archivable, and create
        (and submit) its archive job; returns the job id. A second call does nothing again."""
        what = "Failed to finalize dataset"
        extra = {"dataset_pid": pid}
        try:
            await self.dataset(pid, who, what)
        except IngestError as exc:
            raise IngestError(exc.status, exc.message, exc.details, extra) from None
        lock = self._finalizing.setdefault(pid, anyio.Lock())
        try:
            async with lock:  # two finalizes at once (a client's retry) make one job
                return await self._finalize(pid, owner, create_job, what, extra)
        finally:
            if not lock.locked() and not lock.statistics().tasks_waiting:
                self._finalizing.pop(pid, None)

    async def _finalize(self, pid: str, owner: JobOwner, create_job: bool, what: str,
                        extra: dict[str, Any]) -> str | None:
        done = await self.state.finalized(pid)
        if done is not None and (done[0] is not None or not create_job):
            return done[0]
        try:
            if done is None:
                await self.reconcile(pid)
                await self.app.catalog.update_lifecycle(
                    pid, LifecycleUpdate(archive_status=ArchiveStatus.created, archivable=True))
                await self.state.mark_finalized(pid, None)
            job_id = None
            if create_job:
                job = await self.app.catalog.create_job(JobType.archive, [JobDataset(pid=pid)], owner=owner)
                job_id = job.id
                await self.state.mark_finalized(pid, job_id)
                if self.submit is not None:
                    await self.submit(job)
        except IngestError as exc:
            raise IngestError(exc.status, exc.message, exc.details, extra) from None
        except (CatalogError, StorageError) as exc:
            raise IngestError(500, what, str(exc), extra) from None
        self.on_usage(await self.quota.usage())
        log.info("dataset %s finalized%s", pid, f": archive job {job_id}" if job_id else "")
        return job_id

    async def reconcile(self, pid: str) -> None:
        """Every file the catalog lists is in the landing zone, at its size, or IngestError."""
        files = await self.app.catalog.list_files(pid)
        prefix = self.prefix(pid)
        sizes = {info.key: info.size async for info in self.app.storage("landing").list(prefix)}
        missing, wrong = [], []
        for f in files:
            key = f"{prefix}/{f.path}" if prefix else f.path
            if key not in sizes:
                missing.append(f.path)
            elif sizes[key] != f.size:
                wrong.append(f"{f.path} ({sizes[key]} bytes, the catalog says {f.size})")
        if missing or wrong:
            problems = []
            if missing:
                problems.append(f"{len(missing)} file(s) missing from the landing zone: {_names(missing)}")
            if wrong:
                problems.append(f"{len(wrong)} file(s) of another size: {_names(wrong)}")
            raise IngestError(422, "Failed to finalize dataset",
                              f"dataset {pid} is not archivable yet: " + "; ".join(problems))


def _numbers(values: list[int]) -> str:
    return ", ".join(str(v) for v in values[:10]) + (" ..." if len(values) > 10 else "")


def _names(values: list[str]) -> str:
    return ", ".join(values[:5]) + (f" and {len(values) - 5} more" if len(values) > 5 else "")
