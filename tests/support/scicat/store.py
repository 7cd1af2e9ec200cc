"""The fake SciCat's data: accounts, tokens, datasets, (orig)datablocks and jobs, in memory.

Documents are stored the way the backend stores them (v4 job shape, v3-ish dataset shape) and
rendered per API version on the way out. Everything here runs under the server's lock.
"""

from __future__ import annotations

import copy
import secrets
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any


def now_iso() -> str:
    """Mongo/JS ``toISOString()``: millisecond precision, ``Z``."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def iso(value: str | float | datetime) -> str:
    """Normalise a date to the backend's output form (zone-less input counts as UTC)."""
    if isinstance(value, (int, float)):
        dt = datetime.fromtimestamp(value, UTC)
    elif isinstance(value, datetime):
        dt = value
    else:
        dt = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def lifecycle_defaults() -> dict[str, Any]:
    """datasets/schemas/lifecycle.schema.ts defaults."""
    return {
        "archivable": True,
        "retrievable": False,
        "publishable": False,
        "isOnCentralDisk": True,
        "archiveStatusMessage": "datasetCreated",
        "retrieveStatusMessage": "",
        "archiveReturnMessage": {},
        "retrieveReturnMessage": {},
        "retrieveIntegrityCheck": False,
    }


@dataclass
class User:
    username: str
    password: str
    groups: list[str]
    email: str = ""
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])


@dataclass
class Token:
    value: str
    user: User
    expires: float


@dataclass
class Permissions:
    """The backend's group settings (env ADMIN_GROUPS, DELETE_GROUPS, ... and job config)."""

    admin_groups: set[str] = field(default_factory=lambda: {"admin"})
    delete_groups: set[str] = field(default_factory=lambda: {"archivemanager"})
    create_datablock_groups: set[str] = field(default_factory=lambda: {"ingestor"})
    """Besides admins, who may create datablocks (CREATE_DATASET_PRIVILEGED_GROUPS & co)."""
    lifecycle_groups: set[str] = field(default_factory=set)
    """UPDATE_DATASET_LIFECYCLE_GROUPS."""
    update_job_groups: set[str] = field(default_factory=set)
    """UPDATE_JOB_PRIVILEGED_GROUPS."""
    job_update_auth: dict[str, list[str]] = field(
        default_factory=lambda: {"archive": ["@archivemanager"], "retrieve": ["@archivemanager"]}
    )
    """Job config ``update.auth`` per job type (bare user name, ``@group``, ``#all``, ...)."""
    job_types: set[str] = field(default_factory=lambda: {"archive", "retrieve", "public"})


