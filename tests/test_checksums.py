"""Per-file checksums: the multi-buffer md5 against hashlib, alone and through the pipeline."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from moverd import checksums
from moverd.app import App
from moverd.services import archive_dataset
from moverd.services.folders import register_folder
from tests.support.apps import make_settings

if shutil.which("cc") or shutil.which("gcc"):
    # With a C compiler the install builds the extension: a silent fallback would hide a build break.
    from moverd import _md5mb
else:  # pragma: no cover - machines without a compiler
    _md5mb = pytest.importorskip("moverd._md5mb")


def _split(data: bytes, rng: random.Random) -> list[memoryview]:
    cuts = sorted(rng.sample(range(len(data) + 1), min(len(data) + 1, rng.randint(0, 4))))
    view = memoryview(data)
    return [view[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


def test_single_stream_matches_hashlib() -> None:
    for n in (0, 1, 55, 56, 63, 64, 65, 119, 120, 127, 128, 4095, 4096, 100_003):
        data = os.urandom(n)
        assert _md5mb.md5(data).hexdigest() == hashlib.md5(data).hexdigest(), n
        h = _md5mb.md5()
        for i in range(0, n, 7):
            h.update(data[i : i + 7])
        assert h.digest() == hashlib.md5(data).digest()
        assert h.copy().hexdigest() == h.hexdigest()  # digests do not finalise the state
    assert (_md5mb.md5().name, _md5mb.md5().digest_size, _md5mb.md5().block_size) == ("md5", 16, 64)


def test_update_many_interleaves_streams_in_order_per_hasher() -> None:
    """Random sizes (block-aligned and not), random splits, streams spread over several calls
    and interleaved within each, more streams than lanes, and other hashers mixed in."""
    rng = random.Random(20261128)
    for _ in range(150):
        count = rng.randint(1, 40)
        datas = [os.urandom(rng.choice([0, 1, 63, 64, 65, 200, 4096, rng.randint(0, 20_000)])) for _ in range(count)]
        hashers = [_md5mb.md5() for _ in datas]
        queues = {i: _split(d, rng) for i, d in enumerate(datas)}
        others = [(hashlib.sha256(), hashlib.sha256()) for _ in range(2)]
        while queues:
            pairs: list[tuple[checksums.Hasher, bytes | memoryview]] = []
            for _ in range(rng.randint(1, 60)):
                if not queues:
                    break
                i = rng.choice(list(queues))
                pairs.append((hashers[i], queues[i].pop(0)))
                if not queues[i]:
                    del queues[i]
            for mine, reference in others:
                pairs.append((mine, b"other"))
                reference.update(b"other")
            _md5mb.update_many(pairs)
        for h, data in zip(hashers, datas, strict=True):
            assert h.hexdigest() == hashlib.md5(data).hexdigest(), len(data)
        assert all(mine.digest() == reference.digest() for mine, reference in others)


_KERNEL_CHECK = """
import hashlib, os, random, sys
from moverd import _md5mb
assert _md5mb.lanes() == int(sys.argv[1]), _md5mb.lanes()
rng = random.Random(int(sys.argv[1]))
for _ in range(40):
    sizes = [rng.choice([0, 1, 63, 64, 65, 4096, rng.randint(0, 300_000)]) for _ in range(rng.randint(2, 40))]
    datas = [os.urandom(n) for n in sizes]
    hashers = [_md5mb.md5() for _ in datas]
    pos = [0] * len(datas)
    while any(p < len(d) for p, d in zip(pos, datas)):
        pairs = []
        for i, d in enumerate(datas):
            if pos[i] < len(d) and rng.random() < 0.7:
                k = rng.randint(1, 70_000)
                pairs.append((hashers[i], d[pos[i]:pos[i] + k]))
                pos[i] += k
        _md5mb.update_many(pairs)
    for h, d in zip(hashers, datas):
        assert h.hexdigest() == hashlib.md5(d).hexdigest(), len(d)
