"""Walking the tree: listings, prefix deletion and the temp-file sweep (synchronous, for threads).

Listings must stay fast on 20,000+ files and must not follow a symlink out of the root, so the walk
uses :func:`os.scandir` (file types come free with the directory entries; only regular files cost a
``stat``) and checks every symlink it meets. Symlinks that stay inside the root are followed, files
and directories alike, with cycle detection along the current branch (as ``find -L`` does), so
that a link to an ancestor directory cannot loop forever.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Generator

from moverd import ObjectInfo

from .oserrors import map_os_error
from .paths import Confined, is_temp_name

_Branch = frozenset[tuple[int, int]]


def object_info(key: str, st: os.stat_result) -> ObjectInfo:
    """The contract's view of a stat result: permission bits only, as a tar header keeps them."""
    return ObjectInfo(
        key=key, size=st.st_size, mtime=st.st_mtime, mode=st.st_mode & 0o7777,
        uid=st.st_uid, gid=st.st_gid, inode=st.st_ino,
    )


def _scandir(confined: Confined, path: str) -> list[os.DirEntry[str]] | None:
    """The entries of ``path``, or None when it vanished meanwhile."""
    try:
        with os.scandir(path) as it:
            return list(it)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        raise map_os_error(exc, path, "list", confined.where) from exc


def walk(confined: Confined, prefix: str) -> Generator[ObjectInfo, None, None]:
    """Every regular file under the folder ``prefix`` (keys relative to the root, '/'-separated).

    Temp files of writers are skipped; a prefix that does not exist (or is a file) yields nothing;
    a symlink that leads outside the root raises UnsafePathError naming it.
    """
    prefix, real = confined.resolve(prefix, allow_empty=True)
    try:
        st = os.stat(real)
    except (FileNotFoundError, NotADirectoryError):
        return
    except OSError as exc:
        raise map_os_error(exc, real, "list", confined.where) from exc
    if not stat.S_ISDIR(st.st_mode):
        return
    stack: list[tuple[str, str, _Branch]] = [(real, prefix, frozenset({(st.st_dev, st.st_ino)}))]
    while stack:
        dir_path, dir_key, branch = stack.pop()
        # One directory at a time is read whole: no scandir handle stays open across batches.
        entries = _scandir(confined, dir_path)
        if entries is None:
            continue
        for entry in entries:
            name = entry.name
            key = f"{dir_key}/{name}" if dir_key else name
            try:
                if entry.is_symlink():
                    target = confined.check_link(key, entry.path)
                    try:
                        st = os.stat(target)
                    except (FileNotFoundError, NotADirectoryError):
                        continue  # dangling link inside the root: not an object
                    if stat.S_ISDIR(st.st_mode):
                        ident = (st.st_dev, st.st_ino)
                        if ident not in branch:
                            stack.append((target, key, branch | {ident}))
                        continue
                elif entry.is_dir(follow_symlinks=False):
                    st = entry.stat(follow_symlinks=False)
                    stack.append((entry.path, key, branch | {(st.st_dev, st.st_ino)}))
                    continue
                elif entry.is_file(follow_symlinks=False):
                    if is_temp_name(name):
                        continue
                    st = entry.stat(follow_symlinks=False)
                else:
                    continue  # fifos, sockets, devices: not data
            except FileNotFoundError:
                continue  # deleted while we listed
            except OSError as exc:
                raise map_os_error(exc, entry.path, "stat", confined.where) from exc
            if stat.S_ISREG(st.st_mode) and not is_temp_name(name):
                yield object_info(key, st)


def delete_tree(confined: Confined, prefix: str) -> int:
    """Remove every file under ``prefix``, then the emptied directories; count the objects removed.

    Symlinks are removed as links, never followed, so nothing outside the root can be touched.
    Temp files go too but are not counted (they were never objects). The root itself stays.
    """
    prefix, real = confined.resolve(prefix, allow_empty=True)
    if not os.path.isdir(real):
        return 0

    def fail(exc: OSError) -> None:
        if not isinstance(exc, FileNotFoundError):
            raise map_os_error(exc, exc.filename or real, "list", confined.where) from exc

    count = 0
    for dirpath, dirnames, filenames in os.walk(real, topdown=False, onerror=fail):
        for name in filenames:
            path = os.path.join(dirpath, name)
            try:
                os.unlink(path)
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise map_os_error(exc, path, "delete", confined.where) from exc
            if not is_temp_name(name):
                count += 1
        for name in dirnames:
            path = os.path.join(dirpath, name)
            try:
                if os.path.islink(path):
                    os.unlink(path)
                else:
                    os.rmdir(path)
            except OSError:
                pass  # not empty (a file appeared meanwhile) or already gone: leave it
    if real != confined.root:
        try:
            os.rmdir(real)
        except OSError:
            pass
    return count
