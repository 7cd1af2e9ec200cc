"""Built-in checksum algorithms: hashlib's, plus xxh3-128 for whole-datablock checks. (The
archive pipeline hashes md5 with :data:`~moverd.checksums.MULTI_BUFFER_MD5` where it can; every
single-stream use, such as verifying a retrieved file, is faster with OpenSSL's.)"""

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
