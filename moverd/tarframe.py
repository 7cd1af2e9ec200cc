"""POSIX.1-2001 (pax) tar framing, one member at a time.

Header bytes come from the standard library's ``TarInfo.tobuf`` (long and unicode names, sizes
over 8 GiB, mode/uid/gid/mtime are its business); moverd never builds a ``TarFile``, which would
keep every member in memory, and streams the data itself.
"""

from __future__ import annotations

import tarfile

BLOCK = tarfile.BLOCKSIZE  # 512
RECORD = tarfile.RECORDSIZE  # 10240
DEFAULT_MODE = 0o644
_ZEROS = bytes(RECORD)


def member_header(
    path: str, size: int, *, mtime: float = 0, mode: int | None = None, uid: int | None = None,
    gid: int | None = None,
) -> bytes:
    """The header block(s) of a regular file member (a pax extended header when needed)."""
    info = tarfile.TarInfo(path)
    info.size = size
    info.mtime = int(mtime)
    info.mode = DEFAULT_MODE if mode is None else mode & 0o7777
    info.uid = uid or 0
    info.gid = gid or 0
    info.type = tarfile.REGTYPE
    return info.tobuf(tarfile.PAX_FORMAT, encoding="utf-8", errors="surrogateescape")


def padding(size: int) -> memoryview:
    """Zero bytes that complete a member's last 512-byte block."""
    return memoryview(_ZEROS)[: -size % BLOCK]


def end_of_archive(offset: int) -> memoryview:
    """Two zero blocks, then zeros up to a whole record, as ``tarfile`` and GNU tar write."""
    end = offset + 2 * BLOCK
    end += -end % RECORD
    return memoryview(bytes(end - offset))
