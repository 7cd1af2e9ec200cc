"""The lean S3 client's SigV4 against botocore's: same URLs, same signatures, byte for byte.

Each case is first given to a real botocore S3 client (the one aiobotocore wraps), whose request
is captured just before it would be sent: that gives the path and query string botocore builds
for the key and parameters, and its Authorization header. The lean client must build the same
path and query, and :class:`moverd_storage_s3.sigv4.Signer` must sign them to the same
Authorization, both for the exact header set botocore sent and (against ``S3SigV4Auth`` itself)
for the headers the lean client sends. The clock is frozen by patching
``botocore.auth.get_current_datetime``, the function ``S3SigV4Auth.add_auth`` takes the time from.
"""

from __future__ import annotations

import datetime
from typing import Any
from urllib.parse import urlsplit

import boto3
import botocore.auth
import pytest
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials
from moverd_storage_s3 import sigv4
from moverd_storage_s3.fastget import FastGetter

ACCESS, SECRET, REGION = "AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", "eu-central-1"
ENDPOINT = "http://127.0.0.1:9"  # never contacted: requests are captured before sending
BUCKET = "data-bucket"
NOW = datetime.datetime(2024, 2, 29, 23, 59, 58)
AMZ_DATE = NOW.strftime("%Y%m%dT%H%M%SZ")

KEYS = [
    "plain/key.bin",
    "dir with spaces/file name.txt",
    "plus+sign/a+b=c.tar",
    "percent%20literal/100%.dat",
    "tilde~/~home/x~y",
    "unicode/ÄÖÜ ß/日本語/ファイル.bin",
    "emoji/📦 box.tar",
    "punct/!$&'()*,;:@[]{}|^`\"<>#?.bin",
    "double//slash/./dot/../dotdot",
    "long/" + "x" * 250 + "/" + "é" * 300,
]


class _CapturedError(Exception):
    def __init__(self, request: Any) -> None:
        super().__init__("captured")
        self.request = request


@pytest.fixture(scope="module")
def frozen() -> Any:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(botocore.auth, "get_current_datetime", lambda *a, **k: NOW)
        yield


@pytest.fixture(scope="module")
def botocore_client(frozen: Any) -> Any:
    client = boto3.client(
        "s3", endpoint_url=ENDPOINT, region_name=REGION, aws_access_key_id=ACCESS,
        aws_secret_access_key=SECRET,
        config=Config(s3={"addressing_style": "path"}, retries={"total_max_attempts": 1},
                      signature_version="s3v4"),
    )

    def capture(request: Any, **kwargs: Any) -> None:
        raise _CapturedError(request)

    client.meta.events.register("before-send.s3", capture)
    return client


@pytest.fixture(scope="module")
def getter() -> FastGetter:
    return FastGetter(
        endpoint_url=ENDPOINT, region=REGION, bucket=BUCKET, access_key=ACCESS, secret_key=SECRET,
        addressing_style="path", connect_timeout=1, read_timeout=1, attempts=1, max_connections=1,
    )


def botocore_request(client: Any, method: str, **params: Any) -> Any:
    with pytest.raises(_CapturedError) as info:
        getattr(client, method)(**params)
    return info.value.request


def split_lean(request: bytes) -> tuple[str, str, dict[str, str]]:
    """Path, query and headers of a request built by the lean client."""
    head = request.decode("latin-1").split("\r\n\r\n")[0]
    first, *lines = head.split("\r\n")
    _method, target, _ = first.split(" ")
    path, _, query = target.partition("?")
    headers = dict(line.split(": ", 1) for line in lines)
    return path, query, headers


def text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def sorted_query(query: str) -> str:
    return "&".join(sorted(query.split("&"))) if query else ""


def assert_same_signature(captured: Any, lean: bytes, method: str = "GET") -> None:
    """The lean request has botocore's path and query, and signing botocore's exact header set
    with the lean signer gives botocore's Authorization."""
    url = urlsplit(captured.url)
    path, query, lean_headers = split_lean(lean)
    assert path == url.path
    assert query == sorted_query(url.query)
    # botocore adds some headers (amz-sdk-*) after signing: take those its signature covers
    authorization = text(captured.headers["Authorization"])
    signed = authorization.split("SignedHeaders=")[1].split(",")[0].split(";")
    headers = {k: text(v) for k, v in captured.headers.items()
               if k.lower() in signed and k.lower() not in ("x-amz-date", "x-amz-content-sha256")}
    headers["host"] = url.netloc
    ours = sigv4.Signer(ACCESS, SECRET, REGION).sign(method, url.path, query, headers, amz_date=AMZ_DATE)
    assert text(captured.headers["X-Amz-Content-SHA256"]) == sigv4.EMPTY_SHA256 == lean_headers["X-Amz-Content-SHA256"]
    assert ours["Authorization"] == authorization


