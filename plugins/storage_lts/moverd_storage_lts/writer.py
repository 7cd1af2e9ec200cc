"""Writing one file atomically: a temp file next to it, fsync, rename, fsync the directory.

Nothing is ever visible under the final name until :meth:`PosixWriter.commit` renamed a complete,
fsynced file there, and a failed write removes its temp file at once: a full share, a read-only
remount or a crash in the middle leave either the old object or nothing, never a partial file.

A crash of the whole process (SIGKILL, power loss) still leaves a temp file. To tell such a file
from one a live writer in another process is filling, every writer holds an exclusive ``flock`` on
its temp file from its creation until it is renamed or unlinked; the kernel drops the lock when the
process dies, whatever killed it. :func:`remove_dead_temps` removes only temp files it can lock
itself, so it never takes a file from under a running writer, however long that one pauses. (A
pid in the name would not do: pids are per host and per pid namespace, and the share is not.)

A storage with ``overwrite = false`` publishes without replacing: ``renameat2(RENAME_NOREPLACE)``,
or ``link`` + ``unlink`` where the file system lacks it (NFS), so that a file created at the final
name while the writer ran is never replaced, not even in the instant between a check and a rename.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import stat
import time
from collections.abc import Callable

import anyio

from moverd import Hasher, StorageError, UserError, Writer

from . import direct
from .oserrors import map_os_error
from .paths import Confined, is_temp_name, temp_name
from .readback import ReadBack

log = logging.getLogger(__name__)

_WRITEBACK_STEP = 64 << 20
_TEMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
_TEMP_TRIES = 8
_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
#: errnos meaning "this file system cannot do that call", not "the name is taken".
_NO_RENAMEAT2 = frozenset({errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP})
_NO_LINKS = frozenset({errno.EPERM, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP})
_NO_LOCKS = frozenset({errno.ENOLCK, errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP})


class TargetExistsError(UserError):
    """A file appeared at the key while it was being written, and the storage does not overwrite."""


def _load_renameat2() -> Callable[..., int] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return None  # not Linux, or a libc older than glibc 2.28
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    result: Callable[..., int] = fn
    return result


_renameat2 = _load_renameat2()


def rename_noreplace(src: str, dst: str) -> None:
    """Rename ``src`` to ``dst`` unless ``dst`` exists (any kind of entry, a dangling symlink
    too); FileExistsError then, and ``src`` stays.

    The kernel's ``RENAME_NOREPLACE`` where the file system has it (ext4, xfs, btrfs, tmpfs);
    otherwise a hard link, which fails atomically on an existing name, and the unlink of ``src``
    (NFS). A crash between the two leaves both names on one complete file: the temp name is then
    a dead writer's temp file like any other. Only where neither exists (some FUSE and SMB
    mounts) is the name checked right before a plain rename, which leaves a window of a few
    microseconds; that is logged.
    """
    if _renameat2 is not None:
        if _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        code = ctypes.get_errno()
        if code not in _NO_RENAMEAT2:
            raise OSError(code, os.strerror(code), dst)
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError as exc:
        if exc.errno not in _NO_LINKS:
            raise
        log.warning("%s: no RENAME_NOREPLACE and no hard links here: publishing after a check", dst)
        if os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), dst) from None
        os.rename(src, dst)
        return
    os.unlink(src)


def _create_temp(directory: str, name: str) -> tuple[str, int, int]:
    """``(path, fd, lock fd)`` of a new temp file for ``name``, locked and proven still linked.

    The lock is taken right after the create, and a sweeper may have run in between: it locked
    the unlocked file and unlinked it. So after locking, the name must still lead to this very
    inode; if not, the file is an orphan and another name is tried. The lock lives on a
    duplicate descriptor, so that the commit can close the data descriptor (where NFS reports
    deferred write errors) and still hold the lock through the rename.
    """
    for _ in range(_TEMP_TRIES):
        path = os.path.join(directory, temp_name(name))
        fd = os.open(path, _TEMP_FLAGS, 0o666)
        try:
            lock_fd = os.dup(fd)
        except OSError:
            os.close(fd)
            raise
        try:
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pass  # a sweeper holds it and is about to unlink it: take another name
            except OSError as exc:
                if exc.errno not in _NO_LOCKS:
                    raise
                log.warning("%s: cannot lock temp files here (%s): a sweep cannot tell this writer "
                            "from a dead one", directory, exc.strerror)
                return path, fd, lock_fd
            else:
                st, linked = os.fstat(fd), os.lstat(path)
                if (st.st_dev, st.st_ino) == (linked.st_dev, linked.st_ino):
                    return path, fd, lock_fd
        except FileNotFoundError:
            pass  # swept before we locked it
        except BaseException:
            os.close(lock_fd)
            os.close(fd)
            raise
        os.close(lock_fd)
        os.close(fd)
    raise StorageError(f"cannot create a temp file for {os.path.join(directory, name)}: "
                       f"{_TEMP_TRIES} tries were swept away as soon as they were created")


def remove_if_dead(path: str) -> bool:
    """Unlink the temp file ``path`` if no live writer holds it; True if it did.

    The sweeper locks the file itself and unlinks it while holding the lock, so a writer that
    created the file but has not locked it yet notices (see :func:`_create_temp`). A file it
    cannot open or lock (another user's, a file system without locks) is left alone: it cannot
    be proven dead.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return False
    except OSError as exc:
        log.warning("%s: cannot check whether its writer is alive: %s", path, exc.strerror)
        return False
    try:
        try:
            # Write-open: NFS carries flock as a POSIX write lock, which needs a writable fd.
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # a live writer
        except OSError as exc:
            log.warning("%s: cannot lock it to check its writer: %s", path, exc.strerror)
            return False
        st = os.fstat(fd)
        try:
            linked = os.lstat(path)
        except FileNotFoundError:
            return False
        if (st.st_dev, st.st_ino) != (linked.st_dev, linked.st_ino):
            return False  # renamed over or replaced meanwhile: not the file we locked
        try:
            os.unlink(path)
        except FileNotFoundError:
            return False
        return True
    finally:
        os.close(fd)


def remove_dead_temps(confined: Confined, prefix: str, older_than: float) -> int:
    """Unlink the temp files under the folder ``prefix`` whose writer is dead and that were not
    modified for ``older_than`` seconds (``<= 0``: whatever their mtime, so that a clock running
    ahead on an NFS server cannot hide a fresh one); count them."""
    prefix, real = confined.resolve(prefix, allow_empty=True)
    now = time.time()
    count = 0
    for dirpath, _dirnames, filenames in os.walk(real):
        for name in filenames:
            if not is_temp_name(name):
                continue
            path = os.path.join(dirpath, name)
            try:
                if older_than > 0 and now - os.lstat(path).st_mtime < older_than:
                    continue
                if remove_if_dead(path):
                    count += 1
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise map_os_error(exc, path, "delete", confined.where) from exc
    return count


def fsync_dir(path: str) -> None:
    """Make a rename in ``path`` durable (the new directory entry survives a power loss)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class PosixWriter(Writer):
    """A :class:`moverd.Writer` into ``directory/.name.moverd-tmp-*``, renamed to ``name`` on commit."""

    def __init__(
        self, *, key: str, directory: str, name: str, tmp: str, fd: int, lock_fd: int, fsync: bool, where: str,
        size_hint: int | None = None, overwrite: bool = True,
    ) -> None:
        self.key = key
        self.path = os.path.join(directory, name)
        self._directory = directory
        self._tmp = tmp
        self._fsync = fsync
        self._overwrite = overwrite
        self._where = where
        self._fd: int | None = fd
        self._lock_fd: int | None = lock_fd
        """Holds the temp file's flock (see the module docstring) until it is renamed or unlinked."""
        self._state = "open"  # open -> committed | discarded
        self.bytes_written = 0
        self._written_back = 0
        self._read_back: ReadBack | None = None
        self._stage: direct.Stage | None = None
        self.size_hint = size_hint or 0

    @classmethod
    def open_sync(
        cls, confined: Confined, key: str, *, fsync: bool, size_hint: int | None = None, direct_io: bool = False,
        overwrite: bool = True,
    ) -> PosixWriter:
        """Create the parent directories and the temp file (in a worker thread)."""
        key, directory, name = confined.resolve_entry(key)
        where = confined.where
        path = os.path.join(directory, name)
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError as exc:
            raise map_os_error(exc, directory, "create directory", where) from exc
        try:
            if stat.S_ISDIR(os.lstat(path).st_mode):
                # Fail now rather than after writing a whole datablock that cannot be renamed.
                raise StorageError(f"{where}: cannot write {path}: is a directory")
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise map_os_error(exc, path, "write", where) from exc
        try:
            tmp, fd, lock_fd = _create_temp(directory, name)
        except OSError as exc:
            raise map_os_error(exc, path, "write", where) from exc
        writer = cls(key=key, directory=directory, name=name, tmp=tmp, fd=fd, lock_fd=lock_fd, fsync=fsync,
                     where=where, size_hint=size_hint, overwrite=overwrite)
        if direct_io and (size_hint or 0) >= direct.DIRECT_MIN and direct.set_direct(fd, True):
            writer._stage = direct.Stage(on_written=writer._advance_read_back)
        return writer

    @classmethod
    def put_sync(
        cls, confined: Confined, key: str, data: memoryview | bytes, *, fsync: bool, overwrite: bool = True
    ) -> None:
        """Write a whole small file in one worker-thread call: temp file, write, commit."""
        writer = cls.open_sync(confined, key, fsync=fsync, size_hint=len(data), overwrite=overwrite)
        try:
            if len(data):
                writer.write_blocking(data)
            writer._commit_sync()
        except BaseException:
            if writer._state == "open":
                writer._discard_sync()
            raise

    async def write(self, data: memoryview | bytes) -> None:
        self._check_open()
        if len(data) == 0:
            return
        await anyio.to_thread.run_sync(self.write_blocking, data)

    def read_back_into(self, hasher: Hasher) -> bool:
        """Read the file back behind the writer (see :mod:`.readback`): the commit then only
        waits for the last segment."""
        if self._state != "open" or self.bytes_written:
            return False
        self._read_back = ReadBack(self._tmp, hasher, sync=self._fsync, where=self._where)
        return True

    async def commit(self) -> None:
        self._check_open()
        await anyio.to_thread.run_sync(self._commit_sync)

    @property
    def pending_bytes(self) -> int:
        """Bytes this writer announced (``size_hint``) but has not written yet."""
        return max(0, self.size_hint - self.bytes_written) if self._state == "open" else 0

    async def abort(self) -> None:
        if self._state != "open":
            return  # never touch a committed file; a discarded writer left nothing already
        # Shielded: abort runs in cleanup paths, often inside a cancelled scope.
        with anyio.CancelScope(shield=True):
            try:
                await anyio.to_thread.run_sync(self._discard_sync)
            except Exception:  # abort must never raise
                log.exception("%s: cleaning up %s failed", self._where, self._tmp)

    def _check_open(self) -> None:
        if self._state != "open":
            raise StorageError(f"{self._where}: writer of {self.key!r} is {self._state}, not open")

    # -- worker-thread side -------------------------------------------------------------------

    def write_blocking(self, data: memoryview | bytes) -> None:
        """Append ``data`` (in a worker thread: the core batches chunks into one call)."""
        self._check_open()
        fd = self._fd
        if fd is None:
            raise StorageError(f"{self._where}: writer of {self.key!r} is closed")
        view = memoryview(data)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        try:
            if self._stage is not None:
                self._stage.put(fd, view)
            else:
                direct.write_all(fd, view)
        except OSError as exc:
            self._discard_sync()
            raise map_os_error(exc, self.path, "write", self._where) from exc
        self.bytes_written += len(view)
        if self._stage is not None:
            return  # the stage's thread advances the read-back as its writes land
        if self._fsync and self.bytes_written - self._written_back >= _WRITEBACK_STEP:
            # Start writing the file to the medium while the transfer goes on (DONTNEED starts
            # writeback of dirty pages without waiting for it), so that commit's fsync has
            # little left to do; it also keeps a big datablock from filling the page cache.
            try:
                os.posix_fadvise(fd, self._written_back, self.bytes_written - self._written_back,
                                 os.POSIX_FADV_DONTNEED)
            except OSError:
                pass  # advice only
            self._written_back = self.bytes_written
        self._advance_read_back(self.bytes_written)

    def _advance_read_back(self, on_disk: int) -> None:
        """Bytes up to ``on_disk`` are in the file (called by the stage's thread, if any)."""
        if self._read_back is not None:
            self._read_back.advance(on_disk)

    def _commit_sync(self) -> None:
        fd, self._fd = self._fd, None
        try:
            if fd is not None:
                try:
                    if self._stage is not None:
                        self._stage.finish(fd)
                    if self._fsync:
                        os.fsync(fd)
                    if self._read_back is not None:
                        self._read_back.finish(self.bytes_written)
                finally:
                    # close() can report a deferred write error (NFS): it counts as a failure.
                    os.close(fd)
            if self._overwrite:
                os.replace(self._tmp, self.path)
            else:
                rename_noreplace(self._tmp, self.path)
        except FileExistsError:
            self._discard_sync()
            raise TargetExistsError(
                f"{self._where}: {self.path} appeared while it was being written; it was left as it is "
                f"(this storage does not overwrite)"
            ) from None
        except OSError as exc:
            self._discard_sync()
            raise map_os_error(exc, self.path, "commit", self._where) from exc
        except BaseException:
            self._discard_sync()
            raise
        self._state = "committed"
        self._unlock()
        if self._stage is not None:
            self._stage.close()
            self._stage = None
        if self._fsync:
            try:
                fsync_dir(self._directory)
            except OSError as exc:
                raise map_os_error(exc, self._directory, "sync directory", self._where) from exc

    def _discard_sync(self) -> None:
        """Close and unlink the temp file; best effort, never raises."""
        self._state = "discarded"
        # The stage first: its thread's last write may still advance the read-back, which would
        # start a new read-back thread after a cancel.
        if self._stage is not None:
            self._stage.close()
            self._stage = None
        if self._read_back is not None:
            self._read_back.cancel()
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass
        try:
            os.unlink(self._tmp)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("%s: could not remove temp file %s: %s", self._where, self._tmp, exc.strerror)
        self._unlock()  # only now: unlocked, a left-over temp file is fair game for a sweep

    def _unlock(self) -> None:
        lock_fd, self._lock_fd = self._lock_fd, None
        if lock_fd is not None:
            try:
                os.close(lock_fd)
            except OSError:
                pass
