"""Built-in checksum algorithms: hashlib's (md5 multi-buffer where the CPU allows), plus xxh3-128
for whole-datablock checks."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import xxhash

from ..checksums import MULTI_BUFFER_MD5, HasherFactory
from ..hookspecs import hookimpl


@hookimpl
def register_checksums(register: Callable[[str, HasherFactory], None]) -> None:
    register("md5", MULTI_BUFFER_MD5 or hashlib.md5)
    for name in ("sha1", "sha256", "sha512", "blake2b"):
        register(name, getattr(hashlib, name))
    register("xxh3_128", xxhash.xxh3_128)
    register("xxh3_64", xxhash.xxh3_64)
