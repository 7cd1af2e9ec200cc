"""Archive, retrieve and verify as plain async functions: no Prefect, no HTTP, no CLI.

The CLI, the daemon and the Prefect flows are thin layers over these.
"""

from .archive import ArchiveResult, archive_dataset, check_source
from .retrieve import RetrieveResult, retrieve_dataset
from .verify import VerifyResult, verify_dataset

__all__ = [
    "ArchiveResult", "RetrieveResult", "VerifyResult", "archive_dataset", "check_source",
    "retrieve_dataset", "verify_dataset",
]
