"""moverd catalog plugin for SciCat: jobs, dataset lifecycle, OrigDatablocks, Datablocks.

Registers the catalog type ``scicat``; see ``docs/catalog-scicat.md``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .catalog import SciCatCatalog

from moverd import CatalogType, Context, hookimpl

from .options import SciCatOptions

__all__ = ["SciCatOptions", "register_catalogs"]


def _create(options: Any, context: Context) -> SciCatCatalog:
    # Imported here so that loading plugins stays cheap for commands that never talk to SciCat.
    from .catalog import SciCatCatalog

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


def __getattr__(name: str) -> Any:
    if name == "SciCatCatalog":  # the heavy module, on first use
        from .catalog import SciCatCatalog

        return SciCatCatalog
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
