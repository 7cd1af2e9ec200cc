"""Translation between SciCat's JSON and moverd's models (pure functions, no I/O).

SciCat                                   moverd
job ``type`` / ``datasetList``           Job.type / Job.datasets (v3 top level or v4 jobParams)
OrigDatablock ``dataFileList[]``          FileEntry (path, size, time→mtime, perm→mode, uid, gid, chk)
Datablock                                Datablock (members from dataFileList; offsets unknown: -1)
``datasetlifecycle`` (flat DTO)          LifecycleUpdate (only the fields that are set)
"""

from __future__ import annotations

import base64
import posixpath
import re
import shlex
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from moverd import (
    ArchiveStatus,
    CatalogError,
    Datablock,
    Dataset,
    Download,
    FileEntry,
    Job,
    JobDataset,
    JobStatus,
    JobType,
    LifecycleUpdate,
    Member,
    UnsafePathError,
    UserError,
)

# --- jobs --------------------------------------------------------------------------------------


def job_from_scicat(job_id: str, doc: Any) -> Job:
    """A v3 (``datasetList`` at the top) or v4 (``jobParams.datasetList``) job as a :class:`Job`."""
    if not isinstance(doc, dict):
        raise CatalogError(f"SciCat job {job_id}: unexpected answer {str(doc)[:100]!r}")
    type_ = doc.get("type")
    if type_ not in (JobType.archive.value, JobType.retrieve.value):
        raise UserError(
            f"SciCat job {job_id} has type {type_!r}; moverd handles only 'archive' and 'retrieve' jobs"
        )
    dataset_list = doc.get("datasetList")
    if dataset_list is None and isinstance(doc.get("jobParams"), dict):
        dataset_list = doc["jobParams"].get("datasetList")
    if not isinstance(dataset_list, list) or not dataset_list:
        raise UserError(f"SciCat job {job_id}: datasetList is missing or empty")
    datasets: list[JobDataset] = []
    seen: set[str] = set()
    for i, entry in enumerate(dataset_list):
        pid = entry.get("pid") if isinstance(entry, dict) else None
        if not isinstance(pid, str) or not pid:
            raise UserError(f"SciCat job {job_id}: datasetList[{i}] has no pid")
        files = entry.get("files")
        if files is None:
            files = []
        if not isinstance(files, list) or not all(isinstance(f, str) and f for f in files):
            raise UserError(f"SciCat job {job_id}: datasetList[{i}].files must be a list of file paths")
        if pid in seen:
            raise UserError(f"SciCat job {job_id}: dataset {pid} is listed twice in datasetList")
        seen.add(pid)
        datasets.append(JobDataset(pid=pid, files=files))
    status = doc.get("statusCode") or doc.get("jobStatusMessage") or JobStatus.submitted.value
    result = doc.get("jobResultObject")
    return Job(
        id=job_id, type=JobType(type_), datasets=datasets, status=str(status),
        result=result if isinstance(result, dict) else {},
    )


def job_result(downloads: list[Download]) -> dict[str, Any]:
    """The ``jobResultObject`` of a retrieve job as SciCat's e-mail template and the facility's
    users expect it: ``{"result": [{datasetId, name, size, archiveId, url}], "downloadScript":
    <base64 shell script>}`` (the script only when there is something to download)."""
    entries = [{"datasetId": d.dataset, "name": d.name, "size": d.size, "archiveId": d.archive_id, "url": d.url}
               for d in downloads]
    out: dict[str, Any] = {"result": entries}
    if entries:
        out["downloadScript"] = download_script(downloads)
    return out


def download_script(downloads: list[Download]) -> str:
    """A shell script that downloads every link (and unpacks datablocks), base64-encoded."""
    lines = ["#!/bin/sh", "# Downloads the retrieved data; links expire (see the job result).", "set -eu"]
    for d in downloads:
        lines.append(f"mkdir -p {shlex.quote(posixpath.dirname(d.name) or '.')}")
        lines.append(f"curl -fL --retry 3 -o {shlex.quote(d.name)} {shlex.quote(d.url)}")
        if d.name.endswith(".tar") and "/" not in d.name:
            lines.append(f"tar xf {shlex.quote(d.name)} && rm {shlex.quote(d.name)}")
    return base64.b64encode(("\n".join(lines) + "\n").encode()).decode()


def job_status_body(job_api: str, status: str, message: str, result: dict[str, Any] | None) -> dict[str, Any]:
    """v3: ``jobStatusMessage`` (the backend copies it into statusCode and statusMessage; the
    message is lost); v4: ``statusCode`` + ``statusMessage`` (both required)."""
    body: dict[str, Any]
    if job_api == "v4":
        body = {"statusCode": status, "statusMessage": message or status}
    else:
        body = {"jobStatusMessage": status}
    if result is not None:
        body["jobResultObject"] = result
    return body


# --- datasets and lifecycle --------------------------------------------------------------------


