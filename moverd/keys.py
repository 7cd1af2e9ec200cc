"""Validation of storage keys and member paths.

Every key reaches a storage plugin only after :func:`safe_key` accepted it, so plugins can join
keys to their root without re-checking for ``..`` or absolute paths (they still refuse symlinks
that leave the root, which only they can see).
"""

from __future__ import annotations

import functools
import re

from .errors import UnsafePathError

_MAX_KEY_BYTES = 4096
_SURROGATE = re.compile(r"[\ud800-\udfff]")
# Control characters, and the lone surrogates that stand for the bytes of a file name that is not
# valid UTF-8 (``os.fsdecode``'s surrogateescape): no catalog can store such a name as text.
_CONTROL = re.compile(r"[\x00-\x1f\x7f\ud800-\udfff]")


def safe_key(key: str, *, allow_empty: bool = False) -> str:
    """Return ``key`` normalised (no leading ``./``, no doubled or trailing slashes) or raise.

    Refused: absolute paths, ``..`` components, NUL and other control characters that no
    storage handles the same way, names that are not valid UTF-8 (shown with their bytes
    escaped), and empty keys unless ``allow_empty`` (a prefix may be empty).
    """
    # Each file's key passes here several times on its way (pipeline, storage, index): the
    # check's result is kept for the keys seen last; a refused key raises every time.
    if not isinstance(key, str):
        raise UnsafePathError(f"key must be a string, not {type(key).__name__}")
    return _check(key, allow_empty)


@functools.lru_cache(maxsize=8192)
def _check(key: str, allow_empty: bool) -> str:
    if _CONTROL.search(key):  # every key of every file passes here: one regex scan, not a loop
        if "\x00" in key:
            raise UnsafePathError(f"unsafe key {key!r}: contains NUL")
        if _SURROGATE.search(key):
            shown = key.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
            raise UnsafePathError(
                f"unsafe key '{shown}': the name is not valid UTF-8 (its undecodable bytes are shown as "
                "\\xNN); rename the file"
            )
        raise UnsafePathError(f"unsafe key {key!r}: contains a control character")
    if key.startswith("/") or key.startswith("\\"):
        raise UnsafePathError(f"unsafe key {key!r}: absolute paths are not allowed")
    if "\\" in key:
        raise UnsafePathError(f"unsafe key {key!r}: backslashes are not allowed")
    parts = [p for p in key.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafePathError(f"unsafe key {key!r}: '..' is not allowed")
    norm = "/".join(parts)
    if not norm and not allow_empty:
        raise UnsafePathError(f"unsafe key {key!r}: empty")
    if len(norm.encode("utf-8", "surrogateescape")) > _MAX_KEY_BYTES:
        raise UnsafePathError(f"unsafe key {key[:60]!r}...: longer than {_MAX_KEY_BYTES} bytes")
    return norm


def join_key(prefix: str, key: str) -> str:
    """Join a (safe) prefix and a relative key into one safe key."""
    prefix = safe_key(prefix, allow_empty=True)
    key = safe_key(key)
    return f"{prefix}/{key}" if prefix else key


def path_safe_id(pid: str) -> str:
    """Turn a catalog id (``20.500.11935/abc``) into one path component, reversibly.

    Percent-encoding keeps it injective: two ids never map to the same folder.
    """
    from urllib.parse import quote

    out = quote(pid, safe="-_.~+=,@")
    if out in ("", ".", ".."):
        raise UnsafePathError(f"dataset id {pid!r} cannot be a path component")
    return out
