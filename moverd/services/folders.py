"""Local folders as datasets: what ``moverd archive ./folder`` does on the embedded default."""

from __future__ import annotations

from pathlib import Path

import anyio

from ..app import App
from ..builtin.local_catalog import LocalCatalog
from ..errors import UserError
from ..keys import safe_key
from ..models import Dataset, FileEntry
from ..storage import Storage


async def register_folder(app: App, folder: Path) -> tuple[Dataset, Storage]:
    """Create a local-catalog dataset from the files of ``folder``; return it and its source."""
    catalog = app.catalog
    if not isinstance(catalog, LocalCatalog):
        raise UserError(
            f"archiving a folder needs the local catalog (the configured one is {catalog.type_name!r}); "
            "give a dataset id instead"
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
    return await catalog.create_dataset(files, source_folder=str(folder)), source


def dataset_source(app: App, dataset: Dataset) -> tuple[Storage, str, bool]:
    """Where a catalogued dataset's files are, and whether that is the landing zone (which is
    cleaned after archiving; a folder archived in place never is).

    A local folder only counts for the local catalog: another catalog's ``sourceFolder`` names a
    path on the instrument's machine, which must never be mistaken for one here.
    """
    folder = dataset.source_folder
    if isinstance(app.catalog, LocalCatalog) and folder and Path(folder).is_absolute() and Path(folder).is_dir():
        return app.local_folder(Path(folder), "source"), "", False
    prefix = safe_key(app.settings.archive.landing_prefix.format(pid=dataset.pid), allow_empty=True)
    return app.storage("landing"), prefix, True