def _int_or_none(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return int(value)


def dataset_from_scicat(pid: str, doc: Any) -> Dataset:
    if not isinstance(doc, dict):
        raise CatalogError(f"SciCat dataset {pid}: unexpected answer {str(doc)[:100]!r}")
    lifecycle = doc.get("datasetlifecycle")
    return Dataset(
        pid=str(doc.get("pid") or pid),
        size=_int_or_none(doc.get("size")),
        number_of_files=_int_or_none(doc.get("numberOfFiles")),
        source_folder=doc.get("sourceFolder") if isinstance(doc.get("sourceFolder"), str) else None,
        lifecycle=lifecycle if isinstance(lifecycle, dict) else {},
        owner_group=doc.get("ownerGroup") if isinstance(doc.get("ownerGroup"), str) else None,
        access_groups=[g for g in doc.get("accessGroups") or [] if isinstance(g, str)],
    )


_LIFECYCLE_FIELDS = {
    "archive_status": "archiveStatusMessage",
    "retrieve_status": "retrieveStatusMessage",
    "archivable": "archivable",
    "retrievable": "retrievable",
    "retrieve_return_message": "retrieveReturnMessage",
}


def lifecycle_body(update: LifecycleUpdate, storage_location: str | None = None) -> dict[str, Any]:
    """The flat PartialUpdateDatasetLifecycleDto body: only the fields that are set, never
    ``accessGroups`` or anything else outside the lifecycle."""
    body: dict[str, Any] = {}
    for name, value in update.fields().items():
        try:
            body[_LIFECYCLE_FIELDS[name]] = value
        except KeyError:
            raise CatalogError(f"lifecycle field {name!r} has no SciCat mapping") from None
    if storage_location and update.archive_status == ArchiveStatus.on_archive_disk:
        body["storageLocation"] = storage_location
    return body


# --- files -------------------------------------------------------------------------------------


def to_iso(mtime: float) -> str:
    """Seconds since the epoch as SciCat writes dates: UTC, milliseconds, ``Z``."""
    dt = datetime.fromtimestamp(mtime, UTC)
    return dt.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_time(value: Any) -> float:
    """An ISO-8601 ``time`` (zone-less means UTC, as in SciCat) as seconds; 0.0 if unusable."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, str) or not value:
        return 0.0
    text = value.strip()
    if text[-1:] in ("Z", "z"):
        text = text[:-1] + "+00:00"
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        return 0.0
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


_SYMBOLIC = re.compile(r"^[-dlcbps]?([-r][-w][-xsS][-r][-w][-xsS][-r][-w][-xtT])[.+@]?$")


def parse_perm(value: Any) -> int | None:
    """Permission bits from ``perm``: ``-rw-r--r--``, ``rwxr-x---``, ``644``, ``0644``,
    ``0o644``, ``100644`` (octal st_mode) or ``33188`` (decimal st_mode). None if unknown."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value & 0o7777
    if not isinstance(value, str):
        return None
    text = value.strip()
    m = _SYMBOLIC.match(text)
    if m:
        s = m.group(1)
        mode = 0
        for i, (ch, bit) in enumerate(zip(s, "rwxrwxrwx", strict=True)):
            shift = 8 - i
            if ch == bit or ch in "st":
                mode |= 1 << shift
        if s[2] in "sS":
            mode |= 0o4000
        if s[5] in "sS":
            mode |= 0o2000
        if s[8] in "tT":
            mode |= 0o1000
        return mode
    lowered = text.lower()
    if lowered.startswith("0o"):
        lowered = lowered[2:]
        return int(lowered, 8) & 0o7777 if re.fullmatch(r"[0-7]+", lowered) else None
    if not lowered.isdigit():
        return None
    if re.fullmatch(r"[0-7]{1,4}", lowered) or re.fullmatch(r"[0-7]{6}", lowered):
        return int(lowered, 8) & 0o7777
    return int(lowered, 10) & 0o7777


def format_perm(mode: int) -> str:
    """How moverd writes ``perm``: four octal digits (``0644``)."""
    return f"{mode & 0o7777:04o}"


def parse_id(value: Any) -> int | None:
    """A numeric uid/gid; None for names (``"alice"``) or anything else."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value if value >= 0 else None
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return None


def _size(pid: str, path: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise UserError(f"dataset {pid}: file {path!r} has no valid size in its origdatablock")
    if value < 0 or (isinstance(value, float) and not value.is_integer()):
        raise UserError(f"dataset {pid}: file {path!r} has an invalid size {value!r}")
    return int(value)


def file_entry(pid: str, data: Any) -> FileEntry:
    if not isinstance(data, dict) or not isinstance(data.get("path"), str) or not data["path"]:
        raise UserError(f"dataset {pid}: an origdatablock lists a file without a path")
    path: str = data["path"]
    chk = data.get("chk")
    try:
        return FileEntry(
            path=path,
            size=_size(pid, path, data.get("size")),
            mtime=parse_time(data.get("time")),
            mode=parse_perm(data.get("perm")),
            uid=parse_id(data.get("uid")),
            gid=parse_id(data.get("gid")),
            checksum=chk if isinstance(chk, str) and chk else None,
        )
    except UnsafePathError as exc:
        raise UnsafePathError(f"dataset {pid}: origdatablock file {path!r}: {exc}") from None
    except ValidationError as exc:
        raise UserError(f"dataset {pid}: origdatablock file {path!r}: {exc.errors()[0]['msg']}") from None


def files_from_origdatablocks(pid: str, blocks: Any) -> list[FileEntry]:
    """All files of all OrigDatablocks, sorted by path; a path listed twice is a user error."""
    if not isinstance(blocks, list):
        raise CatalogError(f"SciCat origdatablocks of {pid}: expected a list, got {str(blocks)[:100]!r}")
    files: dict[str, FileEntry] = {}
    for block in blocks:
        dfl = block.get("dataFileList") if isinstance(block, dict) else None
        if not isinstance(dfl, list):
            raise CatalogError(f"SciCat origdatablock of {pid} without a dataFileList")
        for item in dfl:
            entry = file_entry(pid, item)
            if entry.path in files:
                raise UserError(f"dataset {pid}: file {entry.path!r} is listed twice in its origdatablocks")
            files[entry.path] = entry
    return [files[p] for p in sorted(files)]


# --- datablocks --------------------------------------------------------------------------------


def datablock_body(db: Datablock) -> dict[str, Any]:
    """CreateDatasetDatablockDto. ``datablock_checksum`` has no SciCat field and is not sent
    (unknown keys are rejected); moverd keeps it in the member index beside the tar."""
    files = []
    for m in db.members:
        f: dict[str, Any] = {"path": m.path, "size": m.size, "time": to_iso(m.mtime)}
        if m.checksum:
            f["chk"] = m.checksum
        if m.uid is not None:
            f["uid"] = str(m.uid)
        if m.gid is not None:
            f["gid"] = str(m.gid)
        if m.mode is not None:
            f["perm"] = format_perm(m.mode)
        files.append(f)
    body: dict[str, Any] = {
        "archiveId": db.archive_id,
        "size": int(db.size),
        "packedSize": int(db.packed_size),
        "version": db.version or "1",
        "dataFileList": files,
    }
    if db.checksum_alg:
        body["chkAlg"] = db.checksum_alg
    return body


_INDEX = re.compile(r"_(\d+)\.tar$")


def _natural(text: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def datablocks_from_scicat(pid: str, docs: Any) -> list[Datablock]:
    """SciCat Datablocks as moverd's, ordered by index.

    SciCat has no index and no offsets: the index comes from the archive id
    (``..._00003.tar``) or else the natural order of archive ids; ``offset``/``header_offset`` are
    -1 (moverd reads them from the member index beside each tar); ``datablock_checksum`` is ""."""
    if not isinstance(docs, list):
        raise CatalogError(f"SciCat datablocks of {pid}: expected a list, got {str(docs)[:100]!r}")
    valid = [d for d in docs if isinstance(d, dict) and isinstance(d.get("archiveId"), str)]
    valid.sort(key=lambda d: _natural(d["archiveId"]))
    out = []
    for position, doc in enumerate(valid):
        m = _INDEX.search(doc["archiveId"])
        members = []
        for f in doc.get("dataFileList") or []:
            if not isinstance(f, dict) or not isinstance(f.get("path"), str):
                continue
            members.append(Member(
                path=f["path"], size=_int_or_none(f.get("size")) or 0, offset=-1, header_offset=-1,
                mtime=parse_time(f.get("time")), mode=parse_perm(f.get("perm")),
                uid=parse_id(f.get("uid")), gid=parse_id(f.get("gid")),
                checksum=f["chk"] if isinstance(f.get("chk"), str) else "",
            ))
        catalog_id = doc.get("id") or doc.get("_id")
        out.append(Datablock(
            archive_id=doc["archiveId"],
            index=int(m.group(1)) if m else position,
            size=_int_or_none(doc.get("size")) or 0,
            packed_size=_int_or_none(doc.get("packedSize")) or 0,
            checksum_alg=doc.get("chkAlg") or "",
            datablock_checksum="",
            members=members,
            version=str(doc.get("version") or "1"),
            catalog_id=str(catalog_id) if catalog_id else None,
        ))
    out.sort(key=lambda d: (d.index, _natural(d.archive_id)))
    return out


def same_datablock(doc: dict[str, Any], body: dict[str, Any]) -> bool:
    """Whether an already registered datablock describes the tar we are registering."""
    return (
        doc.get("size") == body["size"]
        and doc.get("packedSize") == body["packedSize"]
        and len(doc.get("dataFileList") or []) == len(body["dataFileList"])
    )