class Store:
    def __init__(self) -> None:
        self.users: dict[str, User] = {}
        self.tokens: dict[str, Token] = {}
        self.datasets: dict[str, dict[str, Any]] = {}
        self.origdatablocks: dict[str, dict[str, Any]] = {}
        self.datablocks: dict[str, dict[str, Any]] = {}
        self.jobs: dict[str, dict[str, Any]] = {}
        self.perms = Permissions()
        self.token_ttl: float = 3600.0

    # -- accounts -------------------------------------------------------------------------------

    def add_user(self, username: str, password: str, groups: list[str], email: str = "") -> User:
        user = User(username, password, list(groups), email or f"{username}@example.org")
        self.users[username] = user
        return user

    def login(self, username: str, password: str) -> Token | None:
        user = self.users.get(username)
        if user is None or not secrets.compare_digest(user.password, password):
            return None
        tok = Token("tok-" + secrets.token_urlsafe(24), user, time.time() + self.token_ttl)
        self.tokens[tok.value] = tok
        return tok

    def user_for(self, authorization: str | None) -> User | None:
        """JwtAuthGuard: a bad, missing or expired token just makes the caller anonymous."""
        if not authorization or not authorization.lower().startswith("bearer "):
            return None
        tok = self.tokens.get(authorization[7:].strip())
        if tok is None or tok.expires <= time.time():
            return None
        return tok.user

    def expire_tokens(self) -> None:
        self.tokens.clear()

    # -- permissions ------------------------------------------------------------------------------

    def is_admin(self, u: User) -> bool:
        return bool(self.perms.admin_groups & set(u.groups))

    def can_read_dataset(self, u: User, ds: dict[str, Any]) -> bool:
        groups = set(u.groups)
        return (
            self.is_admin(u)
            or ds.get("ownerGroup") in groups
            or bool(groups & set(ds.get("accessGroups") or []))
            or bool(ds.get("isPublished"))
        )

    def can_update_dataset(self, u: User, ds: dict[str, Any]) -> bool:
        return self.is_admin(u) or ds.get("ownerGroup") in set(u.groups)

    def can_update_lifecycle(self, u: User, ds: dict[str, Any]) -> bool:
        return self.can_update_dataset(u, ds) or bool(self.perms.lifecycle_groups & set(u.groups))

    def can_create_datablock(self, u: User) -> bool:
        return self.is_admin(u) or bool(self.perms.create_datablock_groups & set(u.groups))

    def can_delete_datablock(self, u: User) -> bool:
        return bool(self.perms.delete_groups & set(u.groups))

    def _job_auth_matches(self, u: User, job: dict[str, Any]) -> bool:
        for rule in self.perms.job_update_auth.get(job["type"], []):
            if rule == "#all":
                return True
            if rule == "#jobOwnerUser" and job.get("ownerUser") == u.username:
                return True
            if rule == "#jobOwnerGroup" and job.get("ownerGroup") in u.groups:
                return True
            if rule.startswith("@") and rule[1:] in u.groups:
                return True
            if rule == u.username:
                return True
        return False

    def can_update_job(self, u: User, job: dict[str, Any]) -> bool:
        return (
            self.is_admin(u)
            or bool(self.perms.update_job_groups & set(u.groups))
            or self._job_auth_matches(u, job)
        )

    def can_read_job(self, u: User, job: dict[str, Any]) -> bool:
        return (
            self.can_update_job(u, job)
            or job.get("ownerUser") == u.username
            or job.get("ownerGroup") in u.groups
            or bool(set(job.get("accessGroups") or []) & set(u.groups))
        )

    # -- datasets -------------------------------------------------------------------------------

    def add_dataset(
        self,
        *,
        pid: str | None,
        pid_prefix: str,
        owner_group: str,
        access_groups: list[str],
        type_: str,
        source_folder: str | None,
        lifecycle: dict[str, Any] | None,
        origdatablocks: list[list[dict[str, Any]]],
        chk_alg: str | None,
        extra: dict[str, Any],
    ) -> str:
        pid = pid or f"{pid_prefix}/{uuid.uuid4()}"
        now = now_iso()
        ds: dict[str, Any] = {
            "pid": pid,
            "type": type_,
            "ownerGroup": owner_group,
            "accessGroups": list(access_groups),
            "owner": "Owner Name",
            "contactEmail": "owner@example.org",
            "sourceFolder": source_folder if source_folder is not None else f"/data/{pid}",
            "size": 0,
            "packedSize": 0,
            "numberOfFiles": 0,
            "numberOfFilesArchived": 0,
            "creationTime": now,
            "datasetName": f"dataset {pid}",
            "isPublished": False,
            "keywords": [],
            "scientificMetadata": {},
            "datasetlifecycle": {**lifecycle_defaults(), **(lifecycle or {})},
            "createdBy": "ingestor",
            "updatedBy": "ingestor",
            "createdAt": now,
            "updatedAt": now,
            "version": "v3",
        }
        if type_ == "raw":
            ds.update({"principalInvestigator": "PI", "creationLocation": "facility", "proposalId": "p1"})
        else:
            ds.update({"investigator": "someone", "inputDatasets": [], "usedSoftware": []})
        ds.update(extra)
        self.datasets[pid] = ds
        for files in origdatablocks:
            self.add_origdatablock(pid, files, chk_alg)
        return pid

    def add_origdatablock(self, pid: str, files: list[dict[str, Any]], chk_alg: str | None) -> str:
        ds = self.datasets[pid]
        oid = str(uuid.uuid4())
        now = now_iso()
        dfl = [{**f, "time": iso(f["time"])} for f in files]
        doc: dict[str, Any] = {
            "_id": oid,
            "id": oid,
            "datasetId": pid,
            "size": sum(int(f["size"]) for f in dfl),
            "dataFileList": dfl,
            "ownerGroup": ds["ownerGroup"],
            "accessGroups": list(ds.get("accessGroups") or []),
            "isPublished": False,
            "createdBy": "ingestor",
            "updatedBy": "ingestor",
            "createdAt": now,
            "updatedAt": now,
        }
        if chk_alg:
            doc["chkAlg"] = chk_alg
        self.origdatablocks[oid] = doc
        ds["size"] = ds.get("size", 0) + doc["size"]
        ds["numberOfFiles"] = ds.get("numberOfFiles", 0) + len(dfl)
        return oid

    def origdatablocks_of(self, pid: str) -> list[dict[str, Any]]:
        return [o for o in self.origdatablocks.values() if o["datasetId"] == pid]

    def datablocks_of(self, pid: str) -> list[dict[str, Any]]:
        return [d for d in self.datablocks.values() if d["datasetId"] == pid]

    def render_dataset(
        self, ds: dict[str, Any], version: str, include: tuple[str, ...] | list[str] = ()
    ) -> dict[str, Any]:
        out = copy.deepcopy(ds)
        out["_id"] = ds["pid"]
        if version == "v4":
            for single, plural in (
                ("principalInvestigator", "principalInvestigators"),
                ("proposalId", "proposalIds"),
                ("sampleId", "sampleIds"),
                ("instrumentId", "instrumentIds"),
            ):
                if single in out:
                    value = out.pop(single)
                    out[plural] = [value] if value else []
            out.pop("investigator", None)
            if "origdatablocks" in include or "all" in include:
                out["origdatablocks"] = copy.deepcopy(self.origdatablocks_of(ds["pid"]))
            if "datablocks" in include or "all" in include:
                out["datablocks"] = copy.deepcopy(self.datablocks_of(ds["pid"]))
        else:
            out.setdefault("history", [])
        return out

    # -- datablocks -----------------------------------------------------------------------------

    def archive_id_taken(self, archive_id: str) -> bool:
        return any(d["archiveId"] == archive_id for d in self.datablocks.values())

    def add_datablock(self, ds: dict[str, Any], body: dict[str, Any], user: User) -> dict[str, Any]:
        did = str(uuid.uuid4())
        now = now_iso()
        doc = {
            "_id": did,
            "id": did,
            **{k: v for k, v in copy.deepcopy(body).items() if k not in ("ownerGroup", "accessGroups")},
            "datasetId": ds["pid"],
            "ownerGroup": ds["ownerGroup"],
            "accessGroups": list(ds.get("accessGroups") or []),
            "isPublished": False,
            "createdBy": user.username,
            "updatedBy": user.username,
            "createdAt": now,
            "updatedAt": now,
        }
        if ds.get("instrumentGroup"):
            doc["instrumentGroup"] = ds["instrumentGroup"]
        doc["dataFileList"] = [{**f, "time": iso(f["time"])} for f in doc["dataFileList"]]
        self.datablocks[did] = doc
        ds["packedSize"] = ds.get("packedSize", 0) + doc["packedSize"]
        ds["numberOfFilesArchived"] = ds.get("numberOfFilesArchived", 0) + len(doc["dataFileList"])
        return doc

    def remove_datablock(self, did: str) -> dict[str, Any]:
        doc = self.datablocks.pop(did)
        ds = self.datasets.get(doc["datasetId"])
        if ds is not None:
            ds["packedSize"] = max(0, ds.get("packedSize", 0) - doc["packedSize"])
            ds["numberOfFilesArchived"] = max(
                0, ds.get("numberOfFilesArchived", 0) - len(doc["dataFileList"])
            )
        return doc

    # -- jobs -----------------------------------------------------------------------------------

    def add_job(
        self,
        *,
        type_: str,
        job_params: dict[str, Any],
        owner_user: str | None,
        owner_group: str | None,
        contact_email: str | None,
        status_code: str = "jobSubmitted",
        status_message: str = "Job submitted.",
        job_id: str | None = None,
        created_by: str = "anonymous",
        config_version: str = "v4",
    ) -> dict[str, Any]:
        jid = job_id or str(uuid.uuid4())
        now = now_iso()
        job: dict[str, Any] = {
            "_id": jid,
            "id": jid,
            "type": type_,
            "ownerUser": owner_user,
            "ownerGroup": owner_group,
            "accessGroups": [],
            "contactEmail": contact_email,
            "statusCode": status_code,
            "statusMessage": status_message,
            "jobParams": copy.deepcopy(job_params),
            "configVersion": config_version,
            "jobResultObject": {},
            "isPublished": False,
            "createdBy": created_by,
            "updatedBy": created_by,
            "createdAt": now,
            "updatedAt": now,
        }
        self.jobs[jid] = job
        return job

    @staticmethod
    def render_job_v4(job: dict[str, Any]) -> dict[str, Any]:
        out = copy.deepcopy(job)
        for key in ("ownerUser", "ownerGroup", "contactEmail"):
            if out.get(key) is None:
                out.pop(key, None)
        return out

    @staticmethod
    def render_job_v3(job: dict[str, Any]) -> dict[str, Any]:
        """OutputJobV3Dto (jobs/jobs.controller.utils.ts mapJobClassV4toV3)."""
        params = copy.deepcopy(job.get("jobParams") or {})
        dataset_list = params.pop("datasetList", [])
        execution_time = params.pop("executionTime", None)
        if job.get("ownerUser"):
            params["username"] = job["ownerUser"]
        out: dict[str, Any] = {
            "_id": job["id"],
            "id": job["id"],
            "type": job["type"],
            "creationTime": job["createdAt"],
            "jobParams": params,
            "jobStatusMessage": job.get("statusCode"),
            "datasetList": dataset_list,
            "jobResultObject": copy.deepcopy(job.get("jobResultObject") or {}),
        }
        if job.get("contactEmail"):
            out["emailJobInitiator"] = job["contactEmail"]
        if execution_time:
            out["executionTime"] = execution_time
        return out
