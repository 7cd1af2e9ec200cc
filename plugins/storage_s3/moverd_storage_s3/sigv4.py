"""AWS Signature Version 4 for the lean client's bodiless requests (GET object, ListObjectsV2, HEAD).

botocore's ``S3SigV4Auth`` costs about 0.6 ms of CPU per request (an ``AWSRequest``, header
dictionaries, the signing key derived anew each time) and importing it pulls in all of botocore
(0.1 s, more with aioboto3). These requests need a fraction of that: the signing key depends
only on the date and the region, so it is derived once a day; what remains per request is two
SHA-256 and one HMAC.

The output is byte for byte what ``S3SigV4Auth`` produces for the same request over plain HTTP
(``tests/test_storage_s3_sigv4.py`` checks it against botocore):

* the payload hash is the SHA-256 of the empty body, sent as ``x-amz-content-sha256``: botocore
  signs payloads on ``http://`` endpoints, and these requests have none (``UNSIGNED-PAYLOAD`` is
  what it uses over TLS only);
* the canonical URI is the path as sent, not normalised and not encoded a second time (S3's
  rule); keys are encoded like botocore encodes the greedy ``{Key+}`` label: UTF-8, every byte
  but unreserved characters and ``/`` percent-encoded (space ``%20``, ``+`` ``%2B``, ``%``
  ``%25``; ``~`` stays);
* the canonical query string has names and values encoded the same way (``/`` too), sorted by
  encoded name, then value;
* every header given is signed, names lower-cased, values trimmed with inner runs of spaces
  squeezed.
"""

from __future__ import annotations

import hashlib
import hmac
import threading
import time
from collections.abc import Iterable, Mapping
from urllib.parse import quote

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
"""The payload hash of a request without a body."""
ALGORITHM = "AWS4-HMAC-SHA256"
TIMESTAMP_FORMAT = "%Y%m%dT%H%M%SZ"


def quote_key(key: str) -> str:
    """An object key as it appears in the request path (and, unchanged, in the canonical URI)."""
    return quote(key, safe="/~")


def quote_param(value: str) -> str:
    """A query parameter name or value, encoded as SigV4 wants it (``/`` included)."""
    return quote(value, safe="-_.~")


def canonical_query(params: Mapping[str, str] | Iterable[tuple[str, str]]) -> str:
    """The query string, encoded and sorted: it is both sent and signed as is."""
    items = params.items() if isinstance(params, Mapping) else params
    return "&".join(f"{k}={v}" for k, v in sorted((quote_param(k), quote_param(v)) for k, v in items))


def amz_now() -> str:
    """The current UTC time in ``x-amz-date`` format."""
    return time.strftime(TIMESTAMP_FORMAT, time.gmtime())


class Signer:
    """Signs requests for one access key, region and service; safe to share between threads.

    The signing key is cached for the last date seen: the cache is one tuple replaced whole, so
    concurrent threads at worst derive the same key twice around midnight.
    """

    def __init__(self, access_key: str, secret_key: str, region: str, service: str = "s3") -> None:
        self.access_key = access_key
        self.region = region
        self.service = service
        self._secret = f"AWS4{secret_key}".encode()
        self._cached: tuple[str, bytes] = ("", b"")
        self._lock = threading.Lock()

    def signing_key(self, date: str) -> bytes:
        """``HMAC(HMAC(HMAC(HMAC("AWS4"+secret, date), region), service), "aws4_request")``."""
        cached = self._cached
        if cached[0] == date:
            return cached[1]
        key = self._secret
        for part in (date, self.region, self.service, "aws4_request"):
            key = hmac.new(key, part.encode(), hashlib.sha256).digest()
        with self._lock:
            self._cached = (date, key)
        return key

    def sign(
        self, method: str, path: str, query: str, headers: Mapping[str, str], *,
        amz_date: str | None = None, payload_hash: str = EMPTY_SHA256,
    ) -> dict[str, str]:
        """The headers to add to a request: ``X-Amz-Date``, ``X-Amz-Content-SHA256`` and
        ``Authorization``.

        ``path`` is the encoded path as sent (see :func:`quote_key`), ``query`` the encoded query
        string as sent (see :func:`canonical_query`), ``headers`` every other header to sign,
        ``Host`` included. ``amz_date`` fixes the timestamp (tests); by default, now.
        """
        stamp = amz_date or amz_now()
        date = stamp[:8]
        signed: dict[str, list[str]] = {}
        for name, value in headers.items():
            signed.setdefault(name.lower(), []).append(" ".join(value.split()))
        signed.setdefault("x-amz-date", []).append(stamp)
        signed.setdefault("x-amz-content-sha256", []).append(payload_hash)
        names = sorted(signed)
        canonical_headers = "".join(f"{n}:{','.join(signed[n])}\n" for n in names)
        signed_headers = ";".join(names)
        canonical_request = "\n".join(
            (method.upper(), path, query, canonical_headers, signed_headers, payload_hash)
        )
        scope = f"{date}/{self.region}/{self.service}/aws4_request"
        string_to_sign = "\n".join(
            (ALGORITHM, stamp, scope, hashlib.sha256(canonical_request.encode()).hexdigest())
        )
        signature = hmac.new(self.signing_key(date), string_to_sign.encode(), hashlib.sha256).hexdigest()
        return {
            "X-Amz-Date": stamp,
            "X-Amz-Content-SHA256": payload_hash,
            "Authorization": (
                f"{ALGORITHM} Credential={self.access_key}/{scope}, "
                f"SignedHeaders={signed_headers}, Signature={signature}"
            ),
        }
