"""Writing one file atomically: a temp file next to it, fsync, rename, fsync the directory.

Nothing is ever visible under the final name until :meth:`PosixWriter.commit` renamed a complete,
fsynced file there, and a failed write removes its temp file at once: a full share, a read-only
remount or a crash in the middle leave either the old object or nothing, never a partial file.
(A crash of the whole process leaves a temp file; ``remove_stale_temp_files`` clears those.)
"""

from __future__ import annotations

import logging
import os
import stat

import anyio

from moverd import Hasher, StorageError, Writer

from . import direct
from .oserrors import map_os_error
from .paths import Confined, temp_name
from .readback import ReadBack

log = logging.getLogger(__name__)

_WRITEBACK_STEP = 64 << 20
_TEMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW


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
        self, *, key: str, directory: str, name: str, fsync: bool, where: str, size_hint: int | None = None
    ) -> None:
        self.key = key
        self.path = os.path.join(directory, name)
        self._directory = directory
        self._tmp = os.path.join(directory, temp_name(name))
        self._fsync = fsync
        self._where = where
        self._fd: int | None = None
        self._state = "new"  # new -> open -> committed | discarded
        self.bytes_written = 0
        self._written_back = 0
        self._read_back: ReadBack | None = None
        self._stage: direct.Stage | None = None
        self.size_hint = size_hint or 0

    @classmethod
    def open_sync(
        cls, confined: Confined, key: str, *, fsync: bool, size_hint: int | None = None, direct_io: bool = False
    ) -> PosixWriter:
        """Create the parent directories and the temp file (in a worker thread)."""
        key, directory, name = confined.resolve_entry(key)
        where = confined.where
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError as exc:
            raise map_os_error(exc, directory, "create directory", where) from exc
        writer = cls(key=key, directory=directory, name=name, fsync=fsync, where=where, size_hint=size_hint)
        try:
            if stat.S_ISDIR(os.lstat(writer.path).st_mode):
                # Fail now rather than after writing a whole datablock that cannot be renamed.
                raise StorageError(f"{where}: cannot write {writer.path}: is a directory")
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise map_os_error(exc, writer.path, "write", where) from exc
        try:
            writer._fd = os.open(writer._tmp, _TEMP_FLAGS, 0o666)
        except OSError as exc:
            raise map_os_error(exc, writer.path, "write", where) from exc
        if direct_io and (size_hint or 0) >= direct.DIRECT_MIN and direct.set_direct(writer._fd, True):
            writer._stage = direct.Stage(on_written=writer._advance_read_back)
        writer._state = "open"
        return writer

    @classmethod
    def put_sync(cls, confined: Confined, key: str, data: memoryview | bytes, *, fsync: bool) -> None:
        """Write a whole small file in one worker-thread call: temp file, write, commit."""
        writer = cls.open_sync(confined, key, fsync=fsync, size_hint=len(data))
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
            os.replace(self._tmp, self.path)
        except OSError as exc:
            self._discard_sync()
            raise map_os_error(exc, self.path, "commit", self._where) from exc
        except BaseException:
            self._discard_sync()
            raise
        self._state = "committed"
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
