"""Checksum algorithms, looked up by name.

The per-file checksum goes to the catalog (md5 by default: SciCat's ``chkAlg``). The
whole-datablock checksum only has to catch corruption on the way to and from the LTS, so it is the
fastest one available (xxh3-128), leaving the CPU to md5.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol


class Hasher(Protocol):
    """What ``hashlib`` objects already are."""

    def update(self, data: bytes | memoryview, /) -> None: ...

    def hexdigest(self) -> str: ...


HasherFactory = Callable[[], Hasher]

DATABLOCK_CHECKSUM = "xxh3_128"
"""The algorithm of the whole-datablock checksum used for read-back verification."""

THREAD_HASH_MIN = 256 * 1024
"""Chunks at least this big are hashed in a worker thread (hashlib releases the GIL); smaller
ones cost less to hash inline than to hand to a thread."""
