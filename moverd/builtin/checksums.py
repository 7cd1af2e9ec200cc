"""Built-in checksum algorithms: hashlib's, plus xxh3-128 for whole-datablock checks."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import xxhash

from ..checksums import HasherFactory
from ..hookspecs import hookimpl


@hookimpl
def register_checksums(register: Callable[[str, HasherFactory], None]) -> None:
    for name in ("md5", "sha1", "sha256", "sha512", "blake2b"):
        register(name, getattr(hashlib, name))
    register("xxh3_128", xxhash.xxh3_128)
    register("xxh3_64", xxhash.xxh3_64)
