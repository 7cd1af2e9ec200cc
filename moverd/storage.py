"""The storage contract: what a source or sink plugin implements.

Keys are relative POSIX paths that :func:`moverd.keys.safe_key` accepted before a plugin sees
them. Bytes move through :class:`Reader.readinto` into buffers the core owns and reuses, and out
through :class:`Writer.write`, which must be done with the buffer when it returns: that is what
keeps the pipeline zero-copy and its memory flat.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from enum import StrEnum
from typing import Any, Protocol, runtime_checkable

import anyio

from .checksums import Hasher
from .errors import NotAFileError, NotFoundError
from .limits import Slots

LOCAL_STORAGE_TYPE = "posix"
"""The storage type of local folders: the embedded default's landing zone, LTS and retrieval
area, ``moverd archive ./folder`` and ``retrieve --to DIR``. The core names it; the POSIX storage
plugin (``moverd_storage_lts``, shipped in moverd's own distribution) registers it."""


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """One object (file) of a storage. ``mode``/``uid``/``gid`` are None where unknown (S3).

    ``etag`` (S3) and ``inode`` (POSIX) identify the version listed: a reader opened with
    ``expect=`` this info refuses to read another version (see :meth:`Storage.open_reader`).
    """

    key: str
    size: int
    mtime: float = 0.0
    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    etag: str | None = None
    inode: int | None = None


class Reader(Protocol):
    """A stream over one object, or a byte range of it."""

    async def readinto(self, buf: memoryview) -> int:
        """Fill ``buf`` (possibly partly); return the count, 0 only at the end."""
        ...

    async def aclose(self) -> None: ...


@runtime_checkable
class BlockingReads(Protocol):
    """Optional for readers whose reads block anyway (files, plain sockets).

    The event loop is the scarce resource of a transfer: every chunk that needs a thread hop to be
    read and another to be hashed costs it twice. A reader that offers ``readinto_blocking`` is
    called by the core in a worker thread, which reads the chunk and hashes it in the same call.
    """

    def readinto_blocking(self, buf: memoryview) -> int:
        """``readinto`` without the event loop, called from a worker thread only: fill ``buf`` as
        far as the object goes (a short count means the end), 0 only at the end."""
        ...


@runtime_checkable
class BlockingWrites(Protocol):
    """Optional for writers whose writes block anyway (files): the core then writes a batch of
    chunks, and hashes them, in one worker-thread call instead of one hop per chunk."""

    def write_blocking(self, data: memoryview | bytes) -> None:
        """``write`` without the event loop, called from a worker thread only; never concurrently
        with ``write`` or with itself."""
        ...


class Writer(ABC):
    """A new object being written. Nothing is visible under its key before :meth:`commit`."""

    @abstractmethod
    async def write(self, data: memoryview | bytes) -> None:
        """Append ``data``; the caller reuses the buffer as soon as this returns."""

    @abstractmethod
    async def commit(self) -> None:
        """Publish atomically and durably under the key (replacing an older object)."""

    @abstractmethod
    async def abort(self) -> None:
        """Discard everything written; must leave nothing behind and never raise on cleanup."""

    def read_back_into(self, hasher: Hasher) -> bool:
        """Offer to verify while writing: read every byte back from the medium, around any cache,
        as it becomes durable, feed it to ``hasher`` in order, and be done when :meth:`commit`
        returns. Called before the first write; return False (the default) when the storage
        cannot, and the core reads the object back after the commit instead.

        Reading back behind the writer takes the read-back off the end of a transfer, where it
        would otherwise run alone after the last byte arrived.
        """
        return False

    def object_checksum(self) -> str | None:
        """After :meth:`commit`: the checksum the storage keeps for the object (``<alg>:<value>``
        in the storage's own notation), computed from the bytes this writer was given. None
        (the default) where the storage keeps none. The core records it on the datablock and
        compares it with :meth:`Storage.stored_checksum` where reading back is not possible."""
        return None


VERIFY_READ_BACK = "read-back"
"""A datablock verified by reading every byte back and comparing the whole-tar checksum."""
VERIFY_SERVER_CHECKSUM = "server-checksum"
"""A datablock verified by comparing the checksum computed while streaming it with the one the
storage reports for the object (a tape-class S3 store, whose objects cannot be read unrestored)."""


class RestoreState(StrEnum):
    """Where an object of a storage that keeps objects offline (:attr:`Storage.needs_restore`)
    stands. Storages report ``archived``, ``in_progress`` or ``available``; ``requested`` is
    moverd's own: asked for by this run, not yet seen running."""

    archived = "archived"
    requested = "requested"
    in_progress = "in_progress"
    available = "available"


@dataclass(frozen=True, slots=True)
class RestorePolicy:
    """How long a retrieval waits for restores, and how often it looks."""

    timeout: float
    poll: float
    """The first wait between two looks; it doubles up to ``poll_max``."""
    poll_max: float


class Storage(ABC):
    """A place objects live: the landing zone, the LTS share, a retrieval bucket.

    Optional capabilities have defaults that say "not supported": :meth:`presign` raises,
    :meth:`free_space` answers None, :meth:`ensure_online` returns at once, and the slots are
    unbounded. ``read_slots``/``write_slots`` are the bounded semaphores of the LTS.
    :attr:`verification` says how datablocks written here are verified; a storage that answers
    :data:`VERIFY_SERVER_CHECKSUM` implements :meth:`stored_checksum`. A storage whose objects
    must be restored before they are read sets :attr:`needs_restore` and :attr:`restore_policy`
    and implements :meth:`restore_state` and :meth:`request_restore`; the core requests each
    restore once (under a cross-host lock) and waits, bounded, before it reads.
    """

    #: Registered type name (``"posix"``, ``"s3"``) and configured instance name (``"lts"``).
    type_name: str = ""
    name: str = ""
    read_slots: Slots | None = None
    write_slots: Slots | None = None
    files_change_in_place: bool = True
    """Whether an object can change under its key after it was listed without becoming a new
    version a reader pinned to the listing would refuse, as a file that is still being written
    can. The archive then lists the source once more at the end and fails if anything changed.
    Object stores whose objects appear only complete and are replaced whole (S3) set False."""
    verification: str = VERIFY_READ_BACK
    needs_restore: bool = False
    """Whether objects (datablocks) must be restored before they are read (a tape-class store)."""
    restore_policy: RestorePolicy = RestorePolicy(timeout=0.0, poll=5.0, poll_max=300.0)
    """How a datablock written here is verified: :data:`VERIFY_READ_BACK`, or
    :data:`VERIFY_SERVER_CHECKSUM` where objects cannot be read without a restore."""

    @abstractmethod
    def list(self, prefix: str = "") -> AsyncIterator[ObjectInfo]:
        """Every object whose key starts with the folder ``prefix``, recursively, any order."""

    @abstractmethod
    async def stat(self, key: str) -> ObjectInfo:
        """Metadata of one object; :class:`~moverd.errors.NotFoundError` when absent, and
        :class:`~moverd.errors.NotAFileError` when something that is not an object stands at the
        key (a directory on a file system): that key is taken, not free."""

    @abstractmethod
    async def open_reader(
        self, key: str, offset: int = 0, length: int | None = None, *, uncached: bool = False,
        expect: ObjectInfo | None = None,
    ) -> Reader:
        """Stream ``length`` bytes from ``offset`` (to the end when None).

        ``uncached=True`` asks for the bytes as they are on the medium, not from a cache: the
        read-back verification uses it. Storages without a local cache ignore it.

        ``expect`` is the object as a listing described it; the archive pipeline passes it for
        every source file. The reader must then deliver that version's bytes or fail with
        :class:`~moverd.SourceChangedError` (naming the key): when the object it opens is another
        (other size, mtime or inode for a file; other ETag for S3, pinned with ``If-Match``), and,
        by the time it returned the last byte of the range, when the object changed while it was
        read (a file that grew, shrank or was rewritten). Storages that cannot tell check what
        they can (at least the size) and say so in their docs.
        """

    @abstractmethod
    async def open_writer(self, key: str, size_hint: int | None = None) -> Writer:
        """Start writing a new object."""

    @abstractmethod
    async def delete(self, key: str) -> None:
        """Delete one object; deleting a missing object is not an error."""

    async def delete_prefix(self, prefix: str) -> int:
        """Delete every object under ``prefix``; return how many were deleted."""
        keys = [info.key async for info in self.list(prefix)]
        for key in keys:
            await self.delete(key)
        return len(keys)

    async def exists(self, key: str) -> bool:
        """Is the key taken (by an object, or by something that is not one)?"""
        try:
            await self.stat(key)
        except NotFoundError:
            return False
        except NotAFileError:
            return True
        return True

    async def put(
        self, key: str, data: memoryview | bytes, *, mtime: float | None = None, mode: int | None = None
    ) -> None:
        """Write a whole small object at once, published atomically like a committed writer.

        The default goes through :meth:`open_writer`; storages where that costs several round
        trips per object (a thread hop per call for POSIX) override it.
        """
        await self.write_whole(await self.open_writer(key, size_hint=len(data)), data)
        if mtime is not None or mode is not None:
            await self.set_metadata(key, mtime=mtime, mode=mode)

    @staticmethod
    async def write_whole(writer: Writer, data: memoryview | bytes) -> None:
        """Write ``data`` through a new ``writer`` and commit it, aborting it on any error."""
        try:
            await writer.write(data)
            await writer.commit()
        except BaseException:
            with anyio.CancelScope(shield=True):
                await writer.abort()
            raise

    async def put_index(self, key: str, data: memoryview | bytes) -> None:
        """Write a small object the core must be able to read at any time: a datablock's member
        index, which says what to restore and which byte ranges to read. A storage whose
        datablocks go to a class that cannot be read unrestored keeps these in a readable one;
        the default is :meth:`put`."""
        await self.put(key, data)

    async def remove_stale_temp_files(self, older_than: float, prefix: str = "") -> int:
        """Remove what interrupted writers left (temporary files) under ``prefix`` that is older
        than ``older_than`` seconds; return how many. Storages whose aborted writes leave nothing
        (S3 multipart uploads are aborted or expire) keep this default."""
        return 0

    async def set_metadata(self, key: str, *, mtime: float | None = None, mode: int | None = None) -> None:
        """Set a file's modification time and permission bits where the storage has them."""
        return None

    async def presign(self, key: str, expires: timedelta) -> str:
        """A URL that downloads ``key`` without credentials until it expires."""
        raise NotImplementedError(f"storage {self.name!r} ({self.type_name}) cannot presign URLs")

    async def stored_checksum(self, key: str) -> str | None:
        """The checksum the storage reports for the object, in :meth:`Writer.object_checksum`'s
        notation, without reading its bytes; None when it reports none."""
        return None

    async def restore_state(self, key: str) -> RestoreState:
        """``archived`` (no restore requested, or it expired), ``in_progress`` or ``available``
        (readable now). The default: always available."""
        return RestoreState.available

    async def request_restore(self, key: str) -> None:
        """Ask for ``key`` to be restored (once: the core checks :meth:`restore_state` first,
        under a cross-host lock). A restore already running is not an error."""
        raise NotImplementedError(f"storage {self.name!r} ({self.type_name}) has no restores")

    async def free_space(self) -> int | None:
        """Bytes free for new objects, or None when the storage cannot tell."""
        return None

    async def ensure_online(self, key: str) -> None:
        """Wait until an offline (HSM) object is readable; no-op where there is no HSM."""
        return None

    async def wait_for_space(self, needed: int) -> None:
        """Block until ``needed`` bytes may be written; raise NoSpaceError on timeout."""
        return None

    async def aclose(self) -> None:
        """Release connections and other resources."""
        return None

    def describe(self) -> dict[str, Any]:
        """Non-secret facts for ``moverd plugins``/``config show`` and health checks."""
        return {"type": self.type_name, "name": self.name}


@contextlib.asynccontextmanager
async def _no_slot() -> AsyncIterator[None]:
    yield


def read_slot(storage: Storage) -> contextlib.AbstractAsyncContextManager[None]:
    """The storage's read semaphore, or nothing when it has none."""
    return storage.read_slots.hold() if storage.read_slots else _no_slot()


def write_slot(storage: Storage) -> contextlib.AbstractAsyncContextManager[None]:
    """The storage's write semaphore, or nothing when it has none."""
    return storage.write_slots.hold() if storage.write_slots else _no_slot()


@dataclass(frozen=True, slots=True)
class UploadedPart:
    """One part of an open multipart upload, as the storage recorded it."""

    number: int
    size: int
    etag: str
    checksum_sha256: str | None = None
    """Base64 SHA-256 the storage stored with the part (None when it kept none)."""


@dataclass(frozen=True, slots=True)
class OpenUpload:
    """A multipart upload begun and neither completed nor aborted."""

    key: str
    upload_id: str


@runtime_checkable
class DirectUploads(Protocol):
    """Optional for storages that clients can write to themselves, through presigned URLs, so
    that the bytes of an upload never pass through moverd (the daemon's ingest API). Keys are
    storage-relative, like every other key; :meth:`client_key` and :meth:`storage_key` map them to
    and from the names clients see (an S3 object key, with the storage's prefix)."""

    def client_key(self, key: str) -> str:
        """The name a client uses for ``key``."""
        ...

    def storage_key(self, client_key: str) -> str | None:
        """The storage key of a client's name, or None when it is outside this storage."""
        ...

    async def presign_put(self, key: str, expires: timedelta, *, headers: dict[str, str]) -> str:
        """A URL that writes ``key`` in one PUT; ``headers`` are signed and must be sent."""
        ...

    async def create_upload(self, key: str, *, headers: dict[str, str]) -> str:
        """Begin a multipart upload with SHA-256 part checksums; return its id."""
        ...

    async def presign_part(self, key: str, upload_id: str, number: int, expires: timedelta) -> str:
        """A URL that uploads part ``number`` (from 1) of the upload."""
        ...

    async def list_parts(self, key: str, upload_id: str) -> list[UploadedPart]:
        """The parts uploaded so far, by number; NotFoundError for an unknown upload."""
        ...

    async def complete_upload(self, key: str, upload_id: str, parts: list[UploadedPart]) -> str:
        """Publish the object from ``parts`` (each sent with its ETag and checksum); return its
        location (URL) as the storage names it."""
        ...

    async def abort_upload(self, key: str, upload_id: str) -> None:
        """Discard the upload and its parts; an unknown upload is not an error."""
        ...

    def open_uploads(self, prefix: str = "") -> AsyncIterator[OpenUpload]:
        """Every open multipart upload of a key under ``prefix``."""
        ...
