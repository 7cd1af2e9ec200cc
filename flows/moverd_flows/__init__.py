"""The Prefect layer: catalog jobs as flow runs, datasets as subflows, datablocks as tasks.

It only wraps the core services (:mod:`moverd.services.jobs`) so that operators can watch every
transfer in the Prefect UI; the bytes never pass through Prefect.
"""

from .jobs import archive_job_flow, job_flow, retrieve_job_flow

__all__ = ["archive_job_flow", "job_flow", "retrieve_job_flow"]
