"""The SciCat catalog: moverd's :class:`~moverd.Catalog` over SciCat's REST API."""

from __future__ import annotations

import json
import logging
from typing import Any
from urllib.parse import quote

import httpx

from moverd import (
    Catalog,
    CatalogError,
    Datablock,
    Dataset,
    Download,
    FileEntry,
    Job,
    JobDataset,
    JobOwner,
    JobType,
    LifecycleUpdate,
    UnknownDatasetError,
    UnknownJobError,
)

from . import mapping
from .http import SciCatHTTP, error_for, message_of, route_missing
from .options import SciCatOptions

log = logging.getLogger("moverd_catalog_scicat")

V4_PAGE = 100
"""OrigDatablocks per page on the v4 filter route (the backend's default limit is 100)."""


def seg(value: str) -> str:
    """One path segment: a PID's ``/`` is sent as ``%2F`` (an unencoded slash is a 404)."""
    return quote(value, safe="")


def _json(response: httpx.Response, what: str) -> Any:
    try:
        return response.json()
    except ValueError:
        raise CatalogError(f"SciCat {what}: answer is not JSON: {response.text[:100]!r}") from None


class SciCatCatalog(Catalog):
    type_name = "scicat"

    def __init__(self, opts: SciCatOptions) -> None:
        self.opts = opts
        self.http = SciCatHTTP(opts)

    async def aclose(self) -> None:
        await self.http.aclose()

    async def check(self) -> None:
        """Log in (raises CatalogError when SciCat is unreachable or refuses the account)."""
        await self.http.login()

    # -- jobs -----------------------------------------------------------------------------------

    def _job_path(self, job_id: str) -> str:
        return f"{self.opts.effective_jobs_prefix}/jobs/{seg(job_id)}"

    @staticmethod
    def _unknown_job(response: httpx.Response, job_id: str) -> bool:
        if response.status_code == 404:
            return not route_missing(response)
        return response.status_code == 400 and "invalid job id" in message_of(response).lower()

    async def get_job(self, job_id: str) -> Job:
        path = self._job_path(job_id)
        response = await self.http.request("GET", path)
        if self._unknown_job(response, job_id):
            raise UnknownJobError(f"SciCat has no job {job_id!r}")
        if response.status_code != 200:
            raise error_for(response, f"GET {path}")
        return mapping.job_from_scicat(job_id, _json(response, f"GET {path}"))

    async def set_job_status(
        self, job_id: str, status: str, message: str = "", downloads: list[Download] | None = None
    ) -> None:
        path = self._job_path(job_id)
        result = None if downloads is None else mapping.job_result(downloads)
        body = mapping.job_status_body(self.opts.job_api, status, message, result)
        response = await self.http.request("PATCH", path, json=body)
        if self._unknown_job(response, job_id):
            raise UnknownJobError(f"SciCat has no job {job_id!r}")
        if response.status_code not in (200, 201, 204):
            raise error_for(response, f"PATCH {path}")

    async def create_job(self, type_: JobType, datasets: list[JobDataset], job_id: str | None = None,
                         owner: JobOwner | None = None) -> Job:
        """A job as the reference's finalize posts it (v4: owner fields at the top, the datasets in
        ``jobParams``; v3: ``datasetList`` at the top). SciCat picks the id: ``job_id`` is ignored."""
        owner = owner or JobOwner()
        dataset_list = [{"pid": d.pid, "files": list(d.files)} for d in datasets]
        params: dict[str, Any] = {"username": owner.user} if owner.user else {}
        body: dict[str, Any] = {"type": type_.value}
        if self.opts.job_api == "v4":
            body["jobParams"] = {**params, "datasetList": dataset_list}
            body.update({k: v for k, v in (("ownerUser", owner.user), ("ownerGroup", owner.group),
                                           ("contactEmail", owner.email)) if v})
        else:
            body.update({"datasetList": dataset_list, "jobParams": params})
            if owner.email:
                body["emailJobInitiator"] = owner.email
        path = f"{self.opts.effective_jobs_prefix}/jobs"
        response = await self.http.request("POST", path, json=body)
        if response.status_code not in (200, 201):
            raise error_for(response, f"POST {path}")
        doc = _json(response, f"POST {path}")
        new_id = doc.get("id") or doc.get("_id") if isinstance(doc, dict) else None
        if not isinstance(new_id, str):
            raise CatalogError(f"SciCat POST {path}: the answer names no job id: {str(doc)[:100]!r}")
        return mapping.job_from_scicat(new_id, doc)

    # -- datasets -------------------------------------------------------------------------------

    def _dataset_path(self, pid: str, prefix: str | None = None) -> str:
        return f"{prefix or self.opts.api_prefix}/datasets/{seg(pid)}"

    async def get_dataset(self, pid: str) -> Dataset:
        path = self._dataset_path(pid)
        response = await self.http.request("GET", path)
        if response.status_code == 404 and not route_missing(response):
            raise UnknownDatasetError(f"SciCat has no dataset {pid!r}")
        if response.status_code != 200:
            raise error_for(response, f"GET {path}")
        return mapping.dataset_from_scicat(pid, _json(response, f"GET {path}"))

    async def list_files(self, pid: str) -> list[FileEntry]:
        blocks = await (self._origdatablocks_v4(pid) if self.opts.api_v4 else self._origdatablocks_v3(pid))
        return mapping.files_from_origdatablocks(pid, blocks)

    async def _origdatablocks_v3(self, pid: str) -> Any:
        path = f"{self._dataset_path(pid)}/origdatablocks"
        response = await self.http.request("GET", path)
        if response.status_code == 404 and not route_missing(response):
            raise UnknownDatasetError(f"SciCat has no dataset {pid!r}")
        if response.status_code != 200:
            raise error_for(response, f"GET {path}")
        return _json(response, f"GET {path}")

    async def _origdatablocks_v4(self, pid: str) -> list[Any]:
        path = f"{self.opts.api_prefix}/origdatablocks"
        blocks: list[Any] = []
        while True:
            flt = {"where": {"datasetId": pid}, "limits": {"limit": V4_PAGE, "skip": len(blocks)}}
            response = await self.http.request("GET", path, params={"filter": json.dumps(flt)})
            if response.status_code != 200:
                raise error_for(response, f"GET {path}")
            page = _json(response, f"GET {path}")
            if not isinstance(page, list):
                raise CatalogError(f"SciCat GET {path}: expected a list, got {str(page)[:100]!r}")
            blocks += page
            if len(page) < V4_PAGE:
                break
        if not blocks:
            await self.get_dataset(pid)  # the filter route cannot say "no such dataset"
        return [b for b in blocks if not isinstance(b, dict) or b.get("datasetId", pid) == pid]

    async def update_lifecycle(self, pid: str, update: LifecycleUpdate) -> None:
        body = mapping.lifecycle_body(update, self.opts.storage_location)
        if not body:
            return  # SciCat refuses an empty lifecycle DTO; nothing to change anyway
        path = f"{self._dataset_path(pid)}/datasetlifecycle"
        response = await self.http.request("PATCH", path, json=body)
        if response.status_code == 404 and not route_missing(response):
            raise UnknownDatasetError(f"SciCat has no dataset {pid!r}")
        if response.status_code not in (200, 201, 204):
            raise error_for(response, f"PATCH {path}")

    # -- datablocks -----------------------------------------------------------------------------

    def _datablocks_path(self, pid: str) -> str:
        return f"{self._dataset_path(pid, self.opts.datablocks_prefix)}/datablocks"

    async def _datablock_docs(self, pid: str) -> list[Any]:
        path = self._datablocks_path(pid)
        response = await self.http.request("GET", path)
        if response.status_code == 404 and not route_missing(response):
            raise UnknownDatasetError(f"SciCat has no dataset {pid!r}")
        if response.status_code != 200:
            raise error_for(response, f"GET {path}")
        docs = _json(response, f"GET {path}")
        if not isinstance(docs, list):
            raise CatalogError(f"SciCat GET {path}: expected a list, got {str(docs)[:100]!r}")
        return docs

    async def register_datablock(self, pid: str, datablock: Datablock) -> str:
        body = mapping.datablock_body(datablock)
        if not body["dataFileList"]:
            raise CatalogError(f"datablock {datablock.archive_id}: SciCat needs at least one file")
        path = self._datablocks_path(pid)
        response = await self.http.request("POST", path, json=body)
        if response.status_code in (200, 201):
            doc = _json(response, f"POST {path}")
            new_id = (doc.get("id") or doc.get("_id")) if isinstance(doc, dict) else None
            if not new_id:
                raise CatalogError(f"SciCat POST {path}: answer without the datablock's id")
            return str(new_id)
        if response.status_code == 404 and not route_missing(response):
            raise UnknownDatasetError(f"SciCat has no dataset {pid!r}")
        if response.status_code in (409, 500):
            # A duplicate archiveId (unique index) answers 500 on this route: an earlier attempt
            # (a crash, or a lost answer) registered it. Never register twice; reuse it.
            existing = await self._existing(pid, body)
            if existing is not None:
                return existing
        raise error_for(response, f"POST {path}")

    async def _existing(self, pid: str, body: dict[str, Any]) -> str | None:
        for doc in await self._datablock_docs(pid):
            if isinstance(doc, dict) and doc.get("archiveId") == body["archiveId"]:
                did = str(doc.get("id") or doc.get("_id"))
                if not mapping.same_datablock(doc, body):
                    raise CatalogError(
                        f"datablock {body['archiveId']} is already registered for dataset {pid} "
                        f"(SciCat id {did}) with other sizes or files: size {doc.get('size')} vs "
                        f"{body['size']}, packedSize {doc.get('packedSize')} vs {body['packedSize']}"
                    )
                log.info("datablock %s of %s was already registered (id %s)", body["archiveId"], pid, did)
                return did
        return None

    async def list_datablocks(self, pid: str) -> list[Datablock]:
        return mapping.datablocks_from_scicat(pid, await self._datablock_docs(pid))

    async def delete_datablock(self, pid: str, catalog_id: str) -> None:
        path = f"{self._datablocks_path(pid)}/{seg(catalog_id)}"
        response = await self.http.request("DELETE", path)
        if response.status_code == 404 and not route_missing(response):
            log.info("datablock %s of %s was already gone", catalog_id, pid)
            return
        if response.status_code not in (200, 204):
            raise error_for(response, f"DELETE {path}")