def botocore_signs(url: str, headers: dict[str, str], method: str = "GET") -> dict[str, str]:
    request = AWSRequest(method=method, url=url, headers=dict(headers))
    S3SigV4Auth(Credentials(ACCESS, SECRET), "s3", REGION).add_auth(request)
    return dict(request.headers.items())


def assert_lean_request_signed_like_botocore(lean: bytes, method: str = "GET") -> None:
    """``S3SigV4Auth`` given the lean request's URL and headers signs it exactly the same."""
    path, query, headers = split_lean(lean)
    given = {k: v for k, v in headers.items()
             if k not in ("Authorization", "X-Amz-Date", "X-Amz-Content-SHA256", "Connection")}
    url = f"http://{headers['Host']}{path}" + (f"?{query}" if query else "")
    expected = botocore_signs(url, given, method)
    assert headers["Authorization"] == expected["Authorization"]
    assert headers["X-Amz-Date"] == expected["X-Amz-Date"] == AMZ_DATE
    assert headers["X-Amz-Content-SHA256"] == expected["X-Amz-Content-SHA256"]


@pytest.fixture
def lean_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sigv4, "amz_now", lambda: AMZ_DATE)


@pytest.mark.parametrize("key", KEYS)
@pytest.mark.parametrize(
    "kind", ["whole", "range", "open-range", "if-match"],
)
def test_get_object_signature(botocore_client: Any, getter: FastGetter, lean_clock: None, key: str,
                              kind: str) -> None:
    params: dict[str, Any] = {"Bucket": BUCKET, "Key": key}
    headers: dict[str, str] = {}
    if kind == "range":
        params["Range"] = headers["Range"] = "bytes=1048576-2097151"
    elif kind == "open-range":
        params["Range"] = headers["Range"] = "bytes=700000-"
    elif kind == "if-match":
        params["Range"] = headers["Range"] = "bytes=5-"
        params["IfMatch"] = headers["If-Match"] = '"9b2cf535f27731c974343645a3985328-3"'
    captured = botocore_request(botocore_client, "get_object", **params)
    lean = getter._request("GET", getter._object_path(key), "", headers)
    assert_same_signature(captured, lean)
    assert_lean_request_signed_like_botocore(lean)


@pytest.mark.parametrize(
    "prefix, token",
    [
        ("", None),
        ("datasets/", None),
        ("a b+c/ü/", "1ueGcxLPRx1Tr/XYExHnhbYLgveDs2J/wm36Hy4vbOwM="),
        ("x~y%z&w=v/", "opaque token with spaces+plus/slash=="),
    ],
)
def test_list_signature(botocore_client: Any, getter: FastGetter, lean_clock: None, prefix: str,
                        token: str | None) -> None:
    params: dict[str, Any] = {"Bucket": BUCKET}
    query: list[tuple[str, str]] = [("list-type", "2"), ("encoding-type", "url")]
    if prefix:  # the lean client leaves an empty prefix out, as botocore does when not given
        params["Prefix"] = prefix
        query.append(("prefix", prefix))
    if token:
        params["ContinuationToken"] = token
        query.append(("continuation-token", token))
    captured = botocore_request(botocore_client, "list_objects_v2", **params)
    lean = getter._request("GET", getter._bucket_path(), sigv4.canonical_query(query), {})
    assert_same_signature(captured, lean)
    assert_lean_request_signed_like_botocore(lean)


@pytest.mark.parametrize("key", KEYS[:6])
def test_head_signature(botocore_client: Any, getter: FastGetter, lean_clock: None, key: str) -> None:
    captured = botocore_request(botocore_client, "head_object", Bucket=BUCKET, Key=key)
    lean = getter._request("HEAD", getter._object_path(key), "", {})
    assert_same_signature(captured, lean, "HEAD")
    assert_lean_request_signed_like_botocore(lean, "HEAD")


def test_signing_key_is_cached_per_day() -> None:
    signer = sigv4.Signer(ACCESS, SECRET, REGION)
    first = signer.signing_key("20240229")
    assert signer.signing_key("20240229") is first
    assert signer.signing_key("20240301") != first
    # the AWS documentation's example derivation (secret, date, region, service)
    example = sigv4.Signer("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", "us-east-1", "iam")
    assert example.signing_key("20150830").hex() == (
        "c4afb1cc5771d871763a393e44b703571b55cc28424d1a5e86da6ed3c154a4b9"
    )
