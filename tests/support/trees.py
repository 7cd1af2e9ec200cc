"""Generated datasets on disk, with the awkward cases archives must survive."""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

LONG = "l" * 240 + "-ñ.dat"  # 247 characters, 249 bytes: near the 255-byte component limit


def write(path: Path, data: bytes, mode: int = 0o644, mtime: int = 1_600_000_000) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.chmod(path, mode)
    os.utime(path, (mtime, mtime))


def awkward_tree(root: Path, *, seed: int = 1, big: int = 3 * 2**20) -> dict[str, bytes]:
    """Empty files, a big file, deep folders, unicode and 250+ character names."""
    rnd = random.Random(seed)
    files = {
        "empty.txt": b"",
        "big.bin": rnd.randbytes(big),
        "a/b/c/d/e/f/g/h/deep.txt": b"deep\n",
        "ünïcödé/日本語.txt": "こんにちは".encode(),
        f"long/{LONG}": rnd.randbytes(1000),
        "x/" + "/".join(["sub" + "d" * 60] * 4) + "/path-over-250.txt": b"far",
        "exec.sh": b"#!/bin/sh\necho hi\n",
    }
    for i in range(20):
        files[f"many/f{i:03d}.dat"] = rnd.randbytes(rnd.randint(0, 70_000))
    for rel, data in files.items():
        write(root / rel, data, mode=0o755 if rel.endswith(".sh") else 0o644)
    return files


def small_files_tree(root: Path, count: int, size: int = 8192, seed: int = 2) -> dict[str, bytes]:
    rnd = random.Random(seed)
    files = {f"d{i // 1000:02d}/f{i:05d}.bin": rnd.randbytes(size) for i in range(count)}
    for rel, data in files.items():
        write(root / rel, data)
    return files


def read_tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()
