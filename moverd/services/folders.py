"""Folders and storage locations as datasets: what ``moverd archive ./folder`` (or
``landing:some/prefix``, ``s3://bucket/prefix``) does with a catalog of local folders.

Archiving a location a second time must not make a second dataset: after a crash the same
location (same files with the same sizes and times) resumes its unfinished dataset, whose
committed datablocks are reused, and a location that is archived already is reported as such.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import anyio

from ..app import App
from ..errors import UserError
from ..keys import safe_key
from ..models import ArchiveStatus, Dataset, FileEntry
from ..storage import Storage
from .archive import list_relative

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


_STORAGE_LOCATION = re.compile(r"^(?P<name>[A-Za-z0-9_.-]+):(?P<prefix>(?!//).*)$")
_BUCKET_URL = re.compile(r"^(?P<scheme>[a-z][a-z0-9+.-]*)://(?P<bucket>[^/]+)/?(?P<prefix>.*)$")


def parse_location(app: App, location: str) -> tuple[str, str] | None:
    """``(storage name, prefix)`` for ``<storage>:<prefix>`` naming a configured storage, or for
    ``<scheme>://bucket/prefix`` (``s3://``: a storage type's :attr:`~moverd.StorageType.url_scheme`)
    in a configured storage's bucket; None when ``location`` is neither (a folder or a dataset
    id). A URL that no configured storage holds is a user error."""
    m = _BUCKET_URL.match(location)
    schemes = {st.url_scheme for st in app.registry.storages.values() if st.url_scheme}
    if m and m["scheme"] in schemes:
        scheme, bucket, prefix = m["scheme"], m["bucket"], m["prefix"].strip("/")
        for name in sorted(app.settings.storages):
            type_name, options = app.settings.storage_options(name)
            st = app.registry.storages.get(type_name)
            if st is None or st.url_scheme != scheme or options.get("bucket") != bucket:
                continue
            own = str(options.get("prefix", "")).strip("/")
            if not own or prefix == own or prefix.startswith(own + "/"):
                return name, safe_key(prefix[len(own):].strip("/"), allow_empty=True)
        raise UserError(
            f"no configured {scheme} storage has the bucket {bucket!r} (with a prefix that {location!r} is in)")
    if (m := _STORAGE_LOCATION.match(location)) and m["name"] in app.settings.storages:
        return m["name"], safe_key(m["prefix"], allow_empty=True)
    return None


async def dataset_for_folder(app: App, folder: Path | str, *, new: bool = False) -> FolderDataset:
    """The dataset that archives ``folder`` (a local folder, or a location :func:`parse_location`
    knows): an earlier one of the same place with the same files (unless ``new``), else a new
    one in the catalog."""
    catalog = app.catalog
    if not catalog.local_folders:
        raise UserError(
            f"archiving a folder needs a catalog of local folders, such as the embedded 'local' one "
            f"(the configured one is {catalog.type_name!r}); give a dataset id instead"
        )
    location = parse_location(app, folder) if isinstance(folder, str) else None
    if location is not None:
        name, prefix = location
        source, label = app.storage(name), f"{name}:{prefix}"
    else:
        folder = Path(folder)
        if not await anyio.Path(folder).is_dir():
            raise UserError(f"folder {str(folder)!r} does not exist")
        folder = Path(await anyio.Path(folder).resolve())
        source, prefix, label = app.local_folder(folder, "source"), "", str(folder)
    files = [
        FileEntry(path=path, size=i.size, mtime=i.mtime, mode=i.mode, uid=i.uid, gid=i.gid)
        for path, i in (await list_relative(source, prefix)).items()
    ]
    if not files:
        raise UserError(f"{label!r} has no files to archive")
    if not new:
        for ds in reversed(await catalog.find_datasets(source_folder=label)):
            if _same_files(await catalog.list_files(ds.pid), files):
                done = ds.lifecycle.get("archive_status") == ArchiveStatus.on_archive_disk.value
                return FolderDataset(ds, source, "archived" if done else "resumed")
    return FolderDataset(await catalog.create_dataset(files, source_folder=label), source, "new")


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
    if app.catalog.local_folders and folder:
        if Path(folder).is_absolute() and Path(folder).is_dir():
            return app.local_folder(Path(folder), "source"), "", False
        if (location := parse_location(app, folder)) is not None:
            # Archived from a storage location by hand: its files stay where they are.
            return app.storage(location[0]), location[1], False
    return app.storage("landing"), landing_prefix(app, dataset.pid), True


def landing_prefix(app: App, pid: str) -> str:
    """The folder of the landing storage where dataset ``pid``'s files are uploaded to."""
    return safe_key(app.settings.archive.landing_prefix.format(pid=pid), allow_empty=True)
