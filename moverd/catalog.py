"""The catalog contract: where jobs, datasets, their files and their datablocks are recorded.

The embedded default is :mod:`moverd.local_catalog` (SQLite); the SciCat plugin implements the same
methods against SciCat's REST API. Methods raise :class:`~moverd.errors.UnknownJobError` /
:class:`~moverd.errors.UnknownDatasetError` for unknown ids and
:class:`~moverd.errors.CatalogError` when the catalog fails.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from .models import Datablock, Dataset, FileEntry, Job, LifecycleUpdate


class Catalog(ABC):
    type_name: str = ""
    name: str = "catalog"

    @abstractmethod
    async def get_job(self, job_id: str) -> Job: ...

    @abstractmethod
    async def set_job_status(
        self, job_id: str, status: str, message: str = "", result: dict[str, Any] | None = None
    ) -> None:
        """Record the job's status code, a message, and optionally its result object."""

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

    async def aclose(self) -> None:
        return None

    async def check(self) -> None:
        """Raise if the catalog cannot be reached (readiness probes, ``config check``)."""
        return None
