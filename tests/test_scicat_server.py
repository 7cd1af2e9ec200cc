"""The fake SciCat server answers like the real backend (CONTRACT.md): strict validation, raw-path
routing of PIDs, its error shapes and status codes, and the fault controls tests rely on."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import scicat_sdk_py as sdk

from tests.support.scicat import ARCHIVER, INGESTOR, OWNER, SciCatServer
from tests.support.scicat import validation as v
from tests.support.scicat.fixtures import scicat  # noqa: F401 - the fixture

FILES = [("raw/a.dat", 10), ("raw/b.dat", 20)]


def q(pid: str) -> str:
    return quote(pid, safe="")


def login(client: httpx.Client, account: tuple[str, str] = ARCHIVER) -> dict[str, str]:
    r = client.post("/api/v3/auth/login", json={"username": account[0], "password": account[1]})
    assert r.status_code == 201, r.text
    return {"Authorization": f"Bearer {r.json()['access_token']}"}


@pytest.fixture
def client(scicat: SciCatServer) -> Iterator[httpx.Client]:  # noqa: F811
    with httpx.Client(base_url=scicat.url, timeout=10) as c:
        yield c


@pytest.fixture
def auth(client: httpx.Client) -> dict[str, str]:
    return login(client)


def datablock(archive_id: str = "ds/block_00000.tar", **over: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "archiveId": archive_id, "size": 30, "packedSize": 3072, "chkAlg": "md5", "version": "1",
        "dataFileList": [
            {"path": "raw/a.dat", "size": 10, "time": "2024-05-01T12:00:00.000Z", "chk": "0" * 32,
             "uid": "1000", "gid": "1000", "perm": "0644"},
            {"path": "raw/b.dat", "size": 20, "time": "2024-05-01T12:00:00Z"},
        ],
    }
    body.update(over)
    return body


def bad_request(*messages: str) -> dict[str, Any]:
    return {"message": list(messages), "error": "Bad Request", "statusCode": 400}


# --- login and the guard ---------------------------------------------------------------------


def test_login_json_and_form(scicat: SciCatServer, client: httpx.Client) -> None:  # noqa: F811
    r = client.post("/api/v3/auth/login", json={"username": ARCHIVER[0], "password": ARCHIVER[1]})
    assert r.status_code == 201
    body = r.json()
    assert set(body) == {"access_token", "id", "expires_in", "ttl", "created", "userId", "user"}
    assert body["id"] == body["access_token"] and body["expires_in"] == 3600
    sdk.ReturnedAuthLoginDto.model_validate(body)  # the SDK's response model accepts it
    r = client.post("/api/v3/Auth/Login/", data={"username": ARCHIVER[0], "password": ARCHIVER[1]})
    assert r.status_code == 201  # form data, case-insensitive, trailing slash


def test_login_refused_and_strict(client: httpx.Client) -> None:
    r = client.post("/api/v3/auth/login", json={"username": ARCHIVER[0], "password": "wrong"})
    assert r.status_code == 401
    r = client.post("/api/v3/auth/login", json={"username": "nobody", "password": "x"})
    assert r.status_code == 401
    r = client.post("/api/v3/auth/login", json={**dict(zip(("username", "password"), ARCHIVER, strict=True)),
                                               "remember": True})
    assert r.status_code == 400
    assert r.json() == bad_request("property remember should not exist")
    assert client.post("/api/v4/auth/login", json={}).status_code == 404  # no v4 login


def test_forbidden_without_valid_token(scicat: SciCatServer, client: httpx.Client) -> None:  # noqa: F811
    pid = scicat.add_dataset(FILES)
    forbidden = {"message": "Forbidden resource", "error": "Forbidden", "statusCode": 403}
    r = client.get(f"/api/v3/datasets/{q(pid)}")
    assert (r.status_code, r.json()) == (403, forbidden)
    r = client.get(f"/api/v3/datasets/{q(pid)}", headers={"Authorization": "Bearer nonsense"})
    assert (r.status_code, r.json()) == (403, forbidden)
    # the guard comes before validation: an invalid body without a token is 403, not 400
    r = client.post(f"/api/v3/datasets/{q(pid)}/datablocks", json={"bogus": 1})
    assert r.status_code == 403
    headers = login(client)
    assert client.get(f"/api/v3/datasets/{q(pid)}", headers=headers).status_code == 200
    scicat.expire_tokens()
    assert client.get(f"/api/v3/datasets/{q(pid)}", headers=headers).status_code == 403
    assert client.get(f"/api/v3/datasets/{q(pid)}", headers=login(client)).status_code == 200


def test_token_ttl(scicat: SciCatServer, client: httpx.Client) -> None:  # noqa: F811
    scicat.token_ttl = 0.3
    pid = scicat.add_dataset(FILES)
    r = client.post("/api/v3/auth/login", json={"username": ARCHIVER[0], "password": ARCHIVER[1]})
    assert r.json()["expires_in"] == 0.3
    headers = {"Authorization": f"Bearer {r.json()['access_token']}"}
    assert client.get(f"/api/v3/datasets/{q(pid)}", headers=headers).status_code == 200
    time.sleep(0.4)
    assert client.get(f"/api/v3/datasets/{q(pid)}", headers=headers).status_code == 403


# --- routing -----------------------------------------------------------------------------------


def test_pid_routing_on_the_raw_path(scicat: SciCatServer, client: httpx.Client, auth: dict[str, str]) -> None:  # noqa: F811
    pid = scicat.add_dataset(FILES)
    assert "/" in pid
    assert client.get(f"/api/v3/datasets/{q(pid)}", headers=auth).json()["pid"] == pid
    r = client.get(f"/api/v3/datasets/{pid}", headers=auth)  # unencoded slash: another route
    assert r.status_code == 404 and r.json()["message"].startswith("Cannot GET")
    assert client.get(f"/api/v3/Datasets/{q(pid)}/", headers=auth).status_code == 200
    assert client.get(f"/API/V3/datasets/{q(pid)}/OrigDatablocks", headers=auth).status_code == 200
    call = scicat.requests("GET", "/api/v3/datasets/{pid}")[0]
    assert call.pid == pid and "%2F" in call.raw_path


def test_unknown_dataset(scicat: SciCatServer, client: httpx.Client, auth: dict[str, str]) -> None:  # noqa: F811
    pid = q("20.500.12269/missing")
    for url in (f"/api/v3/datasets/{pid}", f"/api/v4/datasets/{pid}", f"/api/v3/datasets/{pid}/origdatablocks",
                f"/api/v3/datasets/{pid}/datablocks"):
        r = client.get(url, headers=auth)
        assert r.status_code == 404, url
    assert client.get(f"/api/v3/datasets/{pid}", headers=auth).json() == {
        "message": "dataset: 20.500.12269/missing not found", "error": "Not Found", "statusCode": 404,
    }
    r = client.patch(f"/api/v3/datasets/{pid}/datasetlifecycle", headers=auth, json={"archivable": False})
    assert r.status_code == 404
    assert r.json()["message"] == "dataset with pid 20.500.12269/missing not found"


def test_dataset_v3_and_v4_shapes(scicat: SciCatServer, client: httpx.Client, auth: dict[str, str]) -> None:  # noqa: F811
    pid = scicat.add_dataset(FILES)
    v3 = client.get(f"/api/v3/datasets/{q(pid)}", headers=auth).json()
    assert v3["size"] == 30 and v3["numberOfFiles"] == 2 and v3["principalInvestigator"] == "PI"
    sdk.OutputDatasetObsoleteDto.model_validate(v3)
    v4 = client.get(f"/api/v4/datasets/{q(pid)}?include=origdatablocks&include=datablocks", headers=auth).json()
    assert v4["principalInvestigators"] == ["PI"] and "principalInvestigator" not in v4
    assert len(v4["origdatablocks"]) == 1 and v4["datablocks"] == []


# --- validation --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "schema"),
    [
        (sdk.CredentialsDto, v.credentials()),
        (sdk.UpdateJobDto, v.update_job_v4()),
        (sdk.PartialUpdateDatasetLifecycleDto, v.lifecycle()),
        (sdk.CreateDatasetDatablockDto, v.create_dataset_datablock()),
        (sdk.CreateDatablockDto, v.create_datablock()),
        (sdk.DataFile, v.data_file()),
    ],
)
def test_whitelists_come_from_the_sdk(model: type, schema: v.Schema) -> None:
    props = getattr(model, f"_{model.__name__}__properties")
    assert schema.whitelist == set(props)


def test_datablock_body_strictness(scicat: SciCatServer, client: httpx.Client, auth: dict[str, str]) -> None:  # noqa: F811
    pid = scicat.add_dataset(FILES)
    url = f"/api/v3/datasets/{q(pid)}/datablocks"

    def post(body: dict[str, Any]) -> httpx.Response:
        return client.post(url, headers=auth, json=body)

    r = post(datablock(datablockChecksum="xxh3:00"))
    assert (r.status_code, r.json()) == (400, bad_request("property datablockChecksum should not exist"))
    assert post(datablock(size=30.0)).json() == bad_request("size must be an integer number")
    assert post(datablock(packedSize=3072.5)).json() == bad_request("packedSize must be an integer number")
    assert post(datablock(chkAlg="")).json() == bad_request("chkAlg should not be empty")
    assert post(datablock(datasetId=pid)).json() == bad_request("property datasetId should not exist")
    body = datablock()
    del body["version"]
    assert post(body).json() == bad_request("version must be a string")
    assert post(datablock(dataFileList=[])).json() == bad_request("dataFileList should not be empty")
    files = datablock()["dataFileList"]
    files[1]["offset"] = 512
    assert post(datablock(dataFileList=files)).json() == bad_request(
        "dataFileList.1.property offset should not exist"
    )
    files = datablock()["dataFileList"]
    files[0]["time"] = 1714564800
    assert post(datablock(dataFileList=files)).json() == bad_request(
        "dataFileList.0.time must be a valid ISO 8601 date string"
    )
    files = datablock()["dataFileList"]
    files[0]["uid"] = 1000
    assert post(datablock(dataFileList=files)).json() == bad_request("dataFileList.0.uid must be a string")
    assert scicat.datablocks(pid) == []  # nothing was stored by the refused requests
    r = post(datablock())
    assert r.status_code == 201, r.text
    sdk.Datablock.model_validate(r.json())


def test_malformed_json_is_400(scicat: SciCatServer, client: httpx.Client, auth: dict[str, str]) -> None:  # noqa: F811
    pid = scicat.add_dataset(FILES)
    r = client.patch(f"/api/v3/datasets/{q(pid)}/datasetlifecycle", content=b"{nope",
                     headers={**auth, "Content-Type": "application/json"})
    assert r.status_code == 400


# --- datablocks --------------------------------------------------------------------------------


def test_datablock_create_list_delete(scicat: SciCatServer, client: httpx.Client, auth: dict[str, str]) -> None:  # noqa: F811
    pid = scicat.add_dataset(FILES)
    url = f"/api/v3/datasets/{q(pid)}/datablocks"
    first = client.post(url, headers=auth, json=datablock("ds/b_00000.tar")).json()
    assert first["datasetId"] == pid and first["_id"] == first["id"]
    assert first["ownerGroup"] == scicat.dataset(pid)["ownerGroup"]
    assert first["dataFileList"][1]["time"] == "2024-05-01T12:00:00.000Z"
    client.post(url, headers=auth, json=datablock("ds/b_00001.tar", packedSize=1000))
    ds = scicat.dataset(pid)
    assert (ds["packedSize"], ds["numberOfFilesArchived"]) == (4072, 4)
    assert [d["archiveId"] for d in client.get(url, headers=auth).json()] == ["ds/b_00000.tar", "ds/b_00001.tar"]

    r = client.post(url, headers=auth, json=datablock("ds/b_00000.tar"))  # duplicate archiveId
    assert (r.status_code, r.json()) == (500, {"statusCode": 500, "message": "Internal server error"})
    r = client.post("/api/v3/datablocks", headers=auth, json={**datablock("ds/b_00000.tar"), "datasetId": pid})
    assert r.status_code == 409

    r = client.delete(f"{url}/{first['id']}", headers=auth)
    assert (r.status_code, r.content) == (200, b"")
    ds = scicat.dataset(pid)
    assert (ds["packedSize"], ds["numberOfFilesArchived"]) == (1000, 2)
    r = client.delete(f"{url}/{first['id']}", headers=auth)
    assert r.status_code == 404 and r.json()["message"] == f"datablock: {first['id']} not found"
    r = client.delete(url, headers=auth)
    assert (r.status_code, r.json()) == (200, {"count": 1})
    ds = scicat.dataset(pid)
    assert (ds["packedSize"], ds["numberOfFilesArchived"]) == (0, 0)


def test_datablock_alternative_routes(scicat: SciCatServer, client: httpx.Client, auth: dict[str, str]) -> None:  # noqa: F811
    pid = scicat.add_dataset(FILES)
    r = client.post("/api/v3/datablocks", headers=auth, json=datablock("x_00000.tar"))
    assert r.json() == bad_request("datasetId must be a string")
    r = client.post("/api/v3/datablocks", headers=auth, json={**datablock("x_00000.tar"), "datasetId": pid})
    assert r.status_code == 201
    assert client.delete(f"/api/v3/datablocks/{r.json()['id']}", headers=auth).status_code == 200
    assert scicat.datablocks(pid) == []


def test_datablock_permissions(scicat: SciCatServer, client: httpx.Client) -> None:  # noqa: F811
    pid = scicat.add_dataset(FILES)
    url = f"/api/v3/datasets/{q(pid)}/datablocks"
    scicat.add_user("manager", "pw", ["archivemanager"])
    r = client.post(url, headers=login(client, ("manager", "pw")), json=datablock())
    assert r.status_code == 403  # archivemanager alone cannot create (BE test 0040)
    r = client.post(url, headers=login(client, INGESTOR), json=datablock())
    assert r.status_code == 201
    r = client.delete(f"{url}/{r.json()['id']}", headers=login(client, INGESTOR))
    assert r.status_code == 403  # deleting needs DELETE_GROUPS
    assert client.delete(url, headers=login(client, ("manager", "pw"))).json() == {"count": 1}


# --- lifecycle ---------------------------------------------------------------------------------


def test_lifecycle_patch_merges(scicat: SciCatServer, client: httpx.Client, auth: dict[str, str]) -> None:  # noqa: F811
    pid = scicat.add_dataset(FILES, access_groups=["group-a"])
    for version in ("v3", "v4"):
        url = f"/api/{version}/datasets/{q(pid)}/datasetlifecycle"
        r = client.patch(url, headers=auth, json={"archiveStatusMessage": "started", "archivable": False})
        assert r.status_code == 200
        assert r.json()["archiveStatusMessage"] == "started"
        r = client.patch(url, headers=auth, json={"retrievable": True})
        lc = r.json()
        assert (lc["archiveStatusMessage"], lc["archivable"], lc["retrievable"]) == ("started", False, True)
    assert scicat.dataset(pid)["accessGroups"] == ["group-a"]


def test_lifecycle_patch_is_strict(scicat: SciCatServer, client: httpx.Client, auth: dict[str, str]) -> None:  # noqa: F811
    pid = scicat.add_dataset(FILES)
    url = f"/api/v3/datasets/{q(pid)}/datasetlifecycle"
    assert client.patch(url, headers=auth, json={}).json() == {
        "message": "dataset lifecycle DTO must not be empty", "error": "Bad Request", "statusCode": 400,
    }
    assert client.patch(url, headers=auth, json={"archivable": "false"}).json() == bad_request(
        "archivable must be a boolean value"
    )
    assert client.patch(url, headers=auth, json={"accessGroups": []}).json() == bad_request(
        "property accessGroups should not exist"
    )
    assert client.patch(url, headers=auth, json={"dateOfDiskPurging": 0}).status_code == 400
    assert client.patch(url, headers=auth, json={"dateOfDiskPurging": "2030-01-01"}).status_code == 200
    assert scicat.lifecycle(pid)["archiveStatusMessage"] == "datasetCreated"


def test_dataset_patch_v3_sets_the_whole_lifecycle(
    scicat: SciCatServer, client: httpx.Client, auth: dict[str, str]  # noqa: F811
) -> None:
    pid = scicat.add_dataset(FILES, lifecycle={"archivable": False, "retrievable": True,
                                               "archiveStatusMessage": "datasetOnArchiveDisk"})
    r = client.patch(f"/api/v3/datasets/{q(pid)}", headers=auth,
                     json={"datasetlifecycle": {"retrieveStatusMessage": "started", "unknownKey": 1}})
    assert r.status_code == 200  # nested lifecycle contents are not validated on this route
    lc = scicat.lifecycle(pid)
    # $set of the sub-document: everything omitted is back to the schema defaults
    assert lc["retrieveStatusMessage"] == "started"
    assert (lc["archivable"], lc["retrievable"], lc["archiveStatusMessage"]) == (True, False, "datasetCreated")
    assert "unknownKey" not in lc
    r = client.patch(f"/api/v3/datasets/{q(pid)}", headers=auth, json={"bogus": 1})
    assert r.json() == bad_request("property bogus should not exist")


# --- origdatablocks ----------------------------------------------------------------------------


def test_origdatablocks_v3_and_v4(scicat: SciCatServer, client: httpx.Client, auth: dict[str, str]) -> None:  # noqa: F811
    pid = scicat.add_dataset(origdatablocks=[[("a", 1)], [("b", 2)], [("c", 3)]])
    other = scicat.add_dataset([("z", 1)])
    v3 = client.get(f"/api/v3/datasets/{q(pid)}/origdatablocks", headers=auth).json()
    assert [o["dataFileList"][0]["path"] for o in v3] == ["a", "b", "c"]
    flt = {"where": {"datasetId": pid}, "limits": {"limit": 2, "skip": 1}}
    r = client.get("/api/v4/origdatablocks", params={"filter": json.dumps(flt)}, headers=auth)
    assert [o["dataFileList"][0]["path"] for o in r.json()] == ["b", "c"]
    assert all(o["datasetId"] == pid for o in r.json())
    assert scicat.requests("GET", "/api/v4/origdatablocks")[0].pid == pid
    r = client.get("/api/v4/origdatablocks", params={"filter": json.dumps({"where": {"datasetId": other}})},
                   headers=auth)
    assert len(r.json()) == 1
    r = client.get("/api/v4/origdatablocks", params={"filter": json.dumps({"bogus": {}})}, headers=auth)
    assert r.status_code == 400


# --- jobs --------------------------------------------------------------------------------------


def test_unknown_job(client: httpx.Client, auth: dict[str, str]) -> None:
    invalid = {"status": 400, "message": "Invalid job id."}
    for version in ("v3", "v4"):
        r = client.get(f"/api/{version}/jobs/no-such-job", headers=auth)
        assert (r.status_code, r.json()) == (400, invalid)
    r = client.patch("/api/v3/jobs/no-such-job", headers=auth, json={"jobStatusMessage": "inProgress"})
    assert (r.status_code, r.json()) == (400, invalid)
    r = client.patch("/api/v4/jobs/no-such-job", headers=auth, json={"statusCode": "a", "statusMessage": "b"})
    assert (r.status_code, r.json()) == (400, invalid)


def test_jobs_created_through_routes(scicat: SciCatServer, client: httpx.Client) -> None:  # noqa: F811
    pid = scicat.add_dataset(FILES)
    owner = login(client, OWNER)
    r = client.post("/api/v3/jobs", headers=owner,
                    json={"type": "archive", "datasetList": [{"pid": pid, "files": []}]})
    assert r.status_code == 201, r.text
    v3 = r.json()
    assert v3["datasetList"] == [{"pid": pid, "files": []}] and v3["jobStatusMessage"] == "jobSubmitted"
    sdk.OutputJobV3Dto.model_validate(v3)
    v4 = client.get(f"/api/v4/jobs/{v3['id']}", headers=login(client)).json()
    assert v4["jobParams"]["datasetList"] == [{"pid": pid, "files": []}]
    assert (v4["statusCode"], v4["statusMessage"]) == ("jobSubmitted", "Job submitted.")

    r = client.post("/api/v4/jobs", headers=owner,
                    json={"type": "retrieve", "jobParams": {"datasetList": [{"pid": pid, "files": ["raw/a.dat"]}]}})
    assert r.status_code == 201, r.text
    v3 = client.get(f"/api/v3/jobs/{r.json()['id']}", headers=login(client)).json()
    assert v3["datasetList"] == [{"pid": pid, "files": ["raw/a.dat"]}] and "datasetList" not in v3["jobParams"]

    bad = client.post("/api/v3/jobs", headers=owner,
                      json={"type": "archive", "datasetList": [{"pid": pid, "files": [], "size": 1}]})
    assert bad.json() == bad_request("datasetList.0.property size should not exist")
    bad = client.post("/api/v3/jobs", headers=owner,
                      json={"type": "archive", "datasetList": [{"pid": "nope/x", "files": []}]})
    assert bad.status_code == 400
    bad = client.post("/api/v4/jobs", headers=owner,
                      json={"type": "archive", "jobParams": {"datasetList": [{"pid": pid, "files": ["nope"]}]}})
    assert bad.status_code == 400


def test_job_patch_v3_maps_the_status(scicat: SciCatServer, client: httpx.Client, auth: dict[str, str]) -> None:  # noqa: F811
    job_id = scicat.add_job("archive", [scicat.add_dataset(FILES)])
    r = client.patch(f"/api/v3/jobs/{job_id}", headers=auth,
                     json={"jobStatusMessage": "inProgress", "statusMessage": "ignored", "anything": 1})
    assert r.status_code == 200
    assert r.json()["jobStatusMessage"] == "inProgress"
    job = scicat.job(job_id)
    assert (job["statusCode"], job["statusMessage"]) == ("inProgress", "inProgress")
    r = client.patch(f"/api/v3/jobs/{job_id}", headers=auth, json={"jobResultObject": {"result": []}})
    job = scicat.job(job_id)
    assert job["statusCode"] == "inProgress" and job["jobResultObject"] == {"result": []}


def test_job_patch_v4(scicat: SciCatServer, client: httpx.Client, auth: dict[str, str]) -> None:  # noqa: F811
    job_id = scicat.add_job("retrieve", [scicat.add_dataset(FILES)])
    url = f"/api/v4/jobs/{job_id}"
    assert client.patch(url, headers=auth, json={"statusCode": "inProgress"}).json() == bad_request(
        "statusMessage must be a string"
    )
    r = client.patch(url, headers=auth, json={"jobStatusMessage": "x", "statusCode": "a", "statusMessage": "b"})
    assert r.json() == bad_request("property jobStatusMessage should not exist")
    r = client.patch(url, headers=auth, json={"statusCode": "inProgress", "statusMessage": "jobStarted",
                                              "jobResultObject": {"a": 1, "b": 2}})
    assert r.status_code == 200 and r.json()["statusMessage"] == "jobStarted"
    client.patch(url, headers={**auth, "Content-Type": "application/merge-patch+json"},
                 content=json.dumps({"statusCode": "x", "statusMessage": "y", "jobResultObject": {"b": None, "c": 3}}))
    assert scicat.job(job_id)["jobResultObject"] == {"a": 1, "c": 3}
    client.patch(url, headers=auth, json={"statusCode": "x", "statusMessage": "y", "jobResultObject": {"d": 4}})
    assert scicat.job(job_id)["jobResultObject"] == {"d": 4}


def test_job_update_permission(scicat: SciCatServer, client: httpx.Client) -> None:  # noqa: F811
    job_id = scicat.add_job("archive", [scicat.add_dataset(FILES)])
    r = client.patch(f"/api/v4/jobs/{job_id}", headers=login(client, OWNER),
                     json={"statusCode": "a", "statusMessage": "b"})
    assert r.status_code == 403
    scicat.add_user("updater", "pw", ["archivemanager"])  # matches update.auth "@archivemanager"
    r = client.patch(f"/api/v4/jobs/{job_id}", headers=login(client, ("updater", "pw")),
                     json={"statusCode": "a", "statusMessage": "b"})
    assert r.status_code == 200


# --- faults and the call log -------------------------------------------------------------------


def test_fail_next_burst(scicat: SciCatServer, client: httpx.Client, auth: dict[str, str]) -> None:  # noqa: F811
    pid = scicat.add_dataset(FILES)
    scicat.fail_next(2, method="GET", path=r"/origdatablocks$")
    url = f"/api/v3/datasets/{q(pid)}"
    assert client.get(url, headers=auth).status_code == 200  # other routes are not affected
    assert [client.get(f"{url}/origdatablocks", headers=auth).status_code for _ in range(3)] == [503, 503, 200]
    assert scicat.sequence(logins=False) == [
        "GET /api/v3/datasets/{pid} 200",
        "GET /api/v3/datasets/{pid}/origdatablocks 503",
        "GET /api/v3/datasets/{pid}/origdatablocks 503",
        "GET /api/v3/datasets/{pid}/origdatablocks 200",
    ]
    assert len(scicat.requests("GET", "origdatablocks")) == 1
    assert len(scicat.requests("GET", "origdatablocks", faults=True)) == 3
    assert [c.fault for c in scicat.calls[-3:]] == ["fail", "fail", None]
    assert all(c.pid == pid for c in scicat.calls[-3:])


def test_down_and_up(scicat: SciCatServer, client: httpx.Client) -> None:  # noqa: F811
    scicat.down()
    for _ in range(3):
        r = client.post("/api/v3/auth/login", json={"username": ARCHIVER[0], "password": ARCHIVER[1]})
        assert r.status_code == 503
    scicat.up()
    assert login(client)


def test_slow_answers(scicat: SciCatServer, client: httpx.Client, auth: dict[str, str]) -> None:  # noqa: F811
    pid = scicat.add_dataset(FILES)
    scicat.slow(0.3, method="GET", count=1)
    t0 = time.monotonic()
    client.get(f"/api/v3/datasets/{q(pid)}", headers=auth)
    assert time.monotonic() - t0 >= 0.3
    t0 = time.monotonic()
    client.get(f"/api/v3/datasets/{q(pid)}", headers=auth)
    assert time.monotonic() - t0 < 0.3


def test_reset_between_tests(scicat: SciCatServer) -> None:  # noqa: F811
    assert scicat.calls == [] and scicat.app.store.datasets == {}
    assert set(scicat.app.store.users) == {ARCHIVER[0], INGESTOR[0], OWNER[0]}
