"""A storage plugin for bad media: a POSIX directory whose read-back returns one flipped bit.

It is registered through ``register_storages`` like any third-party storage, so the code under
test (the pipeline's verification) runs unchanged; only the medium is bad.
"""

from __future__ import annotations

from typing import Any

from moverd_storage_lts.options import PosixOptions
from moverd_storage_lts.storage import PosixStorage

from moverd import StorageType, hookimpl


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


class BadMediaStorage(PosixStorage):
    async def open_reader(self, key: str, offset: int = 0, length: int | None = None, *,
                          uncached: bool = False) -> Any:
        reader = await super().open_reader(key, offset, length, uncached=uncached)
        return _FlippingReader(reader) if uncached and key.endswith(".tar") else reader


class BadMediaPlugin:
    @hookimpl
    def register_storages(self, register: Any) -> None:
        register(StorageType(name="badmedia", options=PosixOptions,
                             create=lambda name, options, ctx: BadMediaStorage(name, options)))
