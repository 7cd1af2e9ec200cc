"""Root confinement: every path the plugin touches is proven to lie inside its root.

The core already refused ``..``, absolute keys and NUL (:func:`moverd.safe_key`), but only the
plugin can see symlinks. A landing folder may contain a user's link to ``/etc``; following it would
archive (or, worse, overwrite) files outside the share. So every key is joined to the *real* root,
resolved with :func:`os.path.realpath`, and refused unless the result is still inside. The
functions here are synchronous and do file-system calls: run them in a worker thread.

The check-then-open window is closed only for the last component (files are opened with
``O_NOFOLLOW`` on the resolved path); a directory swapped for a symlink between the check and the
open is out of reach without ``openat2(RESOLVE_BENEATH)``, which Python does not expose.
"""

from __future__ import annotations

import os
import re
import secrets
from dataclasses import dataclass

from moverd import UnsafePathError, safe_key

#: Temp files of unfinished writers: ``.<basename>.moverd-tmp-<12 hex>``.
TEMP_MARK = ".moverd-tmp-"
_TEMP_RE = re.compile(r"\..*" + re.escape(TEMP_MARK) + r"[0-9a-f]{12}", re.DOTALL)
_NAME_MAX = 255


def is_temp_name(name: str) -> bool:
    """True for the names :func:`temp_name` makes (so listings and clean-ups can tell them apart)."""
    return name.startswith(".") and TEMP_MARK in name and _TEMP_RE.fullmatch(name) is not None


def temp_name(basename: str) -> str:
    """A fresh temp-file name next to ``basename`` that still fits in one path component.

    A 250-byte file name plus the suffix would exceed NAME_MAX, so the basename part is shortened
    (at a character boundary); the random part alone keeps names unique.
    """
    suffix = TEMP_MARK + secrets.token_hex(6)
    room = _NAME_MAX - 1 - len(suffix)
    raw = os.fsencode(basename)
    if len(raw) > room:
        basename = raw[:room].decode("utf-8", "ignore")
    return f".{basename}{suffix}"


@dataclass(frozen=True)
class Confined:
    """A real (symlink-free, absolute) root directory and the checks against it."""

    root: str
    where: str
    """Who is asking (``posix storage 'lts'``), for messages."""

    def contains(self, real: str) -> bool:
        if real == self.root:
            return True
        base = self.root if self.root.endswith(os.sep) else self.root + os.sep
        return real.startswith(base)

    def logical(self, key: str) -> str:
        """Root joined with an already-safe key, without resolving anything."""
        return os.path.join(self.root, key) if key else self.root

    def resolve(self, key: str, *, allow_empty: bool = False) -> tuple[str, str]:
        """``(safe key, real path)`` of ``key``; UnsafePathError if a symlink leads outside."""
        key = safe_key(key, allow_empty=allow_empty)
        logical = self.logical(key)
        real = os.path.realpath(logical)
        if not self.contains(real):
            raise UnsafePathError(
                f"{self.where}: {key!r} leads outside the root {self.root!r} through a symlink "
                f"(it resolves to {real!r})"
            )
        return key, real

    def resolve_entry(self, key: str) -> tuple[str, str, str]:
        """``(safe key, real parent directory, basename)``: where to create or remove ``key``.

        The parent is resolved, the last component is not, so that a commit or delete replaces a
        symlink itself rather than its target; but a last component that is a symlink leading
        outside the root is still refused, as everywhere.
        """
        key = safe_key(key)
        parent_key, _, base = key.rpartition("/")
        _, real_parent = self.resolve(parent_key, allow_empty=True)
        entry = os.path.join(real_parent, base)
        if os.path.islink(entry):
            target = os.path.realpath(entry)
            if not self.contains(target):
                raise UnsafePathError(
                    f"{self.where}: {key!r} is a symlink leading outside the root {self.root!r} "
                    f"(to {target!r})"
                )
        return key, real_parent, base

    def check_link(self, key: str, path: str) -> str:
        """Real target of the symlink ``path`` (found at ``key`` while scanning), if inside."""
        target = os.path.realpath(path)
        if not self.contains(target):
            raise UnsafePathError(
                f"{self.where}: {key!r} is a symlink leading outside the root {self.root!r} "
                f"(to {target!r})"
            )
        return target
