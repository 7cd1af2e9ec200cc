"""Free space of the share, for the back-pressure the core applies before writing a datablock.

``f_bavail`` (not ``f_bfree``) because the blocks reserved for root are not ours to fill: the
daemon may run as root, and filling the reserve would starve the system, not only moverd.
"""

from __future__ import annotations

import os


def free_bytes(path: str) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize
