"""A strict SciCat-compatible HTTP server for tests (see ``server.py`` and ``fixtures.py``)."""

from .app import Call
from .server import ARCHIVER, INGESTOR, OWNER, OWNER_GROUP, SciCatServer

__all__ = ["ARCHIVER", "INGESTOR", "OWNER", "OWNER_GROUP", "Call", "SciCatServer"]
