"""Storage plugins for bad media, registered through ``register_storages`` like any third-party
storage, so the code under test (the pipeline's verification) runs unchanged; only the medium is
bad:

* ``badmedia``: a POSIX directory whose medium flips one bit of every tar between the write and
  the read-back (the bit is flipped in the file on disk, before the commit's fsync and read-back);
* ``badreads``: a POSIX directory that cannot read back while writing (like a third-party storage
  that does not offer it) and whose uncached reads of tars return one flipped bit;
* ``gatedreads`` (:class:`GatedReadsPlugin`): a POSIX directory whose blocking reads of one file
  stall in their worker thread, where no cancellation reaches them, until the test opens the gate.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from moverd_storage_lts.options import PosixOptions
from moverd_storage_lts.storage import PosixStorage
from moverd_storage_lts.writer import PosixWriter

from moverd import Hasher, StorageType, hookimpl


class _FlippingWriter(PosixWriter):
    def _commit_sync(self) -> None:
        if self.key.endswith(".tar") and self.bytes_written:
            with open(self._tmp, "r+b") as f:
                f.seek(self.bytes_written // 2)
                byte = f.read(1)
                f.seek(-1, os.SEEK_CUR)
                f.write(bytes([byte[0] ^ 0x10]))
        super()._commit_sync()


class BadMediaStorage(PosixStorage):
    def _open_writer_sync(self, key: str, size_hint: int | None) -> PosixWriter:
        return _FlippingWriter.open_sync(self._confinement(), key, fsync=self.options.fsync, size_hint=size_hint,
                                         direct_io=self.options.direct_io)


class _NoReadBackWriter(PosixWriter):
    def read_back_into(self, hasher: Hasher) -> bool:
        return False


class _FlippingReader:
    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.flipped = False

    async def readinto(self, buf: memoryview) -> int:
        n: int = await self.inner.readinto(buf)
        if n and not self.flipped:
            buf[n // 2] ^= 0x10
            self.flipped = True
        return n

    async def aclose(self) -> None:
        await self.inner.aclose()


class BadReadsStorage(PosixStorage):
    def _open_writer_sync(self, key: str, size_hint: int | None) -> PosixWriter:
        return _NoReadBackWriter.open_sync(self._confinement(), key, fsync=self.options.fsync,
                                           size_hint=size_hint, direct_io=self.options.direct_io)

    async def open_reader(self, key: str, offset: int = 0, length: int | None = None, *,
                          uncached: bool = False, expect: Any = None) -> Any:
        reader = await super().open_reader(key, offset, length, uncached=uncached, expect=expect)
        return _FlippingReader(reader) if uncached and key.endswith(".tar") else reader


class BadMediaPlugin:
    @hookimpl
    def register_storages(self, register: Any) -> None:
        register(StorageType(name="badmedia", options=PosixOptions,
                             create=lambda name, options, ctx: BadMediaStorage(name, options)))
        register(StorageType(name="badreads", options=PosixOptions,
                             create=lambda name, options, ctx: BadReadsStorage(name, options)))


class Gate:
    """Holds the blocking reads of the file whose key ends with ``key`` until ``release`` is set."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.entered, self.release = threading.Event(), threading.Event()


class _GatedReader:
    def __init__(self, inner: Any, gate: Gate) -> None:
        self.inner, self.gate = inner, gate

    async def readinto(self, buf: memoryview) -> int:
        n: int = await self.inner.readinto(buf)
        return n

    def readinto_blocking(self, buf: memoryview) -> int:
        self.gate.entered.set()
        self.gate.release.wait(30)
        n: int = self.inner.readinto_blocking(buf)
        return n

    async def aclose(self) -> None:
        await self.inner.aclose()


class GatedReadsStorage(PosixStorage):
    def __init__(self, name: str, options: PosixOptions, gate: Gate) -> None:
        super().__init__(name, options)
        self.gate = gate

    async def open_reader(self, key: str, offset: int = 0, length: int | None = None, *,
                          uncached: bool = False, expect: Any = None) -> Any:
        reader = await super().open_reader(key, offset, length, uncached=uncached, expect=expect)
        return _GatedReader(reader, self.gate) if key.endswith(self.gate.key) else reader


class GatedReadsPlugin:
    def __init__(self, gate: Gate) -> None:
        self.gate = gate

    @hookimpl
    def register_storages(self, register: Any) -> None:
        register(StorageType(name="gatedreads", options=PosixOptions,
                             create=lambda name, options, ctx: GatedReadsStorage(name, options, self.gate)))
