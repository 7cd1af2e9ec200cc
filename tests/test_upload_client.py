"""``moverd upload``'s PUTs through presigned URLs, against moto behind the fault proxy: a 5xx
answer or a connection that dies mid-request is sent again from the same buffer, a 4xx is not,
and what lands in S3 is the file's bytes. (moto stores the checksums it is sent but checks none,
so the refusal of a wrong one is tested through the daemon's complete, in test_ingest_api.)"""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

import pytest

from moverd.errors import UserError
from moverd_cli.upload import ApiError, Uploader, b64sha256
from tests.support.faultproxy import FaultProxy, only_proxy
from tests.support.s3 import S3Server


def presigned_put(s3: S3Server, endpoint: str, bucket: str, key: str) -> str:
    """A PUT URL signed for ``endpoint`` (the proxy), base64 as the daemon's ``presignedPuts`` answers."""
    url = s3.client(endpoint).generate_presigned_url(
        "put_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=600)
    return base64.b64encode(url.encode()).decode()


@pytest.fixture
def uploader() -> Uploader:
    return Uploader("http://127.0.0.1:9", None, part_size=5 * 1024**2, parallel=2, timeout=10)


@pytest.mark.parametrize("fault", ["503", "drop"])
def test_a_put_is_sent_again_after_a_server_error_or_a_dead_connection(
    s3_server: S3Server, s3_fault_proxy: FaultProxy, uploader: Uploader, tmp_path: Path, fault: str
) -> None:
    bucket = s3_server.create_bucket()
    data = hashlib.sha256(b"seed").digest() * 40_000  # 1.2 MiB, not a multiple of anything
    (tmp_path / "f.bin").write_bytes(data)
    url = presigned_put(s3_server, s3_fault_proxy.url, bucket, "ds/f.bin")
    if fault == "503":
        s3_fault_proxy.fail_next(2, status=503, method="PUT")
    else:
        s3_fault_proxy.drop_next(1, method="PUT")
    buf = memoryview(bytearray(len(data) + 100))[:len(data)]
    uploader._send_file_blocking(url, tmp_path / "f.bin", buf)
    puts = [r for r in s3_fault_proxy.seen if r[0] == "PUT"]
    assert len(puts) == (3 if fault == "503" else 2)
    assert s3_server.client().get_object(Bucket=bucket, Key="ds/f.bin")["Body"].read() == data


def test_a_refused_put_is_not_sent_again_and_names_the_answer(
    s3_server: S3Server, s3_fault_proxy: FaultProxy, uploader: Uploader
) -> None:
    bucket = s3_server.create_bucket()
    s3_fault_proxy.fail_always(status=403, code="AccessDenied", method="PUT")
    data = b"x" * 1000
    url = presigned_put(s3_server, s3_fault_proxy.url, bucket, "ds/x")
    with pytest.raises(ApiError, match="PUT to S3 answered 403"):
        uploader._put_blocking(url, memoryview(data), b64sha256(data))
    assert [r[0] for r in s3_fault_proxy.seen] == ["PUT"]
    assert s3_server.client().list_objects_v2(Bucket=bucket).get("KeyCount") == 0



def test_a_put_goes_through_the_proxy_the_environment_names(
    s3_server: S3Server, s3_fault_proxy: FaultProxy, uploader: Uploader, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With HTTP_PROXY set (a user and a password in it, one of them %-encoded), the PUT goes to
    the proxy with the whole URL and the proxy's credentials, as the API calls go through httpx;
    NO_PROXY naming S3's host sends it straight again."""
    only_proxy(monkeypatch, "HTTP_PROXY", f"http://uploader:p%40ss@127.0.0.1:{s3_fault_proxy.port}")
    bucket = s3_server.create_bucket()
    data = hashlib.sha256(b"proxied").digest() * 1000
    (tmp_path / "p.bin").write_bytes(data)
    url = presigned_put(s3_server, s3_server.endpoint_url, bucket, "ds/p.bin")  # S3's own address
    uploader._send_file_blocking(url, tmp_path / "p.bin", memoryview(bytearray(len(data))))
    puts = [target for method, target, _ in s3_fault_proxy.seen if method == "PUT"]
    assert len(puts) == 1 and puts[0].startswith(f"{s3_server.endpoint_url}/{bucket}/ds/p.bin?"), puts
    assert s3_fault_proxy.proxy_authorizations == ["Basic " + base64.b64encode(b"uploader:p@ss").decode()]
    assert s3_server.client().get_object(Bucket=bucket, Key="ds/p.bin")["Body"].read() == data
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")  # read once per run: the next run's client
    url = presigned_put(s3_server, s3_server.endpoint_url, bucket, "ds/q.bin")
    next_run = Uploader("http://127.0.0.1:9", None, part_size=5 * 1024**2, parallel=2, timeout=10)
    next_run._send_file_blocking(url, tmp_path / "p.bin", memoryview(bytearray(len(data))))
    assert len(s3_fault_proxy.seen) == 1
    assert s3_server.client().get_object(Bucket=bucket, Key="ds/q.bin")["Body"].read() == data


@pytest.mark.parametrize(("variable", "proxy", "said"), [
    ("HTTPS_PROXY", "ftp://up:secret@127.0.0.1:21", "Unknown scheme for proxy URL"),  # httpx refuses it
    ("HTTP_PROXY", "http://up:secret@127.0.0.1:99999", "Failed to parse: <its URL>"),  # urllib3 refuses it
])
def test_a_proxy_setting_that_cannot_be_used_is_one_clear_error(
    s3_server: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, variable: str, proxy: str, said: str
) -> None:
    """Named at once, without the proxy's password, and not retried as if S3 had failed."""
    bucket = s3_server.create_bucket()
    url = presigned_put(s3_server, s3_server.endpoint_url, bucket, "ds/x")
    only_proxy(monkeypatch, variable, proxy)
    with pytest.raises(UserError, match="the proxy the environment names") as refused:
        uploader = Uploader("http://127.0.0.1:9", None, part_size=5 * 1024**2, parallel=2, timeout=10)
        uploader._put_blocking(url, memoryview(b"x"), b64sha256(b"x"))
    assert said in str(refused.value) and "secret" not in str(refused.value)
