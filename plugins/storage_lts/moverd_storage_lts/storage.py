"""The ``posix`` storage: a directory tree as an object store, confined to its root.

Every file-system call runs in a worker thread (an NFS share can stall for seconds and must not
freeze the event loop), and every path is resolved through :class:`~.paths.Confined` first.
"""

from __future__ import annotations

import itertools
import os
import stat
import time
import weakref
from collections.abc import AsyncIterator, Callable, Generator, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel

from moverd import (
    NotAFileError,
    NotFoundError,
    ObjectInfo,
    OfflineTimeoutError,
    RestorePolicy,
    RestoreState,
    Slots,
    Storage,
    StorageError,
    safe_key,
)

from . import scan, space
from .hsm import is_offline
from .options import PosixOptions
from .oserrors import map_os_error
from .paths import Confined
from .reader import PosixReader
from .recall import recall_argv, run_recall
from .space import free_bytes
from .waiting import poll_until
from .writer import PosixWriter, remove_dead_temps

#: Files handed from the listing thread to the event loop per hop: big enough that 20,000 files
#: cost a few dozen hops, small enough that the first objects arrive at once.
LIST_BATCH = 1000


# ``Storage.list`` shadows the builtin inside the class body, annotations included.
_Batch = list[ObjectInfo]
_Files = Generator[ObjectInfo, None, None]


def _take(it: Iterator[ObjectInfo], n: int) -> _Batch:
    return list(itertools.islice(it, n))


