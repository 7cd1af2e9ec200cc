"""``moverd archive`` takes any configured storage location, not only a folder: the S3 path can be
tried before a catalog is wired in. Real S3 server, the real command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.support.s3 import s3_landing_toml
from tests.support.trees import read_tree

MOVERD = [sys.executable, "-m", "moverd"]


def test_archive_a_landing_prefix_by_storage_name_or_s3_url(tmp_path: Path, s3_options: dict[str, Any],
                                                            s3_server: Any) -> None:
    bucket = s3_options["bucket"]
    prefix = "openem-network/datasets/20.500.11935/abc/raw_files"
    files = {"a.tif": os.urandom(70_000), "sub/b.mrc": os.urandom(300_000), "empty.log": b""}
    client = s3_server.client()
    for name, data in files.items():
        client.put_object(Bucket=bucket, Key=f"{prefix}/{name}", Body=data)
    client.put_object(Bucket=bucket, Key="openem-network/datasets/other/x", Body=b"not this dataset")
    cfg = tmp_path / "moverd.toml"
    cfg.write_text(s3_landing_toml(s3_options, state_dir=str(tmp_path / "state")))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOVERD_")}

    def moverd(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*MOVERD, *args, "-c", str(cfg)], env=env, capture_output=True, text=True,
                              timeout=120)

    p = moverd("archive", f"landing:{prefix}", "--json")
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)
    assert res["files"] == 3 and res["bytes"] == sum(map(len, files.values()))
    # The same place named as an S3 URL is the same dataset, archived already.
    p = moverd("archive", f"s3://{bucket}/{prefix}/", "--json")
    assert p.returncode == 0, p.stderr
    again = json.loads(p.stdout)
    assert again["already_archived"] is True and again["dataset"] == res["dataset"]
    # Archived by hand, the files stay in the landing zone.
    listed = client.list_objects_v2(Bucket=bucket, Prefix=prefix)["KeyCount"]
    assert listed == 3
    p = moverd("retrieve", res["dataset"], "--to", str(tmp_path / "out"))
    assert p.returncode == 0, p.stderr
    assert read_tree(tmp_path / "out") == files

    p = moverd("archive", "s3://no-such-bucket/x")
    assert p.returncode == 2 and "no configured s3 storage has the bucket 'no-such-bucket'" in p.stderr
    p = moverd("archive", "landing:nothing/here")
    assert p.returncode == 2 and "'landing:nothing/here' has no files to archive" in p.stderr
