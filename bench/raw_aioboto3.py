"""The plain reference: list a prefix and download every object to a folder, concurrently.

Only aioboto3 and the standard library: N workers take keys from a queue, stream each body in
chunks and write it with ``os.write`` (to the page cache, no fsync, like ``s5cmd cp``)::

    python -m bench.raw_aioboto3 --endpoint URL --bucket B --prefix P --out DIR [--concurrency 32]

Credentials come from the environment (``AWS_ACCESS_KEY_ID``...). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from typing import Any

import aioboto3
from aiobotocore.config import AioConfig

_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC


def _open(path: str) -> int:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return os.open(path, _FLAGS, 0o644)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


async def download(endpoint: str, bucket: str, prefix: str, out: str, concurrency: int, chunk: int) -> dict[str, Any]:
    session = aioboto3.Session()
    config = AioConfig(
        max_pool_connections=concurrency, retries={"total_max_attempts": 5, "mode": "standard"},
        # No CRC32 of every body (botocore's "when_supported" default): moverd does not pay it either.
        request_checksum_calculation="when_required", response_checksum_validation="when_required",
    )
    t0 = time.perf_counter()
    async with session.client("s3", endpoint_url=endpoint, config=config) as client:
        keys: list[str] = []
        async for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            keys.extend(o["Key"] for o in page.get("Contents", []))
        listed = time.perf_counter() - t0
        queue: asyncio.Queue[str] = asyncio.Queue()
        for k in keys:
            queue.put_nowait(k)
        total = 0
        strip = len(prefix)

        async def worker() -> None:
            nonlocal total
            while True:
                try:
                    key = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                resp = await client.get_object(Bucket=bucket, Key=key)
                body = resp["Body"]
                fd = _open(os.path.join(out, key[strip:].lstrip("/")))
                try:
                    while data := await body.read(chunk):
                        _write_all(fd, data)
                        total += len(data)
                finally:
                    os.close(fd)
                    body.close()

        await asyncio.gather(*(worker() for _ in range(min(concurrency, len(keys)) or 1)))
    return {"objects": len(keys), "bytes": total, "seconds": time.perf_counter() - t0, "list_seconds": listed}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--endpoint", required=True)
    p.add_argument("--bucket", required=True)
    p.add_argument("--prefix", default="")
    p.add_argument("--out", required=True)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--chunk", type=int, default=1024 * 1024)
    a = p.parse_args()
    print(json.dumps(asyncio.run(download(a.endpoint, a.bucket, a.prefix, a.out, a.concurrency, a.chunk))))


if __name__ == "__main__":
    main()
