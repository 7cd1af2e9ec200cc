"""The Prefect layer: catalog jobs as flow runs, datasets as subflows, datablocks as tasks.

It only wraps the core services (:mod:`moverd.services.jobs`) so that operators can watch every
transfer in the Prefect UI; the bytes never pass through Prefect.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .jobs import archive_job_flow, job_flow, retrieve_job_flow

__all__ = ["archive_job_flow", "job_flow", "retrieve_job_flow"]


def __getattr__(name: str) -> Any:
    """The flows, imported on first use (PEP 562): the layer's settings (:mod:`.settings`), which
    every command reads, must not cost the second and ~40 MiB that importing Prefect does."""
    if name in __all__:
        from . import jobs

        return getattr(jobs, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
