"""``moverd serve`` as a subprocess on the embedded default, driven over HTTP like SciCat drives it.

One daemon serves the whole module (starting one costs seconds): a SciCat-compatible server and a
real S3 server behind it, HTTP Basic credentials from secret files and Bearer tokens checked
against a JWKS this test serves on 127.0.0.1, and a systemd notify socket. The last test stops it.
"""

from __future__ import annotations

import base64
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.daemon import BASIC, Daemon, JWKSServer, dataset_task_runs, new_key, wait_for
from tests.support.facility import Facility, dataset_files
from tests.support.s3 import S3Server
from tests.support.scicat.fixtures import session_server

FINAL = {"finishedSuccessful", "finishedWithDatasetErrors", "finishedUnsuccessful"}


class NotifySocket:
    """What systemd sees: datagrams on ``NOTIFY_SOCKET``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[str] = []
        self._stop = False
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        while not self._stop:
            try:
                self.messages.append(self.sock.recv(65536).decode())
            except TimeoutError:
                continue
            except OSError:
                return

    def fields(self) -> list[str]:
        return [line for m in list(self.messages) for line in m.splitlines()]

    def close(self) -> None:
        self._stop = True
        self.thread.join(2)
        self.sock.close()


@dataclass
class Served:
    daemon: Daemon
    facility: Facility
    idp: JWKSServer
    notify: NotifySocket
    basic: tuple[str, str] = BASIC

    def bearer(self, token: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {token or self.idp.mint()}"}

    def post_job(self, job_id: str, job_type: str = "archive", **kw: Any) -> httpx.Response:
        kw.setdefault("auth", self.basic)
        return httpx.post(f"{self.daemon.url}/jobs", json={"id": job_id, "type": job_type}, timeout=30, **kw)

    def job(self, job_id: str) -> dict[str, Any]:
        r = httpx.get(f"{self.daemon.url}/jobs/{job_id}", auth=self.basic, timeout=30)
        assert r.status_code == 200, r.text
        data: dict[str, Any] = r.json()
        return data

    def wait_job(self, job_id: str, timeout: float = 120) -> dict[str, Any]:
        def done() -> dict[str, Any] | None:
            view = self.job(job_id)
            run = view["flow_run"]
            return view if run and run["state"] in ("COMPLETED", "FAILED", "CRASHED") else None

        result: dict[str, Any] = wait_for(done, timeout, what=f"job {job_id}")
        return result


@pytest.fixture(scope="module")
def served(
    s3_server: S3Server, prefect_db_template: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("served")
    scicat = session_server()
    facility = Facility(scicat=scicat, s3=s3_server, tmp=tmp, landing_bucket=s3_server.create_bucket("landing"),
                        retrieval_bucket=s3_server.create_bucket("retrieval"))
    (tmp / "user").write_text(BASIC[0] + "\n")
    (tmp / "password").write_text(BASIC[1] + "\n")
    idp = JWKSServer()
    notify = NotifySocket(tmp / "notify.sock")
    settings = facility.settings_dict()
    settings["server"] = {
        "shutdown_grace": 10, "readiness_timeout": 10,
        "auth": {"basic_username_file": str(tmp / "user"), "basic_password_file": str(tmp / "password"),
                 **idp.auth_settings(required_role="archiver", jwks_refresh_min_interval=1.0)},
    }
    daemon = Daemon.create(tmp, settings, template=prefect_db_template, name="served")
    daemon.env.update({"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "1000000"})
    daemon.start()
    try:
        daemon.wait_ready()
        yield Served(daemon, facility, idp, notify)
    finally:
        daemon.stop(timeout=60)
        notify.close()
        idp.close()


def test_ready_live_and_systemd_told(served: Served) -> None:
    url = served.daemon.url
    live = httpx.get(f"{url}/health/livez")
    assert live.status_code == 200 and live.json()["state"] == "running"
    ready = httpx.get(f"{url}/health/readyz", timeout=30)
    assert ready.status_code == 200, ready.text
    checks = ready.json()["checks"]
    assert set(checks) == {"catalog", "prefect", "storage landing", "storage lts", "storage retrieval"}
    assert set(checks.values()) == {"ok"}
    fields = wait_for(lambda: "WATCHDOG=1" in served.notify.fields() and served.notify.fields(), 10,
                      what="a watchdog ping")
    assert "READY=1" in fields and any(f.startswith("STATUS=ready") for f in fields)
    assert fields.index("READY=1") < len(fields) - 1


def test_archive_then_retrieve_job_over_http(served: Served) -> None:
    f = served.facility
    files = dataset_files(31, n=6)
    pid = f.add_dataset(files)
    job_id = f.scicat.add_job("archive", [pid])
    first = served.post_job(job_id)
    assert first.status_code == 201, first.text
    accepted = first.json()
    assert set(accepted) == {"uuid", "name"} and accepted["name"] == f"archive-job {job_id}"
    again = served.post_job(job_id)  # SciCat retrying: the same run, not a second one
    assert again.status_code in (200, 201) and again.json() == accepted
    view = served.wait_job(job_id)
    assert view["flow_run"] == {"id": accepted["uuid"], "name": accepted["name"], "state": "COMPLETED"}
    assert view["status"] == "finishedSuccessful" and view["catalog"]["status"] == "finishedSuccessful"
    progress = view["progress"]
    assert progress["bytes_done"] == progress["bytes_total"] == sum(len(d) for d in files.values())
    assert progress["datablocks_done"] == progress["datablocks_total"] >= 2
    assert progress["datasets"][0]["pid"] == pid and progress["percent"] == 100.0
    assert f.scicat.job(job_id)["statusCode"] == "finishedSuccessful"
    assert f.scicat.lifecycle(pid)["archiveStatusMessage"] == "datasetOnArchiveDisk"
    # the flow run is real and visible in the daemon's Prefect
    run = httpx.get(f"{served.daemon.prefect_api()}/flow_runs/{accepted['uuid']}", timeout=30).json()
    assert run["name"] == accepted["name"] and run["state"]["type"] == "COMPLETED"
    assert "moverd-job:" + job_id in run["tags"]
    # a second POST once it is over starts a new run (a job is re-run to resume it)
    # retrieve, with a Bearer token this time
    rjob = f.scicat.add_job("retrieve", [pid])
    r = served.post_job(rjob, "retrieve", auth=None, headers=served.bearer())
    assert r.status_code == 201, r.text
    rview = served.wait_job(rjob)
    assert rview["status"] == "finishedSuccessful", rview
    result = f.scicat.job(rjob)["jobResultObject"]["result"]
    assert result and all(e["url"].startswith(f.s3.endpoint_url) for e in result)
    assert httpx.get(result[0]["url"], timeout=30).status_code == 200


def test_job_request_errors_are_clear(served: Served) -> None:
    url = f"{served.daemon.url}/jobs"
    cases: list[tuple[Any, str]] = [
        ({"type": "archive"}, "id is required"),
        ({"id": "a b", "type": "archive"}, "id is not a job id"),
        ({"id": "abc", "type": "erase"}, "type"),
        ([1, 2], "JSON object"),
    ]
    for body, words in cases:
        r = httpx.post(url, json=body, auth=served.basic)
        assert r.status_code == 422, (body, r.text)
        assert words in r.json()["detail"], (body, r.json())
    r = httpx.post(url, content=b"{not json", headers={"Content-Type": "application/json"}, auth=served.basic)
    assert r.status_code == 422 and "JSON" in r.json()["detail"]
    assert served.post_job("00000000-0000-0000-0000-000000000000").status_code == 404
    pid = served.facility.add_dataset({"a.txt": b"a"})
    job_id = served.facility.scicat.add_job("retrieve", [pid])
    r = served.post_job(job_id, "archive")
    assert r.status_code == 409 and "retrieve job" in r.json()["detail"]
    r = httpx.get(f"{url}/no-such-job", auth=served.basic)
    assert r.status_code == 404


def _status(served: Served, headers: dict[str, str] | None = None, auth: Any = None) -> httpx.Response:
    return httpx.get(f"{served.daemon.url}/jobs", headers=headers, auth=auth, timeout=30)


def test_refused_credentials(served: Served) -> None:
    idp = served.idp
    missing = _status(served)
    assert missing.status_code == 401
    challenge = missing.headers["WWW-Authenticate"]
    assert "Bearer" in challenge and "Basic" in challenge
    assert _status(served, auth=(BASIC[0], "wrong-password")).status_code == 401
    assert _status(served, auth=("someone-else", BASIC[1])).status_code == 401
    assert _status(served, headers={"Authorization": "Basic not-base64!"}).status_code == 401
    forged = idp.mint(key=new_key(idp.keys[0].kid))  # the published kid, another private key
    refusals = {
        "forged": forged,
        "expired": idp.mint(expires_in=-120),
        "wrong audience": idp.mint(aud="another-client"),
        "wrong issuer": idp.mint(iss="http://127.0.0.1:1/realms/evil"),
        "no expiry": idp.mint(exp=None),
        "garbage": "not.a.token",
    }
    for what, token in refusals.items():
        r = _status(served, headers=served.bearer(token))
        assert r.status_code == 401, (what, r.text)
        assert r.headers["WWW-Authenticate"].startswith("Bearer"), what
    no_role = _status(served, headers=served.bearer(idp.mint(realm_access={"roles": ["reader"]})))
    assert no_role.status_code == 403 and "archiver" in no_role.json()["detail"]
    assert _status(served, auth=served.basic).status_code == 200
    assert _status(served, headers=served.bearer()).status_code == 200
    client_role = idp.mint(realm_access=None, resource_access={"scicat": {"roles": ["archiver"]}})
    assert _status(served, headers=served.bearer(client_role)).status_code == 200


def test_key_rotation_and_refetch_rate_limit(served: Served) -> None:
    idp = served.idp
    assert _status(served, headers=served.bearer()).status_code == 200
    time.sleep(1.1)  # past jwks_refresh_min_interval
    before = idp.requests
    idp.rotate()
    r = _status(served, headers=served.bearer(idp.mint()))  # new kid: keys are fetched again
    assert r.status_code == 200, r.text
    assert idp.requests == before + 1
    # a burst of tokens with unknown kids may not turn into a burst of JWKS requests
    stranger = new_key()
    for _ in range(10):
        assert _status(served, headers=served.bearer(idp.mint(key=stranger))).status_code == 401
    assert idp.requests <= before + 2


def test_metrics_are_open_and_follow_the_jobs(served: Served) -> None:
    f = served.facility
    before = served.daemon.metrics()
    pid = f.add_dataset(dataset_files(32, n=3))
    job_id = f.scicat.add_job("archive", [pid])
    assert served.post_job(job_id).status_code == 201
    assert served.wait_job(job_id)["status"] == "finishedSuccessful"
    m = served.daemon.metrics()
    moved = m['moverd_bytes_total{kind="archive"}'] - before.get('moverd_bytes_total{kind="archive"}', 0)
    assert moved == sum(len(d) for d in dataset_files(32, n=3).values())
    committed = m['moverd_datablocks_committed_total{kind="archive"}']
    assert committed >= 2 and m['moverd_datablocks_verified_total{kind="archive"}'] == committed
    assert m['moverd_datablocks_failed_total{kind="archive"}'] == 0
    assert m['moverd_storage_slot_limit{kind="write",storage="lts"}'] == 4
    assert m['moverd_storage_slot_holders{kind="write",storage="lts"}'] == 0
    assert m['moverd_storage_slot_waiters{kind="read",storage="lts"}'] == 0
    assert m['moverd_storage_slot_peak_holders{kind="write",storage="lts"}'] >= 1
    assert m['moverd_job_duration_seconds_count{status="finishedSuccessful",type="archive"}'] >= 1
    assert m['moverd_storage_free_bytes{storage="lts"}'] > 0
    assert m["moverd_jobs_running"] == 0
    assert 'moverd_throughput_bytes_per_second{kind="archive"}' in m


def test_readyz_names_what_is_broken(served: Served) -> None:
    served.facility.scicat.down()
    try:
        r = httpx.get(f"{served.daemon.url}/health/readyz", timeout=60)
        assert r.status_code == 503
        checks = r.json()["checks"]
        assert checks["catalog"] != "ok" and checks["storage lts"] == "ok", checks
    finally:
        served.facility.scicat.up()
    assert httpx.get(f"{served.daemon.url}/health/readyz", timeout=60).status_code == 200


def test_openapi_docs_need_credentials(served: Served) -> None:
    url = served.daemon.url
    assert httpx.get(f"{url}/openapi.json").status_code == 401
    doc = httpx.get(f"{url}/openapi.json", auth=served.basic).json()
    assert f"{served.daemon.root_path}/jobs" in doc["paths"]
    assert "post" in doc["paths"][f"{served.daemon.root_path}/jobs"]
    assert httpx.get(f"{url}/docs", auth=served.basic).status_code == 200


def test_datablocks_are_task_runs_prefect_shows(served: Served) -> None:
    """Each datablock is a task run of its dataset's subflow run, named after its place and archive
    id, with its final state, its events in the feed, and the dataset's progress artifact keyed."""
    from moverd_flows.keys import artifact_key

    from moverd.planner import archive_id

    f = served.facility
    pid = f.add_dataset(dataset_files(41, n=8))
    job_id = f.scicat.add_job("archive", [pid])
    assert served.post_job(job_id).status_code == 201
    view = served.wait_job(job_id)
    assert view["status"] == "finishedSuccessful", view
    total = view["progress"]["datablocks_total"]
    assert total >= 2
    api = served.daemon.prefect_api()
    runs = dataset_task_runs(api, job_id, datasets=1, blocks=total)
    [(subflow, tasks)] = runs.items()
    assert subflow == f"archive {pid} (job {job_id})"
    print("task runs of", subflow, [t["name"] for t in tasks])
    assert sorted(t["name"] for t in tasks) == [f"datablock {i + 1}/{total} {archive_id(pid, i)}" for i in range(total)]
    assert {t["state_type"] for t in tasks} == {"COMPLETED"}
    assert all("moverd-datablock" in t["tags"] for t in tasks)
    with httpx.Client(base_url=api, timeout=30) as prefect:
        one = prefect.get(f"/task_runs/{tasks[0]['id']}")
        assert one.status_code == 200 and one.json()["name"] == tasks[0]["name"], one.text

        def completed_events() -> list[dict[str, Any]]:
            r = prefect.post("/events/filter", json={"filter": {
                "resource": {"id": [f"prefect.task-run.{t['id']}" for t in tasks]},
                "event": {"name": ["prefect.task-run.Completed"]}}, "limit": 50})
            events: list[dict[str, Any]] = r.json().get("events", []) if r.status_code == 200 else []
            return events if len(events) >= total else []

        wait_for(completed_events, 30, 0.5, "the task runs' events in the event feed")
        subflow_id = prefect.post("/flow_runs/filter", json={
            "flow_runs": {"name": {"any_": [subflow]}}}).json()[0]["id"]
        artifacts = prefect.post("/artifacts/filter", json={
            "artifacts": {"flow_run_id": {"any_": [subflow_id]}}}).json()
        progress = [(a["key"], a["type"], a["data"]) for a in artifacts]
        assert progress == [(artifact_key("archive", pid), "progress", 100)], progress

    rjob = f.scicat.add_job("retrieve", [pid])
    assert served.post_job(rjob, "retrieve").status_code == 201
    assert served.wait_job(rjob)["status"] == "finishedSuccessful"
    with httpx.Client(base_url=api, timeout=30) as prefect:
        keys = {a["key"] for a in prefect.post("/artifacts/filter", json={
            "artifacts": {"type": {"any_": ["markdown"]}}}).json()}
    assert artifact_key("retrieve-links", rjob) in keys, keys


