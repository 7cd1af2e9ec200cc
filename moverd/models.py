"""The data moverd moves and records: datasets, files, datablocks, jobs.

These are the core's own shapes; catalog plugins translate them to and from their API
(SciCat's OrigDatablock ``dataFileList`` becomes a list of :class:`FileEntry`, a
:class:`Datablock` becomes a SciCat Datablock).
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .keys import safe_key


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


class FileEntry(_Model):
    """One file of a dataset, as the catalog lists it (path relative to the dataset root)."""

    path: str
    size: int = Field(ge=0)
    mtime: float = 0.0
    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    checksum: str | None = None

    @field_validator("path")
    @classmethod
    def _safe(cls, v: str) -> str:
        return safe_key(v)

    @property
    def time_iso(self) -> str:
        return datetime.fromtimestamp(self.mtime, UTC).isoformat().replace("+00:00", "Z")


class Member(_Model):
    """A file inside a datablock: where its bytes are in the tar, and their checksum."""

    path: str
    size: int
    offset: int
    """Offset of the file's data (after its headers) within the tar."""
    header_offset: int
    mtime: float = 0.0
    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    checksum: str


class Datablock(_Model):
    """One tar on the LTS, with its member index."""

    archive_id: str
    index: int
    size: int
    """Sum of the members' sizes (SciCat's unpacked ``size``)."""
    packed_size: int
    """Bytes of the tar file."""
    checksum_alg: str
    """Algorithm of the members' checksums (SciCat's ``chkAlg``)."""
    datablock_checksum: str
    """``<alg>:<hex>`` of the whole tar, for read-back verification."""
    members: list[Member]
    object_checksum: str | None = None
    """The checksum the storage keeps for the tar (``crc32:<base64>`` on S3), as moverd computed it
    while streaming: what a datablock that cannot be read back is verified against."""
    verified_by: str | None = None
    """How the datablock is verified: ``read-back`` or ``server-checksum`` (None: written before
    moverd recorded it, i.e. read back)."""
    version: str = "1"
    catalog_id: str | None = None
    """Id the catalog gave the registered datablock (None before registration)."""

    @property
    def index_key(self) -> str:
        return index_key(self.archive_id)


def index_key(archive_id: str) -> str:
    """Key of the member index stored beside a datablock."""
    return archive_id + ".index.json"


class Dataset(_Model):
    """A dataset as the catalog knows it."""

    pid: str
    size: int | None = None
    number_of_files: int | None = None
    source_folder: str | None = None
    """Where the data is. For the local catalog: the folder archived from."""
    lifecycle: dict[str, Any] = Field(default_factory=dict)
    owner_group: str | None = None
    access_groups: list[str] = Field(default_factory=list)
    """Groups besides the owner group that may see (and, through the upload API, fill) it."""


class JobType(StrEnum):
    archive = "archive"
    retrieve = "retrieve"


class JobStatus(StrEnum):
    """SciCat's job status codes, used by every catalog."""

    submitted = "jobSubmitted"
    in_progress = "inProgress"
    finished_successful = "finishedSuccessful"
    finished_with_dataset_errors = "finishedWithDatasetErrors"
    finished_unsuccessful = "finishedUnsuccessful"


class JobDataset(_Model):
    pid: str
    files: list[str] = Field(default_factory=list)
    """Dataset-relative paths; empty means the whole dataset."""


class JobOwner(_Model):
    """Who a job made by moverd is for (SciCat's ``ownerUser``, ``ownerGroup``, ``contactEmail``)."""

    user: str | None = None
    group: str | None = None
    email: str | None = None


class Job(_Model):
    id: str
    type: JobType
    datasets: list[JobDataset]
    status: str = JobStatus.submitted.value
    result: dict[str, Any] = Field(default_factory=dict)


class ArchiveStatus(StrEnum):
    """SciCat's ``archiveStatusMessage`` values moverd sets."""

    created = "datasetCreated"
    """Uploaded to the landing zone and ready to be archived (the upload API's finalize)."""
    started = "started"
    on_archive_disk = "datasetOnArchiveDisk"
    missing_files = "missingFilesError"
    failed = "scheduleArchiveJobFailed"


class RetrieveStatus(StrEnum):
    """SciCat's ``retrieveStatusMessage`` values moverd sets."""

    started = "started"
    retrieved = "datasetRetrieved"
    failed = "datasetRetrievalFailed"


class Download(_Model):
    """A link a retrieve job hands out: a retrieved datablock, or one retrieved file. Each catalog
    records a job's downloads in its own layout (SciCat: ``jobResultObject``)."""

    dataset: str
    name: str
    """The datablock's tar name, or the file's path in the dataset."""
    size: int
    archive_id: str
    url: str


class LifecycleUpdate(_Model):
    """A partial lifecycle change: only fields that are set are sent (a merge, never a reset)."""

    archive_status: ArchiveStatus | None = None
    retrieve_status: RetrieveStatus | None = None
    archivable: bool | None = None
    retrievable: bool | None = None
    retrieve_return_message: dict[str, Any] | None = None
    """Free-form details of a retrieval in progress (SciCat's ``retrieveReturnMessage``): the
    restore counts per state while a retrieval waits for a tape-class LTS."""

    def fields(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True, mode="json")
