"""``moverd retrieve`` into a folder that is not empty: nothing lost, nothing half-done.

Each test drives the real command (a subprocess on the embedded default) or the real POSIX
storage; kills are real SIGKILLs at random points, printed with their seed so that a failure can
be replayed.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import anyio
import pytest
from moverd_storage_lts import PosixOptions, PosixStorage
from moverd_storage_lts.paths import TEMP_MARK, is_temp_name
from moverd_storage_lts.writer import TargetExistsError

from moverd.models import Member
from moverd.services.retrieve import folders_written
from tests.support.cli import MOVERD, cli_env, run
from tests.support.trees import read_tree, write


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return cli_env(tmp_path, MOVERD_PIPELINE__TARGET_SIZE="4MiB")


def archive(src: Path, env: dict[str, str]) -> str:
    pid: str = json.loads(run(["archive", str(src), "--json"], env).stdout)["dataset"]
    return pid


def temp_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if is_temp_name(p.name))


def snapshot(root: Path) -> dict[str, tuple[bytes | None, int]]:
    """Every entry under ``root`` (folders too) with its bytes and inode."""
    return {
        str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None, p.stat().st_ino)
        for p in sorted(root.rglob("*"))
    }


def mixed_tree(root: Path, rnd: random.Random, *, files: int, low: int, high: int) -> dict[str, bytes]:
    """Files of ``low``..``high`` bytes at the top, in a subfolder and in a sub-subfolder."""
    folders = ["", "sub/", "sub/deeper/"]
    tree = {f"{folders[i % 3]}f{i:02d}.bin": rnd.randbytes(rnd.randint(low, high)) for i in range(files)}
    for rel, data in tree.items():
        write(root / rel, data)
    return tree


# -- item 2: never overwrite ----------------------------------------------------------------------


def test_files_that_differ_refuse_the_retrieve_before_anything_is_written(tmp_path: Path, env: dict[str, str]) -> None:
    files = mixed_tree(tmp_path / "src", random.Random(1), files=12, low=0, high=300_000)
    pid = archive(tmp_path / "src", env)
    out = tmp_path / "out"
    names = sorted(files)
    differ = names[:7]
    for rel in differ[:6]:
        write(out / rel, b"the user's own file")
    same_size = differ[6]
    write(out / same_size, bytes(b ^ 0xFF for b in files[same_size]))  # same size, other bytes
    identical = names[7]
    write(out / identical, files[identical], mtime=1_000)
    before = snapshot(out)

    p = run(["retrieve", pid, "--to", str(out)], env, check=False)
    assert p.returncode == 2, p.stderr
    assert p.stderr.count("\n") == 1 and "Traceback" not in p.stderr
    assert "7 file(s)" in p.stderr and "and 2 more" in p.stderr and "--overwrite" in p.stderr
    assert sum(repr(rel) in p.stderr for rel in differ) == 5
    assert snapshot(out) == before  # not a byte written, not a folder created, no temp file

    res = json.loads(run(["retrieve", pid, "--to", str(out), "--overwrite", "--json"], env).stdout)
    assert read_tree(out) == files
    assert res["files"] == len(files) - 1 and res["skipped"] == 1
    assert (out / identical).stat().st_ino == before[identical][1]  # skipped, not rewritten
    assert (out / identical).stat().st_mtime == 1_600_000_000  # but its mtime is the archived one
    assert not temp_files(out)


def test_a_directory_at_a_files_path_refuses_the_retrieve_even_with_overwrite(
    tmp_path: Path, env: dict[str, str]
) -> None:
    files = mixed_tree(tmp_path / "src", random.Random(5), files=8, low=1, high=200_000)
    pid = archive(tmp_path / "src", env)
    out = tmp_path / "out"
    taken = sorted(files)[3]
    (out / taken).mkdir(parents=True)
    (out / taken / "keep.txt").write_bytes(b"the user's own folder")
    before = snapshot(out)
    for extra in ([], ["--overwrite"]):
        p = run(["retrieve", pid, "--to", str(out), *extra], env, check=False)
        assert p.returncode == 2, p.stderr
        assert "Traceback" not in p.stderr and p.stderr.count("\n") == 1
        assert repr(taken) in p.stderr and "not a file" in p.stderr and "nothing was written" in p.stderr
        assert snapshot(out) == before  # not a file written, the folder and its file untouched


def test_a_rerun_skips_identical_files(tmp_path: Path, env: dict[str, str]) -> None:
    files = mixed_tree(tmp_path / "src", random.Random(2), files=9, low=0, high=400_000)
    pid = archive(tmp_path / "src", env)
    out = tmp_path / "out"
    run(["retrieve", pid, "--to", str(out)], env)
    before = snapshot(out)
    res = json.loads(run(["retrieve", pid, "--to", str(out), "--json"], env).stdout)
    assert (res["files"], res["skipped"], res["bytes"]) == (0, len(files), 0)
    assert snapshot(out) == before
    text = run(["retrieve", pid, "--to", str(out)], env).stdout
    assert f"{len(files)} already there and identical (skipped)" in text


def test_partial_retrieve_refuses_only_its_own_conflicts(tmp_path: Path, env: dict[str, str]) -> None:
    files = mixed_tree(tmp_path / "src", random.Random(3), files=6, low=10, high=50_000)
    pid = archive(tmp_path / "src", env)
    out = tmp_path / "out"
    mine, other = "sub/f01.bin", "f00.bin"
    write(out / mine, b"mine")
    write(out / other, b"also mine")
    p = run(["retrieve", pid, "--to", str(out), "--file", mine], env, check=False)
    assert p.returncode == 2 and repr(mine) in p.stderr and repr(other) not in p.stderr, p.stderr
    assert (out / mine).read_bytes() == b"mine"
    run(["retrieve", pid, "--to", str(out), "--file", "sub/deeper/f02.bin"], env)
    assert read_tree(out) == {mine: b"mine", other: b"also mine", "sub/deeper/f02.bin": files["sub/deeper/f02.bin"]}
    run(["retrieve", pid, "--to", str(out), "--file", mine, "--overwrite"], env)
    assert (out / mine).read_bytes() == files[mine] and (out / other).read_bytes() == b"also mine"


def test_a_file_created_while_the_retrieve_runs_is_not_overwritten(tmp_path: Path, env: dict[str, str]) -> None:
    """The folder is empty at the start (so the retrieve checks nothing up front); the user creates
    the big file while moverd is writing it: the publish must refuse, and leave the user's file."""
    rnd = random.Random(4)
    write(tmp_path / "src" / "big.bin", rnd.randbytes(48 << 20))
    write(tmp_path / "src" / "small.txt", b"small")
    pid = archive(tmp_path / "src", env)
    for attempt in range(8):
        out = tmp_path / f"out{attempt}"
        proc = subprocess.Popen([*MOVERD, "retrieve", pid, "--to", str(out)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            if out.is_dir() and any(p.name.startswith(".big.bin" + TEMP_MARK) for p in out.iterdir()):
                break
            time.sleep(0.001)
        try:
            with open(out / "big.bin", "xb") as f:  # O_EXCL: fails if moverd published first
                f.write(b"the user's file")
        except FileExistsError:
            proc.wait(timeout=60)
            continue  # moverd was faster this time; try again
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 2, err
        assert "appeared while it was being written" in err and "Traceback" not in err
        assert (out / "big.bin").read_bytes() == b"the user's file"
        assert not temp_files(out)
        return
    pytest.fail("the retrieve published big.bin before the test could create it, 8 times")


@pytest.mark.anyio
async def test_posix_storage_without_overwrite_never_replaces(tmp_path: Path) -> None:
    store = PosixStorage("t", PosixOptions(root=tmp_path, overwrite=False))
    await store.put("a.txt", b"first")
    with pytest.raises(TargetExistsError):
        await store.put("a.txt", b"second")
    writer = await store.open_writer("b.txt")
    await writer.write(b"moverd's")
    (tmp_path / "b.txt").write_bytes(b"the user's")
    os.symlink("nowhere", tmp_path / "dangling")
    with pytest.raises(TargetExistsError):
        await writer.commit()
    with pytest.raises(TargetExistsError):
        await store.put("dangling", b"x")
    assert (tmp_path / "a.txt").read_bytes() == b"first" and (tmp_path / "b.txt").read_bytes() == b"the user's"
    assert os.readlink(tmp_path / "dangling") == "nowhere"
    assert not temp_files(tmp_path)
    replacing = PosixStorage("r", PosixOptions(root=tmp_path))
    await replacing.put("a.txt", b"second")
    assert (tmp_path / "a.txt").read_bytes() == b"second"


# -- item 3: a killed retrieve leaves nothing behind once the next one ran --------------------------


def test_killed_retrieves_leave_no_temp_files_after_the_next_one(tmp_path: Path, env: dict[str, str]) -> None:
    seed = random.randrange(2**32)
    rnd = random.Random(seed)
    files = mixed_tree(tmp_path / "src", rnd, files=15, low=1 << 20, high=4 << 20)
    pid = archive(tmp_path / "src", env)
    kills = left_by_kills = 0
    for round_ in range(3):
        out = tmp_path / f"out{round_}"
        killed = 0
        for _ in range(8):  # two dead retrieves in a row, the second one into the first one's mess
            if killed == 2:
                break
            proc = subprocess.Popen([*MOVERD, "retrieve", pid, "--to", str(out)], env=env,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + 60
            while proc.poll() is None and time.monotonic() < deadline and not (out.is_dir() and temp_files(out)):
                time.sleep(0.002)
            # A random point of the run: a busy machine may finish it first (then try again).
            time.sleep(rnd.uniform(0, 0.05))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills += 1
                killed += 1
            else:  # it finished first: this round's mess starts again from nothing
                shutil.rmtree(out, ignore_errors=True)
                killed = 0
            proc.wait(timeout=60)
            left_by_kills += len(temp_files(out))
        run(["retrieve", pid, "--to", str(out)], env)
        assert not temp_files(out), f"seed {seed}: {temp_files(out)}"
        assert read_tree(out) == files, f"seed {seed}"
    print(f"seed {seed}: {kills} kills, {left_by_kills} temp files seen right after them")
    assert kills >= 3, f"seed {seed}: only {kills} retrieves were still running when killed"
    assert left_by_kills > 0, f"seed {seed}: no kill left a temp file, so nothing was tested"


_LIVE_WRITER = textwrap.dedent("""
    import sys, anyio
    from moverd_storage_lts import PosixOptions, PosixStorage

    async def main():
        store = PosixStorage("w", PosixOptions(root=sys.argv[1]))
        writer = await store.open_writer(sys.argv[2])
        await writer.write(b"still writing")
        print("ready", flush=True)
        sys.stdin.read()  # until killed

    anyio.run(main)
""")


def test_a_temp_file_of_a_live_writer_in_another_process_survives_the_sweep(
    tmp_path: Path, env: dict[str, str]
) -> None:
    write(tmp_path / "src" / "sub" / "one.bin", b"one")
    write(tmp_path / "src" / "two.bin", b"two")
    pid = archive(tmp_path / "src", env)
    out = tmp_path / "out"
    dead = out / "sub" / f".gone.bin{TEMP_MARK}0123456789ab"
    write(dead, b"left by a retrieve that was killed")
    live = subprocess.Popen([sys.executable, "-c", _LIVE_WRITER, str(out), "sub/other.bin"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert live.stdout is not None and live.stdout.readline() == "ready\n"
        [live_tmp] = [p for p in temp_files(out) if p.name.startswith(".other.bin")]
        os.utime(live_tmp, (1_000, 1_000))  # paused for decades, yet alive
        res = json.loads(run(["retrieve", pid, "--to", str(out), "--json"], env).stdout)
        assert res["removed_temp_files"] == 1
        assert live_tmp.exists() and not dead.exists()
        # And through the storage's own sweep, however old the file looks:
        assert anyio.run(PosixStorage("s", PosixOptions(root=out)).remove_stale_temp_files, 0) == 0
        assert live_tmp.exists()
    finally:
        live.send_signal(signal.SIGKILL)
        live.wait(timeout=30)
    res = json.loads(run(["retrieve", pid, "--to", str(out), "--json"], env).stdout)
    assert res["removed_temp_files"] == 1 and res["skipped"] == 2
    assert not temp_files(out)


def test_the_sweep_covers_each_folder_once() -> None:
    def paths(*ps: str) -> list[Member]:
        return [Member(path=p, size=0, offset=0, header_offset=0, checksum="") for p in ps]

    assert folders_written(paths("a/x", "a b/y", "a/b/z", "c/d/e", "c/f", "c/d/g/h")) == ["a", "a b", "c"]
    assert folders_written(paths("a/x", "top")) == [""]
    assert folders_written(paths("a/b/c/x", "a/b/y")) == ["a/b"]


# -- item 9a: --to a file -------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["a-file", "a-file/below"])
def test_retrieve_to_a_file_is_a_user_error(tmp_path: Path, env: dict[str, str], where: str) -> None:
    write(tmp_path / "src" / "x.txt", b"x")
    pid = archive(tmp_path / "src", env)
    (tmp_path / "a-file").write_bytes(b"keep me")
    p = run(["retrieve", pid, "--to", str(tmp_path / where)], env, check=False)
    assert p.returncode == 2, p.stderr
    assert p.stderr.count("\n") == 1 and "is a file, not a folder" in p.stderr and "Traceback" not in p.stderr
    assert (tmp_path / "a-file").read_bytes() == b"keep me"
