"""Offline (HSM) files: how to tell them, and how long to wait for their recall.

An HSM keeps the inode of a migrated file but releases its data blocks to tape, so the file shows
its full size with no block allocated. Reading it would block in the kernel for as long as the
recall takes (minutes to hours) with no deadline; waiting on ``st_blocks`` instead keeps the wait
bounded and observable. A sparse file that was never written looks the same: it would wait the full
``offline_timeout`` and fail, so a source with deliberately all-hole files should set it low.
"""

from __future__ import annotations

import os


def is_offline(st: os.stat_result) -> bool:
    """True when the file has bytes but none of them are resident on disk."""
    return st.st_size > 0 and st.st_blocks == 0
