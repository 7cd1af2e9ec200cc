"""The catalog contract: where jobs, datasets, their files and their datablocks are recorded.

The embedded default is :mod:`moverd.local_catalog` (SQLite); the SciCat plugin implements the same
methods against SciCat's REST API. Methods raise :class:`~moverd.errors.UnknownJobError` /
:class:`~moverd.errors.UnknownDatasetError` for unknown ids and
:class:`~moverd.errors.CatalogError` when the catalog fails.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from .errors import UserError
from .models import Datablock, Dataset, Download, FileEntry, Job, JobDataset, JobOwner, JobType, LifecycleUpdate


class Catalog(ABC):
    """Required methods are abstract. Optional capabilities, which the embedded local catalog has:
    datasets made from a folder of this machine (``moverd archive ./folder``), announced by
    ``local_folders = True`` with :meth:`create_dataset` and :meth:`find_datasets`; and listings
    of every dataset and job (:meth:`list_datasets`, :meth:`list_jobs`), and jobs of its own
    (:meth:`create_job`). Their defaults refuse with a user error that says so."""

    type_name: str = ""
    name: str = "catalog"
    local_folders: bool = False
    """A dataset's ``source_folder`` names a folder on this machine, which the archive reads in
    place. False for a catalog like SciCat, whose ``sourceFolder`` is a path on the instrument's
    machine and must never be mistaken for one here."""

    @abstractmethod
    async def get_job(self, job_id: str) -> Job: ...

    @abstractmethod
    async def set_job_status(
        self, job_id: str, status: str, message: str = "", downloads: list[Download] | None = None
    ) -> None:
        """Record the job's status code and a message; for a retrieve job that ended, also its
        ``downloads`` (the links it hands out), in the catalog's own layout."""

    @abstractmethod
    async def get_dataset(self, pid: str) -> Dataset: ...

    @abstractmethod
    async def list_files(self, pid: str) -> list[FileEntry]:
        """The dataset's files as registered at ingest (SciCat: its OrigDatablocks)."""

    @abstractmethod
    async def update_lifecycle(self, pid: str, update: LifecycleUpdate) -> None:
        """Merge the set fields of ``update`` into the dataset's lifecycle; touch nothing else."""

    @abstractmethod
    async def register_datablock(self, pid: str, datablock: Datablock) -> str:
        """Record a verified datablock; return the catalog's id for it."""

    @abstractmethod
    async def list_datablocks(self, pid: str) -> list[Datablock]: ...

    @abstractmethod
    async def delete_datablock(self, pid: str, catalog_id: str) -> None: ...

    async def create_dataset(self, files: list[FileEntry], *, source_folder: str) -> Dataset:
        """Register a new dataset of ``files``, found in the local folder ``source_folder``."""
        raise UserError(
            f"the {self.type_name or self.name!r} catalog cannot make datasets from a folder; "
            "give the id of a dataset it has"
        )

    async def find_datasets(self, *, source_folder: str) -> list[Dataset]:
        """The datasets made from ``source_folder``, oldest first (to resume an interrupted one)."""
        return []

    async def list_datasets(self) -> list[Dataset]:
        """Every dataset, oldest first (``moverd datasets``)."""
        raise UserError(f"the {self.type_name or self.name!r} catalog does not list its datasets here; use its own UI")

    async def create_job(self, type_: JobType, datasets: list[JobDataset], job_id: str | None = None,
                         owner: JobOwner | None = None) -> Job:
        """A new job in the catalog (``moverd job create``, the upload API's finalize)."""
        raise UserError(
            f"the {self.type_name or self.name!r} catalog creates its jobs itself (and calls the daemon); "
            "create them there"
        )

    async def list_jobs(self, status: str | None = None) -> list[Job]:
        """Every job (with ``status``: only those), oldest first (``moverd job list``)."""
        raise UserError(f"the {self.type_name or self.name!r} catalog does not list its jobs here; use its own UI")

    async def aclose(self) -> None:
        return None

    async def check(self) -> None:
        """Raise if the catalog cannot be reached (readiness probes, ``config check``)."""
        return None
