"""Checksum algorithms, looked up by name.

The per-file checksum goes to the catalog (md5 by default: SciCat's ``chkAlg``). The
whole-datablock checksum only has to catch corruption on the way to and from the LTS, so it is the
fastest one available (xxh3-128), leaving the CPU to md5.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Callable, Sequence
from typing import Protocol

try:
    from . import _md5mb
except ImportError:  # built without a C compiler: hashlib's md5 serves
    _md5mb = None  # type: ignore[assignment]


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


MULTI_BUFFER_MD5: HasherFactory | None = _md5mb.md5 if _md5mb is not None and _md5mb.lanes() > 1 else None
"""md5 whose streams :func:`update_many` hashes side by side in vector lanes, where the CPU has
them: 16 with AVX-512 (~4 GiB/s against hashlib's ~0.7 on 2 MiB files), 8 with AVX2; else None.
The archive pipeline hashes files' md5 with it; the registry's ``md5`` stays hashlib's, which is
faster for one stream.

MD5 is one long dependency chain, so one stream cannot go faster than ~5 cycles per byte; an
archive hashes hundreds of files, and those can share the vector lanes."""

HASH_LANES: int = _md5mb.lanes() if MULTI_BUFFER_MD5 is not None else 1
"""Streams :func:`update_many` hashes at once: a call with fewer leaves lanes idle."""


def hashes_together(hasher: Hasher) -> bool:
    """Whether ``hasher`` gains from :func:`update_many` with other streams: then the pipeline
    hands its chunks to the datablock writer, which hashes all waiting files' chunks in one call,
    instead of hashing each file in its own reader."""
    return MULTI_BUFFER_MD5 is not None and type(hasher) is MULTI_BUFFER_MD5


def update_many(pairs: Sequence[tuple[Hasher, bytes | memoryview]]) -> None:
    """``hasher.update(data)`` for every pair, in order for each hasher; streams of
    :data:`MULTI_BUFFER_MD5` side by side, with the GIL released (call it in a worker thread)."""
    if _md5mb is not None:
        _md5mb.update_many(pairs)
    else:
        for hasher, data in pairs:
            hasher.update(data)


def composite_sha256(part_checksums: list[str]) -> str:
    """S3's composite checksum of a multipart upload: SHA-256 over the parts' raw digests, in
    part order, base64 (without the ``-N`` suffix S3 adds). Here, not in the daemon, so that
    ``moverd upload`` and the upload API share it without the client importing the daemon.
    A value that is not a base64 SHA-256 is a ValueError."""
    h = hashlib.sha256()
    for value in part_checksums:
        try:
            raw = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raw = b""
        if len(raw) != 32:
            raise ValueError(f"{value!r} is not a base64 SHA-256 checksum")
        h.update(raw)
    return base64.b64encode(h.digest()).decode()
