"""``moverd upload`` against a real ``moverd serve`` with the upload API on: the whole flow
(upload, finalize, archive job, datablocks registered, landing zone deleted), and a run killed
with SIGKILL that a second run resumes without sending a part twice (moto's request log is the
witness)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.support.cli import MOVERD, cli_env, moverd, moverd_on_terminal, moverd_peak_rss
from tests.support.daemon import Daemon, JWKSServer, wait_for
from tests.support.facility import Facility
from tests.support.faultproxy import FaultProxy
from tests.support.s3 import S3Server
from tests.support.scicat.fixtures import session_server

MIB = 1024**2
GROUP = "p12345"
UPLOADING = {"isOnCentralDisk": False, "archiveStatusMessage": "filesNotYetAvailable", "archivable": False}


@dataclass
class Served:
    daemon: Daemon
    facility: Facility
    idp: JWKSServer
    s3: S3Server

    def env(self, tmp: Path) -> dict[str, str]:
        token = self.idp.mint(groups=[f"/{GROUP}"], expires_in=3600)
        return cli_env(tmp, MOVERD_URL=self.daemon.url, MOVERD_TOKEN=token)

    def landing(self, pid: str) -> dict[str, int]:
        resp = self.s3.client().list_objects_v2(Bucket=self.facility.landing_bucket,
                                               Prefix=f"openem-network/datasets/{pid}/")
        return {o["Key"]: o["Size"] for o in resp.get("Contents", [])}


@contextlib.contextmanager
def ingest_daemon(s3_server: S3Server, template: Path, tmp: Path, name: str,
                  landing_endpoint: str | None = None) -> Iterator[Served]:
    """A daemon with the upload API on a facility of its own; ``landing_endpoint``: the landing
    storage's endpoint (so the URLs it signs), if not the S3 server's own."""
    facility = Facility(scicat=session_server(), s3=s3_server, tmp=tmp, job_api="v4",
                        landing_bucket=s3_server.create_bucket("landing"),
                        retrieval_bucket=s3_server.create_bucket("retrieval"))
    idp = JWKSServer()
    settings = facility.settings_dict()
    if landing_endpoint:
        settings["storages"]["landing"]["endpoint_url"] = landing_endpoint
    settings["server"] = {"shutdown_grace": 10, "readiness_timeout": 10, "auth": idp.auth_settings()}
    settings["ingest"] = {"enabled": True, "landing_space": "4GiB"}
    daemon = Daemon.create(tmp, settings, template=template, name=name)
    daemon.start()
    try:
        daemon.wait_ready()
        yield Served(daemon, facility, idp, s3_server)
    finally:
        daemon.stop(timeout=60)
        idp.close()


@pytest.fixture(scope="module")
def served(s3_server: S3Server, prefect_db_template: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with ingest_daemon(s3_server, prefect_db_template, tmp_path_factory.mktemp("ingest"), "ingest") as served:
        yield served


def make_files(root: Path, files: dict[str, int]) -> None:
    for rel, size in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(os.urandom(size))


def test_the_landing_quota_is_published_before_any_upload(served: Served) -> None:
    def published() -> str | None:
        text = httpx.get(f"{served.daemon.url}/metrics").text
        return text if 'moverd_landing_bytes{kind="free"} 4.294967296e+09' in text else None

    text = wait_for(published, 30, what="the landing quota in the metrics")
    assert 'moverd_landing_bytes{kind="reserved"} 0.0' in text


def test_upload_finalize_archive_whole_flow(served: Served, tmp_path: Path) -> None:
    files = {"raw/a.tif": 3 * MIB, "raw/b.tif": 12 * MIB + 17, "meta.json": 100}
    scicat = served.facility.scicat
    pid = scicat.add_dataset(list(files.items()), owner_group=GROUP, lifecycle=UPLOADING)
    make_files(tmp_path / "ds", files)
    p = moverd(["upload", str(tmp_path / "ds"), "--dataset", pid, "--part-size", "5MiB", "--owner-user", "owner",
                "--owner-group", GROUP, "--contact-email", "owner@example.org", "--json"], served.env(tmp_path))
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)
    assert res["finalized"] and res["parts_sent"] == 3 and res["files"] == 3
    jobs = [j for j in scicat.app.store.jobs.values()
            if j["type"] == "archive" and any(d["pid"] == pid for d in j["jobParams"]["datasetList"])]
    assert len(jobs) == 1 and jobs[0]["ownerUser"] == "owner"
    job_id = str(jobs[0]["id"])
    wait_for(lambda: scicat.job(job_id)["statusCode"] in ("finishedSuccessful", "finishedUnsuccessful"), 120,
             what="the archive job")
    assert scicat.job(job_id)["statusCode"] == "finishedSuccessful", scicat.job(job_id)
    assert scicat.lifecycle(pid)["archiveStatusMessage"] == "datasetOnArchiveDisk"
    blocks = [b for b in scicat.app.store.datablocks.values() if b["datasetId"] == pid]
    archived = {f["path"]: f["size"] for b in blocks for f in b["dataFileList"]}
    assert archived == files
    assert served.landing(pid) == {}  # deleted after the datablocks were verified and registered
    metrics = httpx.get(f"{served.daemon.url}/metrics").text
    assert re.search(r'^moverd_landing_bytes\{kind="reserved"\} ', metrics, re.M), metrics[:500]
    assert re.search(r'^moverd_landing_bytes\{kind="free"\} ', metrics, re.M)
    # finalizing again (a client's retry) makes no second job
    p = moverd(["upload", str(tmp_path / "ds"), "--dataset", pid, "--json"], served.env(tmp_path))
    assert p.returncode == 2 and "finalized" in p.stderr  # the upload is over: a clear refusal


def test_upload_on_a_terminal_shows_a_progress_bar(served: Served, tmp_path: Path) -> None:
    files = {"a.bin": 6 * MIB, "b.txt": 1000}
    pid = served.facility.scicat.add_dataset(list(files.items()), owner_group=GROUP, lifecycle=UPLOADING)
    make_files(tmp_path / "ds", files)
    p, shown = moverd_on_terminal(["upload", str(tmp_path / "ds"), "--dataset", pid, "--part-size", "5MiB",
                                   "--no-archive"], served.env(tmp_path))
    assert p.returncode == 0, shown.decode(errors="replace")
    assert f"upload {pid}".encode() in shown and b"2/2 files" in shown and b"6.0/6.0 MiB" in shown
    assert f"uploaded {pid}: 2 files".encode() in p.stdout.encode()


def test_sigkill_then_rerun_resumes_without_sending_a_part_twice(served: Served, tmp_path: Path) -> None:
    size = 60 * MIB + 3
    scicat = served.facility.scicat
    pid = scicat.add_dataset([("big.bin", size)], owner_group=GROUP, lifecycle=UPLOADING)
    make_files(tmp_path / "ds", {"big.bin": size})
    env = served.env(tmp_path)
    args = ["upload", str(tmp_path / "ds"), "--dataset", pid, "--part-size", "5MiB", "--parallel", "1",
            "--no-archive", "--json"]
    proc = subprocess.Popen(MOVERD + args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    s3 = served.s3.client()
    bucket = served.facility.landing_bucket

    def parts_so_far() -> set[int]:
        uploads = s3.list_multipart_uploads(Bucket=bucket, Prefix=f"openem-network/datasets/{pid}/").get("Uploads")
        if not uploads:
            return set()
        listed = s3.list_parts(Bucket=bucket, Key=uploads[0]["Key"], UploadId=uploads[0]["UploadId"])
        return {p["PartNumber"] for p in listed.get("Parts", [])}

    try:
        wait_for(lambda: len(parts_so_far()) >= 4, 120, interval=0.05, what="4 parts uploaded")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    before = parts_so_far()
    for _ in range(20):  # a part the client had sent whole before it died may still land: let the list settle
        time.sleep(0.5)
        now = parts_so_far()
        if now == before:
            break
        before = now
    assert 4 <= len(before) < 13, before
    log_mark = served.s3.log_path.stat().st_size
    p = moverd(args, env)
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)
    assert res["parts_resumed"] == len(before) and res["parts_sent"] == 13 - len(before)
    with served.s3.log_path.open("rb") as fh:
        fh.seek(log_mark)
        later = fh.read().decode(errors="replace")
    again = {int(n) for n in re.findall(r"PUT /[^ ]*partNumber=(\d+)", later)}
    assert again and not again & before  # none of the parts already there was sent again
    assert served.landing(pid) == {f"openem-network/datasets/{pid}/raw_files/big.bin": size}
    assert scicat.lifecycle(pid)["archivable"] is True


def test_an_expired_url_is_signed_again_and_the_upload_goes_on(
    s3_server: S3Server, prefect_db_template: Path, tmp_path: Path
) -> None:
    """S3 answers 403 "Request has expired" to a presigned URL used after ``ingest.url_expiry``
    (a big file's later parts over a slow link). The client asks the daemon for new URLs, of a
    single PUT or of the open multipart upload (no second upload is created), and goes on."""
    with FaultProxy(s3_server.host, s3_server.port) as proxy, \
            ingest_daemon(s3_server, prefect_db_template, tmp_path, "expiry", landing_endpoint=proxy.url) as served:
        facility, daemon = served.facility, served.daemon
        files = {"small.txt": 1000, "big.bin": 11 * MIB}
        pid = facility.scicat.add_dataset(list(files.items()), owner_group=GROUP, lifecycle=UPLOADING)
        make_files(tmp_path / "ds", files)
        env = cli_env(tmp_path, MOVERD_URL=daemon.url, MOVERD_TOKEN=served.idp.mint(groups=[f"/{GROUP}"]))
        # the first two PUTs, whichever file or part they carry (or a PUT sent again), find their URL expired
        proxy.fail_next(2, status=403, code="AccessDenied", message="Request has expired", method="PUT")
        p = moverd(["upload", str(tmp_path / "ds"), "--dataset", pid, "--part-size", "5MiB", "--parallel", "4",
                    "--no-archive", "--json"], env)
        assert p.returncode == 0, p.stderr
        res = json.loads(p.stdout)
        assert res["finalized"] and res["urls_renewed"] == 2 and res["parts_sent"] == 3
        prefix = f"openem-network/datasets/{pid}/raw_files"
        listed = s3_server.client().list_objects_v2(Bucket=facility.landing_bucket, Prefix=prefix)
        assert {o["Key"]: o["Size"] for o in listed["Contents"]} == {f"{prefix}/{k}": v for k, v in files.items()}
        uploads = s3_server.client().list_multipart_uploads(Bucket=facility.landing_bucket, Prefix=prefix)
        assert not uploads.get("Uploads")  # the renewed URLs were the same upload's: none left open
        assert facility.scicat.lifecycle(pid)["archivable"] is True
        # a refusal that is not an expiry is one line naming S3's answer, exit 1, no traceback
        pid = facility.scicat.add_dataset([("x.txt", 10)], owner_group=GROUP, lifecycle=UPLOADING)
        make_files(tmp_path / "ds2", {"x.txt": 10})
        proxy.fail_always(status=403, code="AccessDenied", method="PUT")
        p = moverd(["upload", str(tmp_path / "ds2"), "--dataset", pid, "--no-archive"], env)
        assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
        assert p.stderr.startswith("moverd: error: PUT to S3 answered 403") and "AccessDenied" in p.stderr


RSS_ALLOWANCE = 96 * MIB
"""What ``moverd upload`` holds besides its part buffers: the interpreter and its libraries (about
55 MiB), sockets and slices in flight. Measured: 120 MiB peak here, and 244 MiB with the client's
earlier part handling, against a bound of 160 MiB."""


def test_upload_memory_is_bounded_by_parallel_parts(served: Served, tmp_path: Path) -> None:
    """A file of 24 parts, 8 at a time: the client holds 8 part buffers, not a copy or three of
    every part in flight (it peaked at 3-4 times the parts' size before its buffers were a pool)."""
    part, parallel = 8 * MIB, 8
    size = 24 * part
    scicat = served.facility.scicat
    pid = scicat.add_dataset([("big.bin", size)], owner_group=GROUP, lifecycle=UPLOADING)
    make_files(tmp_path / "ds", {"big.bin": size})
    p, peak = moverd_peak_rss(["upload", str(tmp_path / "ds"), "--dataset", pid, "--part-size", "8MiB",
                               "--parallel", str(parallel), "--no-archive", "--json"], served.env(tmp_path))
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["parts_sent"] == 24
    assert served.landing(pid) == {f"openem-network/datasets/{pid}/raw_files/big.bin": size}
    bound = parallel * part + RSS_ALLOWANCE
    assert 0 < peak <= bound, f"peak RSS {peak / MIB:.0f} MiB, bound {bound / MIB:.0f} MiB"


def test_the_references_job_route_is_served_too(served: Served) -> None:
    scicat = served.facility.scicat
    pid = scicat.add_dataset([("a", 0)], owner_group=GROUP)
    job_id = scicat.add_job("archive", [pid])
    token = served.idp.mint(expires_in=600)
    r = httpx.post(f"{served.daemon.url}/archiver/jobs", json={"id": job_id, "type": "archive"},
                   headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert r.status_code == 201, r.text
    assert set(r.json()) == {"uuid", "name"}
    # the dataset has nothing in the landing zone: the job runs and ends, whatever its outcome
    wait_for(lambda: scicat.job(job_id)["statusCode"].startswith("finished"), 60, what="the job to run")
    spec = httpx.get(f"{served.daemon.url}/openapi.json", headers={"Authorization": f"Bearer {token}"}).json()
    assert {"/archiver/api/v1/archiver/jobs", "/archiver/api/v1/s3/completeUpload", "/archiver/api/v1/s3/presignedPuts",
            "/archiver/api/v1/token"} <= set(spec["paths"])


def _cpu_seconds(pid: int) -> float:
    """User + system CPU of a process so far (``/proc/<pid>/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.slow
def test_measure_upload_throughput_and_daemon_cpu_per_gib(served: Served, tmp_path: Path) -> None:
    """Not a pass/fail figure (the machine is shared): prints ``moverd upload`` against
    ``s5cmd cp`` of the same files to the same server, and the daemon's CPU per uploaded GiB."""
    import shutil
    import time

    files = {f"f{i:03d}.bin": 2 * MIB for i in range(128)} | {"big.bin": 256 * MIB}
    total = sum(files.values())
    scicat = served.facility.scicat
    pid = scicat.add_dataset(list(files.items()), owner_group=GROUP, lifecycle=UPLOADING)
    make_files(tmp_path / "ds", files)
    assert served.daemon.proc is not None
    cpu0, t0 = _cpu_seconds(served.daemon.proc.pid), time.monotonic()
    p = moverd(["upload", str(tmp_path / "ds"), "--dataset", pid, "--part-size", "16MiB", "--parallel", "16",
                "--no-finalize", "--json"], served.env(tmp_path), timeout=600)
    upload_s, cpu = time.monotonic() - t0, _cpu_seconds(served.daemon.proc.pid) - cpu0
    assert p.returncode == 0, p.stderr
    s5cmd = shutil.which("s5cmd") or str(Path(os.sys.executable).with_name("s5cmd"))
    env = {**os.environ, "AWS_ACCESS_KEY_ID": served.s3.access_key_id,
           "AWS_SECRET_ACCESS_KEY": served.s3.secret_access_key, "AWS_REGION": served.s3.region}
    t0 = time.monotonic()
    done = subprocess.run([s5cmd, "--endpoint-url", served.s3.endpoint_url, "--numworkers", "16", "cp",
                           f"{tmp_path / 'ds'}/*", f"s3://{served.facility.landing_bucket}/s5cmd-{pid}/"],
                          env=env, capture_output=True, text=True, timeout=600)
    s5_s = time.monotonic() - t0
    assert done.returncode == 0, done.stderr
    gib = total / 1024**3
    print(f"\nupload of {gib:.2f} GiB: moverd upload {upload_s:.1f} s, s5cmd cp {s5_s:.1f} s, "
          f"ratio (s5cmd/moverd) {s5_s / upload_s:.2f}; daemon CPU {cpu:.2f} s = {cpu / gib:.2f} s per GiB")
    assert cpu / gib < 5  # the bytes do not pass through the daemon


def test_a_file_beyond_the_part_limit_is_sent_in_bigger_parts(
    served: Served, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """S3 takes at most 10 000 parts (lowered to 2 in the client here; the daemon and S3 are
    real): a file that needs more at --part-size goes in the smallest whole-MiB parts that fit
    it, and S3 holds its bytes in that many parts."""
    import anyio

    from moverd.errors import UserError
    from moverd.events import Transfer
    from moverd_cli import upload as upload_module

    monkeypatch.setattr(upload_module, "MAX_PARTS", 2)
    files = {"big.bin": 11 * MIB + 5, "small.txt": 10}
    pid = served.facility.scicat.add_dataset(list(files.items()), owner_group=GROUP, lifecycle=UPLOADING)
    make_files(tmp_path / "ds", files)
    token = served.idp.mint(groups=[f"/{GROUP}"], expires_in=3600)
    client = upload_module.Uploader(served.daemon.url, token, part_size=5 * MIB, parallel=2)

    huge = tmp_path / "huge"  # beyond 2 parts of 5 GiB (a sparse file): refused before any request
    huge.mkdir()
    with open(huge / "h.bin", "wb") as f:
        f.truncate(2 * 5 * 1024**3 + 1)

    async def go() -> tuple[upload_module.Result, str]:
        try:
            res = await client.upload(tmp_path / "ds", pid, Transfer(kind="upload", dataset=pid), finalize=False,
                                      archive=False, owner={"user": "", "group": "", "email": ""})
            with pytest.raises(UserError) as refused:
                await client.upload(huge, pid, Transfer(kind="upload", dataset=pid), finalize=False,
                                    archive=False, owner={})
            return res, str(refused.value)
        finally:
            await client.aclose()

    res, refusal = anyio.run(go)
    assert res.part_size == 6 * MIB and res.parts_sent == 2  # 11 MiB in 2 parts: 6 MiB each
    assert "parts of 6.0 MiB instead of --part-size 5.0 MiB: big.bin" in caplog.text
    key = f"openem-network/datasets/{pid}/raw_files/big.bin"
    head = served.s3.client().head_object(Bucket=served.facility.landing_bucket, Key=key)
    assert head["ContentLength"] == files["big.bin"] and head["ETag"].strip('"').endswith("-2")
    body = served.s3.client().get_object(Bucket=served.facility.landing_bucket, Key=key)["Body"].read()
    assert body == (tmp_path / "ds" / "big.bin").read_bytes()
    assert refusal == "h.bin (10.0 GiB) cannot be uploaded: S3 takes at most 2 parts of 5.0 GiB"


def test_an_open_upload_of_another_part_size_is_aborted_and_its_file_sent_again(
    served: Served, tmp_path: Path
) -> None:
    """A run with 5 MiB parts left two multipart uploads open; the next run, with 6 MiB parts,
    could reuse none of their parts (and parts past its last would stay listed, so S3 would
    refuse the complete): it aborts them and sends both files again, one now in a single PUT."""
    import anyio

    from moverd_cli.upload import Uploader, b64sha256

    files = {"big.bin": 11 * MIB + 5, "mid.bin": 5 * MIB + 1}
    pid = served.facility.scicat.add_dataset(list(files.items()), owner_group=GROUP, lifecycle=UPLOADING)
    make_files(tmp_path / "ds", files)
    bucket, prefix = served.facility.landing_bucket, f"openem-network/datasets/{pid}/raw_files"
    earlier = Uploader(served.daemon.url, served.idp.mint(groups=[f"/{GROUP}"], expires_in=3600),
                       part_size=5 * MIB, parallel=2)

    async def left_open() -> None:
        await earlier.call("/s3/requestDatasetUpload", {"dataset_id": pid, "dataset_size_gib": 0})
        for rel, sent in (("big.bin", (1, 3)), ("mid.bin", (2,))):
            data = (tmp_path / "ds" / rel).read_bytes()
            count = -(-len(data) // (5 * MIB))
            answer = await earlier.call("/s3/presignedUrls", {"dataset_id": pid, "object_name": f"{prefix}/{rel}",
                                                              "parts": count})
            for n in sent:
                view = memoryview(data)[(n - 1) * 5 * MIB : n * 5 * MIB]
                await anyio.to_thread.run_sync(earlier._put_blocking, answer["urls"][n - 1], view, b64sha256(view))
        await earlier.aclose()

    anyio.run(left_open)
    assert len(served.s3.client().list_multipart_uploads(Bucket=bucket, Prefix=prefix).get("Uploads", [])) == 2
    args = ["upload", str(tmp_path / "ds"), "--dataset", pid, "--part-size", "6MiB", "--no-finalize", "--json"]
    p = moverd(args, served.env(tmp_path))
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)
    assert res["uploads_aborted"] == 2 and res["parts_resumed"] == 0 and res["parts_sent"] == 2
    assert served.landing(pid) == {f"{prefix}/{rel}": size for rel, size in files.items()}
    assert served.s3.client().list_multipart_uploads(Bucket=bucket, Prefix=prefix).get("Uploads", []) == []
    body = served.s3.client().get_object(Bucket=bucket, Key=f"{prefix}/big.bin")["Body"].read()
    assert body == (tmp_path / "ds" / "big.bin").read_bytes()
    again = json.loads(moverd(args, served.env(tmp_path)).stdout)
    assert again["skipped_files"] == 2 and again["parts_sent"] == 0
