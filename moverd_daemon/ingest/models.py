"""The request and response bodies of the upload API, field for field as the facility's client
speaks them (the reference's OpenAPI document): strict types, unknown fields ignored."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

MAX_PARTS = 10_000
"""S3's largest part number: no upload asks for more parts (the client sizes its parts to fit)."""


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class UploadRequestBody(_Body):
    dataset_id: StrictStr = Field(description="The dataset's PID in the catalog.")
    dataset_size_gib: StrictInt = Field(ge=0, description="Dataset size in GiB, rounded down (0 under 1 GiB).")


class UploadRequestSuccessfulResp(_Body):
    message: str
    landing_prefix: str | None = Field(None, description="moverd: the folder object names must lie under.")


class UploadRequestUnsuccessfulResp(_Body):
    message: str
    dataset_id: str
    requested_size_gib: int


class PresignedUrlBody(_Body):
    dataset_id: StrictStr
    object_name: StrictStr = Field(description="The full object key, under the dataset's landing prefix.")
    parts: StrictInt = Field(ge=1, description="1: one presigned PUT; more: a multipart upload of that many parts.")
    upload_id: StrictStr | None = Field(None, description="moverd: URLs for the parts of this open upload "
                                                          "(resuming it) instead of a new one.")


class PresignedUrlResp(_Body):
    upload_id: str = Field(description='The multipart upload id ("" for a single PUT).')
    urls: list[str] = Field(description="Standard base64 of each URL, part 1 first.")


MAX_BATCH = 1000
"""Object names in one ``/s3/presignedPuts`` request (a bounded body and answer)."""


class PresignedPutsBody(_Body):
    """moverd: single PUTs for many small objects of one dataset in one request."""

    dataset_id: StrictStr
    object_names: list[StrictStr] = Field(min_length=1, max_length=MAX_BATCH,
                                          description="Full object keys, under the dataset's landing prefix.")


class PresignedPutsResp(_Body):
    urls: list[str] = Field(description="Standard base64 of each object's presigned PUT URL, in the order asked.")


class CompletePart(_Body):
    part_number: StrictInt
    etag: StrictStr
    checksum_sha256: StrictStr = Field(description="Base64 SHA-256 of the part's bytes.")


class CompleteUploadBody(_Body):
    dataset_id: StrictStr
    object_name: StrictStr
    upload_id: StrictStr
    parts: list[CompletePart]
    checksum_sha256: StrictStr = Field(
        description="Base64 SHA-256 of the parts' raw SHA-256 digests, concatenated in part order "
                    "(S3's composite checksum; a '-N' suffix is accepted).")


class UploadStateBody(_Body):
    dataset_id: StrictStr


class StoredObject(_Body):
    object_name: str
    size: int


class StoredPart(_Body):
    part_number: int
    size: int
    etag: str
    checksum_sha256: str | None = None


class OpenUploadState(_Body):
    object_name: str
    upload_id: str
    parts: list[StoredPart]


class UploadStateResp(_Body):
    """moverd: what a dataset's upload left so far, for a client that resumes it."""

    dataset_id: str
    landing_prefix: str
    objects: list[StoredObject]
    uploads: list[OpenUploadState]


class CompleteUploadResp(_Body):
    location: str
    key: str


class AbortUploadBody(_Body):
    dataset_id: StrictStr
    upload_id: StrictStr
    object_name: StrictStr


class AbortUploadResp(_Body):
    message: str
    upload_id: str
    object_name: str


class FinalizeDatasetUploadBody(_Body):
    dataset_id: StrictStr
    create_archiving_job: StrictBool
    owner_group: StrictStr
    owner_user: StrictStr
    contact_email: StrictStr


class FinalizeDatasetUploadResp(_Body):
    dataset_id: str
    message: str


class AbortDatasetUploadBody(_Body):
    dataset_id: StrictStr


class AbortDatasetUploadResp(_Body):
    dataset_id: str
    message: str


class CreateServiceTokenResp(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    access_token: str
    refresh_token: str
    expires_in: int | None = None
    refresh_expires_in: int | None = None
    token_type: str | None = None
    not_before_policy: int | None = Field(None, alias="not-before-policy")
    session_state: str | None = None
    scope: str | None = None


class ErrorBody(BaseModel):
    """Every 500 of the upload API: the facility's client reads ``details`` of each."""

    message: str
    details: str
