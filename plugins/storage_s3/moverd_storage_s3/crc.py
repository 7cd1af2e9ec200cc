"""The S3 checksum (CRC32) of an object, computed from its parts as they are uploaded.

Every part is hashed once, in a worker thread beside the other parts' uploads (zlib releases the
GIL), and sent with ``x-amz-checksum-crc32`` so that the server checks it on receipt. The whole
object's value is then combined from the parts' values, as zlib's ``crc32_combine`` does (which
Python's zlib does not expose): no second pass over the bytes, and the full-object value is what
the server reports for the object (``ChecksumType=FULL_OBJECT``), which needs no restore to read.

A server without full-object checksums for multipart uploads reports a COMPOSITE value instead:
the CRC32 of the parts' digests concatenated, suffixed ``-N``. :func:`composite` computes that.
"""

from __future__ import annotations

import base64
import zlib

ALGORITHM = "CRC32"
"""The algorithm moverd sends: the one every S3 implementation that has additional checksums
supports, full-object for multipart uploads, and in the standard library."""
PREFIX = "crc32:"
"""How a datablock records its object checksum: ``crc32:<base64 of the 4 big-endian bytes>``
(``-N`` appended for a composite value), as S3 reports it."""

_POLY = 0xEDB88320


def crc32(data: bytes | bytearray | memoryview) -> int:
    return zlib.crc32(data)


def _gf2_times(mat: list[int], vec: int) -> int:
    out = 0
    i = 0
    while vec:
        if vec & 1:
            out ^= mat[i]
        vec >>= 1
        i += 1
    return out


def _gf2_square(mat: list[int]) -> list[int]:
    return [_gf2_times(mat, mat[n]) for n in range(32)]


def combine(crc1: int, crc2: int, len2: int) -> int:
    """The CRC32 of ``a + b`` from ``crc32(a)``, ``crc32(b)`` and ``len(b)`` (zlib's
    ``crc32_combine``): ``crc1`` times x^(8·len2) in GF(2), the operator squared bit by bit."""
    op = [_POLY] + [1 << (n - 1) for n in range(1, 32)]  # appends one zero bit
    for _ in range(3):
        op = _gf2_square(op)  # ... one zero byte
    while len2 > 0:
        if len2 & 1:
            crc1 = _gf2_times(op, crc1)
        len2 >>= 1
        if len2:
            op = _gf2_square(op)
    return crc1 ^ crc2


def encode(value: int) -> str:
    """The header form: base64 of the 4 big-endian bytes."""
    return base64.b64encode(value.to_bytes(4, "big")).decode()


def full_object(parts: list[tuple[int, int]]) -> int:
    """The whole object's CRC32 from its parts' ``(crc, size)`` in order."""
    value = 0
    for part_crc, size in parts:
        value = combine(value, part_crc, size)
    return value


def composite(parts: list[tuple[int, int]]) -> str:
    """The COMPOSITE value S3 reports for a multipart object: CRC32 of the part digests, ``-N``."""
    digest = zlib.crc32(b"".join(c.to_bytes(4, "big") for c, _ in parts))
    return f"{encode(digest)}-{len(parts)}"
