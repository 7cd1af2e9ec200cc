"""Tar framing: headers come from tarfile.TarInfo; GNU tar and Python read them."""

import io
import os
import shutil
import subprocess
import tarfile

import pytest

from moverd.tarframe import end_of_archive, member_header, padding

BIG = 9 * 2**30  # over the 8 GiB limit of the ustar size field: needs a pax size record


def test_pax_header_for_sizes_over_8_gib_is_read_back_by_tarfile():
    hdr = member_header("dir/big.bin", BIG, mtime=1_700_000_000, mode=0o640, uid=1234, gid=5678)
    assert b"size=" in hdr  # the pax record carries the size
    tf = tarfile.open(fileobj=io.BytesIO(hdr + bytes(1024)), mode="r|")
    info = tf.next()
    assert (info.name, info.size, info.mtime, info.mode, info.uid, info.gid) == (
        "dir/big.bin", BIG, 1_700_000_000, 0o640, 1234, 5678,
    )


@pytest.mark.skipif(shutil.which("tar") is None, reason="GNU tar not installed")
def test_gnu_tar_lists_a_member_over_8_gib(tmp_path):
    # A sparse tar: header, 9 GiB of holes, padding and end blocks; no disk space used.
    path = tmp_path / "big.tar"
    hdr = member_header("big.bin", BIG)
    with open(path, "wb") as f:
        f.write(hdr)
        f.seek(len(hdr) + BIG)
        f.write(padding(BIG))
        f.write(end_of_archive(f.tell()))
    out = subprocess.run(["tar", "tvf", str(path)], capture_output=True, text=True, check=True).stdout
    assert str(BIG) in out and "big.bin" in out


def test_long_unicode_names_and_modes():
    name = "ü" * 10 + "/" + "x" * 250 + "ñ.txt"
    data = b"hello"
    blob = member_header(name, len(data), mode=0o600) + data + bytes(padding(len(data)))
    blob += bytes(end_of_archive(len(blob)))
    assert len(blob) % tarfile.RECORDSIZE == 0
    with tarfile.open(fileobj=io.BytesIO(blob)) as tf:
        (m,) = tf.getmembers()
        assert m.name == name and m.mode == 0o600
        assert tf.extractfile(m).read() == data


def test_padding_completes_blocks():
    assert len(padding(0)) == 0 and len(padding(1)) == 511 and len(padding(512)) == 0
    assert os.path.basename("x") == "x"
