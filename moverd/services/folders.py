"""Local folders as datasets: what ``moverd archive ./folder`` does on the embedded default.

Archiving a folder a second time must not make a second dataset: after a crash the same folder
(same path, same files with the same sizes and times) resumes its unfinished dataset, whose
committed datablocks are reused, and a folder that is archived already is reported as such.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import anyio

from ..app import App
from ..errors import UserError
from ..keys import safe_key
from ..models import ArchiveStatus, Dataset, FileEntry
from ..storage import Storage

FolderState = Literal["new", "resumed", "archived"]


@dataclass
class FolderDataset:
    dataset: Dataset
    source: Storage
    state: FolderState
    """``new``: registered now; ``resumed``: an unfinished dataset of the same folder and files;
    ``archived``: the folder, as it is, was archived already."""


def _same_files(a: list[FileEntry], b: list[FileEntry]) -> bool:
    def key(files: list[FileEntry]) -> list[tuple[str, int, float]]:
        return sorted((f.path, f.size, f.mtime) for f in files)

    return key(a) == key(b)


async def dataset_for_folder(app: App, folder: Path, *, new: bool = False) -> FolderDataset:
    """The dataset that archives ``folder``: an earlier one of the same folder with the same
    files (unless ``new``), else a new one in the catalog."""
    catalog = app.catalog
    if not catalog.local_folders:
        raise UserError(
            f"archiving a folder needs a catalog of local folders, such as the embedded 'local' one "
            f"(the configured one is {catalog.type_name!r}); give a dataset id instead"
        )
    if not await anyio.Path(folder).is_dir():
        raise UserError(f"folder {str(folder)!r} does not exist")
    folder = Path(await anyio.Path(folder).resolve())
    source = app.local_folder(folder, "source")
    files = [
        FileEntry(path=i.key, size=i.size, mtime=i.mtime, mode=i.mode, uid=i.uid, gid=i.gid)
        async for i in source.list("")
    ]
    if not files:
        raise UserError(f"folder {str(folder)!r} has no files to archive")
    if not new:
        for ds in reversed(await catalog.find_datasets(source_folder=str(folder))):
            if _same_files(await catalog.list_files(ds.pid), files):
                done = ds.lifecycle.get("archive_status") == ArchiveStatus.on_archive_disk.value
                return FolderDataset(ds, source, "archived" if done else "resumed")
    return FolderDataset(await catalog.create_dataset(files, source_folder=str(folder)), source, "new")


async def register_folder(app: App, folder: Path) -> tuple[Dataset, Storage]:
    """A new dataset of ``folder``, whatever was archived from it before (``--new``, ``job create``)."""
    found = await dataset_for_folder(app, folder, new=True)
    return found.dataset, found.source


def dataset_source(app: App, dataset: Dataset) -> tuple[Storage, str, bool]:
    """Where a catalogued dataset's files are, and whether that is the landing zone (which is
    cleaned after archiving; a folder archived in place never is).

    A local folder only counts for a catalog of local folders: another catalog's ``sourceFolder``
    names a path on the instrument's machine, which must never be mistaken for one here.
    """
    folder = dataset.source_folder
    if app.catalog.local_folders and folder and Path(folder).is_absolute() and Path(folder).is_dir():
        return app.local_folder(Path(folder), "source"), "", False
    prefix = safe_key(app.settings.archive.landing_prefix.format(pid=dataset.pid), allow_empty=True)
    return app.storage("landing"), prefix, True