"""


@pytest.mark.parametrize("lanes", [16, 8, 1])
def test_every_kernel_this_cpu_has_matches_hashlib(lanes: int) -> None:
    """Each vector kernel (16 lanes of AVX-512, 8 of AVX2) and the scalar one, chosen with
    ``MOVERD_MD5MB_LANES`` in a fresh interpreter: the kernel in use depends on the CPU, so the
    ones below it would go untested on a machine with a wider one."""
    if lanes > _md5mb.lanes():
        pytest.skip(f"this CPU has no {lanes}-lane kernel")
    env = {**os.environ, "MOVERD_MD5MB_LANES": str(lanes)}
    subprocess.run([sys.executable, "-c", _KERNEL_CHECK, str(lanes)], env=env, check=True, timeout=120)


def test_update_many_rejects_bad_pairs_without_hashing() -> None:
    h = _md5mb.md5(b"abc")
    with pytest.raises(TypeError, match="pairs"):
        _md5mb.update_many([(h, b"x"), (h,)])  # type: ignore[list-item]
    with pytest.raises(TypeError):
        _md5mb.update_many([(h, "not bytes")])  # type: ignore[list-item]
    assert h.hexdigest() == hashlib.md5(b"abc").hexdigest()
    _md5mb.update_many([(h, b"d")])  # the hasher is usable after a refused call
    assert h.hexdigest() == hashlib.md5(b"abcd").hexdigest()


def test_a_hasher_in_use_by_another_call_is_refused() -> None:
    """Two calls on one hasher at once (threads) would both move its state: the second is refused
    with an error, never a crash. Made deterministic here: another hasher's update(), which runs
    while the first call holds the md5 hasher, tries to use it."""
    h = _md5mb.md5()
    seen: list[BaseException] = []

    class Meddler:
        def update(self, data: bytes) -> None:
            for attempt in (lambda: _md5mb.update_many([(h, b"y")]), lambda: h.update(b"y" * 10_000)):
                try:
                    attempt()
                except RuntimeError as exc:
                    seen.append(exc)

    _md5mb.update_many([(h, b"x" * 5000), (Meddler(), b"")])
    assert [str(e) for e in seen] == ["md5 hasher used by two threads at once"] * 2
    assert h.hexdigest() == hashlib.md5(b"x" * 5000).hexdigest()


@pytest.mark.anyio
async def test_archives_hash_md5_multi_buffer_where_the_cpu_allows(app: App) -> None:
    """The pipeline's md5 is multi-buffer on AVX-512 or AVX2 (the drain hashes it); the registry's
    md5, used for single streams such as retrieval, stays hashlib's."""
    assert app.registry.checksums["md5"] is hashlib.md5
    file_hash = app.pipeline.file_hasher()
    vector = _md5mb.lanes() > 1
    assert type(file_hash) is (_md5mb.md5 if vector else type(hashlib.md5()))
    assert checksums.hashes_together(file_hash) == vector
    assert not checksums.hashes_together(hashlib.sha256())


SIZES = [0, 1, 65, 100_000, 256 * 1024, 256 * 1024 + 3, 700_001, 1 << 20, 3 * (1 << 20) + 5]
"""Around the tests' 256 KiB chunk: small files (coalesced), exact chunks, a chunk and a tail,
several chunks, a file bigger than the 1 MiB target."""


@pytest.mark.anyio
@pytest.mark.parametrize("alg", ["md5", "sha256"])
async def test_archived_checksums_match_hashlib(tmp_path: Path, alg: str) -> None:
    """md5 is hashed by the drain in batches (multi-buffer), sha256 by each file's reader: both
    record what hashlib computes over each file."""
    rng = random.Random(7)
    src = tmp_path / "src"
    src.mkdir()
    expected = {}
    for i, size in enumerate(SIZES * 3):
        data = rng.randbytes(size)
        (src / f"f{i:02d}.bin").write_bytes(data)
        expected[f"f{i:02d}.bin"] = hashlib.new(alg, data).hexdigest()
    async with App(make_settings(tmp_path, pipeline={"checksum": alg})) as app:
        ds, source = await register_folder(app, src)
        await archive_dataset(app, ds.pid, source=source)
        blocks = await app.catalog.list_datablocks(ds.pid)
    assert len(blocks) > 3
    got = {m.path: m.checksum for b in blocks for m in b.members}
    assert got == expected
    assert {b.checksum_alg for b in blocks} == {alg}
