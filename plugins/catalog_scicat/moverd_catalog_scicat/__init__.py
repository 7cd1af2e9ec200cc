"""moverd catalog plugin for SciCat: jobs, dataset lifecycle, OrigDatablocks, Datablocks.

Registers the catalog type ``scicat``; see ``docs/catalog-scicat.md``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from moverd import CatalogType, Context, hookimpl

from .catalog import SciCatCatalog
from .options import SciCatOptions

__all__ = ["SciCatCatalog", "SciCatOptions", "register_catalogs"]


def _create(options: Any, context: Context) -> SciCatCatalog:
    return SciCatCatalog(options)


@hookimpl
def register_catalogs(register: Callable[[CatalogType], None]) -> None:
    register(
        CatalogType(
            name="scicat",
            options=SciCatOptions,
            create=_create,
            description="SciCat backend over its REST API (jobs, lifecycle, OrigDatablocks, Datablocks)",
        )
    )