def test_job_status_follows_the_job_while_it_runs(served: Served) -> None:
    f = served.facility
    pid = f.add_dataset(dataset_files(43, n=3))
    job_id = f.scicat.add_job("archive", [pid])
    f.scicat.slow(4.0, method="POST", path="datablocks", count=1)  # holds the job in the middle
    try:
        assert served.post_job(job_id).status_code == 201

        def running() -> dict[str, Any] | None:
            v = served.job(job_id)
            return v if v["flow_run"]["state"] == "RUNNING" and v["catalog"].get("status") == "inProgress" else None

        view = wait_for(running, 30, 0.1, f"job {job_id} running")
        assert view["status"] == "inProgress", view
        listed = httpx.get(f"{served.daemon.url}/jobs", auth=served.basic, timeout=30).json()["jobs"]
        assert [j["status"] for j in listed if j["id"] == job_id] == ["inProgress"]
    finally:
        view = served.wait_job(job_id)
    assert view["status"] == "finishedSuccessful" == view["catalog"]["status"], view


def test_sigterm_when_idle_stops_cleanly(served: Served) -> None:
    rc = served.daemon.stop()
    assert rc == 0, served.daemon.log()
    fields = served.notify.fields()
    assert "STOPPING=1" in fields
    log = served.daemon.log()
    assert "Traceback" not in log, log


def test_basic_credentials_encoding() -> None:
    """The header the tests send is what HTTP Basic is (guards the auth tests themselves)."""
    header = httpx.BasicAuth(*BASIC)._auth_header
    assert base64.b64decode(header.split()[1]).decode() == ":".join(BASIC)