class PosixStorage(Storage):
    """A POSIX directory: the LTS share, or a local landing/source folder."""

    type_name = "posix"

    def __init__(self, name: str, options: PosixOptions) -> None:
        self.name = name
        self.options = options
        self.read_slots = Slots(f"{name}.read", options.read_limit)
        self.write_slots = Slots(f"{name}.write", options.write_limit)
        self._where = f"posix storage {name!r}"
        self._confined: Confined | None = None
        # Open writers, so that wait_for_space can count the bytes they announced but have not
        # written yet: four concurrent writers must not each take the same free space for theirs.
        # Weak: a writer dropped without commit/abort must not hold a reservation forever.
        self._writers: weakref.WeakSet[PosixWriter] = weakref.WeakSet()
        # With a recall command, offline datablocks are recalled before a retrieval reads them,
        # and the recall is waited for and shown as a restore.
        self.needs_restore = options.recall_command is not None
        self.restore_policy = RestorePolicy(
            timeout=options.offline_timeout, poll=options.offline_poll,
            poll_max=max(options.offline_poll, options.offline_poll_max),
        )
        self._recalled: set[str] = set()
        """Keys whose recall this storage triggered: offline ones are then in progress."""

    # -- root ---------------------------------------------------------------------------------

    def _confinement(self) -> Confined:
        """The real root, created on first use when ``create`` is set (call in a worker thread)."""
        confined = self._confined
        if confined is not None:
            return confined
        root = os.path.abspath(self.options.root)
        if self.options.create:
            try:
                os.makedirs(root, exist_ok=True)
            except OSError as exc:
                raise map_os_error(exc, root, "create root", self._where) from exc
        real = os.path.realpath(root)
        if not os.path.isdir(real):
            raise StorageError(f"{self._where}: root '{root}' does not exist or is not a directory")
        confined = Confined(real, self._where)
        self._confined = confined
        return confined

    def _real_path(self, key: str) -> str:
        return self._confinement().resolve(key)[1]

    # -- objects ------------------------------------------------------------------------------

    async def list(self, prefix: str = "") -> AsyncIterator[ObjectInfo]:
        safe_key(prefix, allow_empty=True)
        files, batch = await anyio.to_thread.run_sync(self._start_listing, prefix)
        try:
            while True:
                for info in batch:
                    yield info
                if len(batch) < LIST_BATCH:
                    return
                batch = await anyio.to_thread.run_sync(_take, files, LIST_BATCH)
        finally:
            files.close()

    def _start_listing(self, prefix: str) -> tuple[_Files, _Batch]:
        # Root set-up, prefix resolution and the first batch share one thread hop.
        files = scan.walk(self._confinement(), prefix)
        return files, _take(files, LIST_BATCH)

    async def stat(self, key: str) -> ObjectInfo:
        return await anyio.to_thread.run_sync(self._stat_sync, key)

    def _stat_sync(self, key: str) -> ObjectInfo:
        key, path = self._confinement().resolve(key)
        try:
            st = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            raise NotFoundError(f"{self._where}: {key!r} not found") from None
        except OSError as exc:
            raise map_os_error(exc, path, "stat", self._where) from exc
        if not stat.S_ISREG(st.st_mode):
            # Something stands there: not absent (a retrieve must not count it as free room).
            what = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
            raise NotAFileError(f"{self._where}: {key!r} is {what}, not a file")
        return scan.object_info(key, st)

    async def open_reader(
        self, key: str, offset: int = 0, length: int | None = None, *, uncached: bool = False,
        expect: ObjectInfo | None = None,
    ) -> PosixReader:
        """A lazy reader: the file is opened by the first ``readinto`` (one thread hop per small file).

        A missing file therefore raises :class:`~moverd.NotFoundError` from that first
        ``readinto``, and a file that is not the ``expect``-ed version (or changes while it is
        read) :class:`~moverd.SourceChangedError`; an unsafe key raises here, before any I/O.
        """
        key = safe_key(key)
        if offset < 0 or (length is not None and length < 0):
            raise ValueError(f"bad range for {key!r}: offset={offset}, length={length}")
        return PosixReader(self._real_path, key, offset, length, uncached=uncached, where=self._where, expect=expect)

    async def open_writer(self, key: str, size_hint: int | None = None) -> PosixWriter:
        """Start a temp file next to ``key``.

        ``size_hint`` is not preallocated, but until the writer commits or aborts, the part of it
        not yet written counts as taken in :meth:`wait_for_space`. The core holds
        ``write_slot(self)`` around datablock writes; the writer does not take a slot itself.
        """
        safe_key(key)
        # Shielded, then checked: a cancellation arriving while the thread creates the temp file
        # would otherwise lose the writer, and with it the only handle to remove that file.
        with anyio.CancelScope(shield=True):
            writer = await anyio.to_thread.run_sync(self._open_writer_sync, key, size_hint)
        self._writers.add(writer)
        try:
            await anyio.lowlevel.checkpoint_if_cancelled()
        except BaseException:
            await writer.abort()
            raise
        return writer

    def _open_writer_sync(self, key: str, size_hint: int | None) -> PosixWriter:
        return PosixWriter.open_sync(self._confinement(), key, fsync=self.options.fsync, size_hint=size_hint,
                                     direct_io=self.options.direct_io, overwrite=self.options.overwrite)

    def pending_bytes(self) -> int:
        """Bytes announced by open writers (their ``size_hint``) and not written yet."""
        return sum(w.pending_bytes for w in list(self._writers))

    async def delete(self, key: str) -> None:
        safe_key(key)
        await anyio.to_thread.run_sync(self._delete_sync, key)

    def _delete_sync(self, key: str) -> None:
        _, directory, name = self._confinement().resolve_entry(key)
        path = os.path.join(directory, name)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except IsADirectoryError:
            raise StorageError(f"{self._where}: cannot delete {path}: is a directory") from None
        except OSError as exc:
            raise map_os_error(exc, path, "delete", self._where) from exc

    async def delete_prefix(self, prefix: str) -> int:
        safe_key(prefix, allow_empty=True)
        return await anyio.to_thread.run_sync(self._delete_prefix_sync, prefix)

    def _delete_prefix_sync(self, prefix: str) -> int:
        return scan.delete_tree(self._confinement(), prefix)

    async def remove_stale_temp_files(self, older_than: float, prefix: str = "") -> int:
        """Remove temp files under the folder ``prefix`` of writers that died (crash, kill -9) and
        were not touched for ``older_than`` seconds (0: however recent); return how many.

        A temp file whose writer still runs, in this process or any other, is never removed,
        whatever its age: the writer holds a lock on it (see :mod:`.writer`). So a retrieve or an
        archive may sweep the folders it writes into with ``older_than=0`` while another one
        writes there too.
        """
        safe_key(prefix, allow_empty=True)
        return await anyio.to_thread.run_sync(self._remove_stale_sync, prefix, older_than)

    def _remove_stale_sync(self, prefix: str, older_than: float) -> int:
        return remove_dead_temps(self._confinement(), prefix, older_than)

    async def put(
        self, key: str, data: memoryview | bytes, *, mtime: float | None = None, mode: int | None = None
    ) -> None:
        """A whole small file in one worker-thread call instead of four (create, write, commit,
        metadata): what makes retrieving thousands of small files fast."""
        safe_key(key)
        await anyio.to_thread.run_sync(self._put_sync, key, data, mtime, mode)

    def _put_sync(self, key: str, data: memoryview | bytes, mtime: float | None, mode: int | None) -> None:
        PosixWriter.put_sync(self._confinement(), key, data, fsync=self.options.fsync,
                             overwrite=self.options.overwrite)
        if mtime is not None or mode is not None:
            self._set_metadata_sync(key, mtime, mode)

    async def set_metadata(self, key: str, *, mtime: float | None = None, mode: int | None = None) -> None:
        """Restore a retrieved file's mtime and permission bits.

        setuid/setgid/sticky are dropped: the daemon usually runs as root, so restoring them from a
        user's archive would hand out set-id programs owned by root.
        """
        safe_key(key)
        if mtime is None and mode is None:
            return
        await anyio.to_thread.run_sync(self._set_metadata_sync, key, mtime, mode)

    def _set_metadata_sync(self, key: str, mtime: float | None, mode: int | None) -> None:
        key, path = self._confinement().resolve(key)
        try:
            if mode is not None:
                os.chmod(path, mode & 0o777)
            if mtime is not None:
                os.utime(path, ns=(time.time_ns(), round(mtime * 1e9)))
        except OSError as exc:
            raise map_os_error(exc, path, "set metadata of", self._where) from exc

    async def presign(self, key: str, expires: timedelta) -> str:
        """A ``file://`` URL: on a single machine (the embedded default) the retrieved file itself
        is the download. It does not expire; the retrieval area's housekeeping removes it."""
        safe_key(key)
        _, path = self._confinement().resolve(key)
        return Path(path).as_uri()

    # -- capacity and HSM ---------------------------------------------------------------------

    async def free_space(self) -> int:
        return await anyio.to_thread.run_sync(self._free_space_sync)

    def _free_space_sync(self) -> int:
        root = self._confinement().root
        try:
            return free_bytes(root)
        except OSError as exc:
            raise map_os_error(exc, root, "statvfs", self._where) from exc

    observe: Callable[..., Any] | None = None
    """Told when a wait for free space starts and ends (the ``storage_space_wait`` hook's
    arguments); the app sets it to the hook, so that the wait shows in the metrics at once."""

    async def wait_for_space(self, needed: int) -> None:
        """Wait until writing ``needed`` bytes still leaves ``min_free``; NoSpaceError on timeout,
        and at once when ``needed`` and ``min_free`` exceed the whole file system.

        Space that open writers of this process announced but have not written yet counts as
        taken (other hosts writing to the same share are seen only through the free space).
        """
        opts = self.options
        root = self._confined.root if self._confined else str(opts.root)
        await space.wait_for_space(
            storage=self.name, where=self._where, root=root, needed=needed, min_free=opts.min_free,
            free=self.free_space, pending=self.pending_bytes, capacity=self._capacity,
            within=opts.free_space_timeout, poll=opts.free_space_poll, report=opts.free_space_report,
            observe=self.observe,
        )

    async def _capacity(self) -> int:
        def total() -> int:
            root = self._confinement().root
            try:
                return space.capacity_bytes(root)
            except OSError as exc:
                raise map_os_error(exc, root, "statvfs", self._where) from exc

        return await anyio.to_thread.run_sync(total)

    async def ensure_online(self, key: str) -> None:
        """Return once ``key`` has data resident; OfflineTimeoutError after ``offline_timeout``."""
        key = safe_key(key)
        opts = self.options
        path = key

        async def online() -> bool:
            nonlocal path
            resident, path = await self._resident(key)
            return resident

        met, waited = await poll_until(online, within=opts.offline_timeout, poll=opts.offline_poll)
        if not met:
            raise OfflineTimeoutError(
                f"{self._where}: {key!r} ({path}) is offline (HSM: no data blocks on disk) and was "
                f"not recalled within {opts.offline_timeout:g} s (offline_timeout); waited {waited:.1f} s"
            )

    async def _resident(self, key: str) -> tuple[bool, str]:
        """Whether ``key`` has data on disk, and its real path."""
        key = safe_key(key)

        def look() -> tuple[bool, str]:
            path = self._real_path(key)
            try:
                st = os.stat(path)
            except FileNotFoundError:
                raise NotFoundError(f"{self._where}: {key!r} not found") from None
            except OSError as exc:
                raise map_os_error(exc, path, "stat", self._where) from exc
            return not is_offline(st), path

        return await anyio.to_thread.run_sync(look)

    async def restore_state(self, key: str) -> RestoreState:
        online, _ = await self._resident(key)
        if online:
            self._recalled.discard(key)
            return RestoreState.available
        return RestoreState.in_progress if key in self._recalled else RestoreState.archived

    async def request_restore(self, key: str) -> None:
        """Run ``recall_command`` for the file, within ``recall_timeout``."""
        command = self.options.recall_command
        if command is None:
            return await super().request_restore(key)
        _, path = await self._resident(key)
        await run_recall(recall_argv(command, path), bound=self.options.recall_timeout, where=self._where,
                         key=key)
        self._recalled.add(key)

    # -- misc -----------------------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        o = self.options
        return {
            "type": self.type_name,
            "name": self.name,
            "root": str(o.root),
            "create": o.create,
            "read_limit": o.read_limit,
            "write_limit": o.write_limit,
            "min_free": o.min_free,
            "free_space_timeout": o.free_space_timeout,
            "offline_timeout": o.offline_timeout,
            "recall_command": o.recall_command,
            "fsync": o.fsync,
            "direct_io": o.direct_io,
        }

    async def aclose(self) -> None:
        # Nothing is pooled: readers and writers own their descriptors.
        return None
