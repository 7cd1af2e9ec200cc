"""Prefect artifact keys for moverd's artifacts.

Prefect accepts only lowercase letters, digits and dashes in a key, and dataset PIDs and job ids
have slashes, dots and capitals (``20.500.11935/ABC``). The readable part is the id folded into
that alphabet; when folding changed it, a short hash of the exact id follows, so that two ids that
fold alike (``A/b`` and ``a-b``) never share one artifact's history.
"""

from __future__ import annotations

import hashlib
import re

MAX_KEY = 120
"""Long enough for a PID and a job UUID; the UI shows keys in one line."""


def artifact_key(kind: str, ident: str) -> str:
    """``<kind>-<ident folded>``, e.g. ``archive-local-6cdb1c96-...-3f2a9c1e``."""
    folded = re.sub(r"[^a-z0-9]+", "-", ident.lower()).strip("-")
    prefix = re.sub(r"[^a-z0-9]+", "-", kind.lower()).strip("-")
    key = f"{prefix}-{folded}" if folded else prefix
    if folded != ident or len(key) > MAX_KEY:
        digest = hashlib.sha256(ident.encode()).hexdigest()[:8]
        key = f"{key[:MAX_KEY - 9].rstrip('-')}-{digest}"
    return key
