"""The upload API's HTTP routes, with the reference's paths, bodies and status codes.

Every success is 201 with a JSON body, as the facility's client requires; every refusal is JSON
with ``message`` and ``details`` (the client dereferences ``details`` of a 500), a 507 also
names the dataset and the size asked for. URLs are handed out base64-encoded (standard alphabet),
as the client decodes them.
"""


import base64
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Header, Request
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.responses import Response

from moverd import JobOwner, UploadedPart

from ..auth import AuthError, Principal
from .models import (
    AbortDatasetUploadBody,
    AbortDatasetUploadResp,
    AbortUploadBody,
    AbortUploadResp,
    CompleteUploadBody,
    CompleteUploadResp,
    CreateServiceTokenResp,
    ErrorBody,
    FinalizeDatasetUploadBody,
    FinalizeDatasetUploadResp,
    OpenUploadState,
    PresignedPutsBody,
    PresignedPutsResp,
    PresignedUrlBody,
    PresignedUrlResp,
    StoredObject,
    StoredPart,
    UploadRequestBody,
    UploadRequestSuccessfulResp,
    UploadRequestUnsuccessfulResp,
    UploadStateBody,
    UploadStateResp,
)
from .service import Ingest, IngestError
from .tokens import TokenExchange

TAG = "upload"
log = logging.getLogger(__name__)


class RefusalBody(ErrorBody):
    detail: str


def _responses(*extra: int) -> dict[int | str, dict[str, Any]]:
    out: dict[int | str, dict[str, Any]] = {
        401: {"description": "No or bad credentials."},
        403: {"model": RefusalBody, "description": "The caller is in none of the dataset's owner or access groups."},
        422: {"model": RefusalBody, "description": "Invalid body, unsafe or foreign object name, bad parts."},
        500: {"model": RefusalBody, "description": "The landing storage or the catalog failed."},
    }
    for status in extra:
        out[status] = {"model": RefusalBody}
    return out


def _b64(url: str) -> str:
    return base64.b64encode(url.encode()).decode()


def install_error_handler(api: FastAPI) -> None:
    @api.exception_handler(IngestError)
    async def _refused(request: Request, exc: IngestError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)


_ANY = (Exception, BaseException, object)
"""Classes in every exception's MRO: a handler of these is no sign the app expects the exception."""


class JsonErrorRoute(APIRoute):
    """An upload route whose every failure is JSON with ``message`` and ``details``: the
    facility's client dereferences ``details`` of any 500, and Starlette's own answer to an
    unexpected exception (a bug, a library's surprise) is plain text. Exceptions that the app
    has a handler for (refusals, validation, authentication) keep theirs."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        path = self.path

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except IngestError as exc:
                return JSONResponse(exc.body(), status_code=exc.status)
            except Exception as exc:
                handlers = getattr(request.app, "exception_handlers", {})
                if any(cls in handlers for cls in type(exc).__mro__ if cls not in _ANY):
                    raise
                log.exception("POST %s failed", path)
                error = IngestError(500, "Internal server error",
                                    f"{type(exc).__name__}: {exc} (see the daemon's log)")
                return JSONResponse(error.body(), status_code=500)

        return route


def ingest_router(root: str, ingest: Callable[[], Ingest], principal: Callable[..., Awaitable[Principal]],
                  tokens: TokenExchange | None = None) -> APIRouter:
    """The routes under ``root``; ``ingest`` gives the service (built once the app is ready)."""
    router = APIRouter(prefix=root, tags=[TAG], route_class=JsonErrorRoute)
    Who = Annotated[Principal, Depends(principal)]  # noqa: N806 - a type alias

    @router.post("/token", status_code=201, response_model=CreateServiceTokenResp, response_model_by_alias=True,
                 response_model_exclude_none=True,
                 responses={401: {"model": RefusalBody, "description": "Not a SciCat token of an ingestor."},
                            500: {"model": RefusalBody, "description": "The identity provider failed."}})
    async def create_service_token(
            authorization: Annotated[str | None, Header(include_in_schema=False)] = None) -> CreateServiceTokenResp:
        """Exchange the caller's SciCat token (``Authorization: Bearer``) for the service account's
        tokens: SciCat must know the token and name one of ``ingest.ingestor_groups`` among the
        caller's access groups (a token of the identity provider itself is checked like any other)."""
        if tokens is None:
            raise IngestError(404, "Not found", "the token exchange is not configured here")
        try:
            return await tokens.exchange(authorization)
        except AuthError as exc:
            raise IngestError(exc.status, "Not authenticated", exc.message) from None

    @router.post("/s3/requestDatasetUpload", status_code=201, response_model=UploadRequestSuccessfulResp,
                 responses={**_responses(404, 409), 507: {"model": UploadRequestUnsuccessfulResp,
                                                           "description": "The landing zone is full: try later."}})
    async def request_dataset_upload(body: UploadRequestBody, who: Who) -> UploadRequestSuccessfulResp:
        """Reserve landing space for a dataset of ``dataset_size_gib`` GiB (rounded down, so one
        GiB more is reserved). A second request for the same dataset replaces its reservation."""
        service = ingest()
        await service.request_upload(body.dataset_id, body.dataset_size_gib, who)
        return UploadRequestSuccessfulResp(message="success",
                                           landing_prefix=service.landing.client_key(service.prefix(body.dataset_id)))

    @router.post("/s3/presignedUrls", status_code=201, response_model=PresignedUrlResp,
                 responses=_responses(404, 409))
    async def presigned_urls(body: PresignedUrlBody, who: Who) -> PresignedUrlResp:
        """``parts = 1``: one presigned PUT (``upload_id`` empty). More: a multipart upload with
        SHA-256 part checksums and one presigned UploadPart URL per part, in part order. Send
        ``x-amz-checksum-sha256`` with every PUT, and ``x-amz-storage-class`` when configured."""
        upload_id, urls = await ingest().presigned_urls(body.dataset_id, body.object_name, body.parts, who,
                                                        body.upload_id)
        return PresignedUrlResp(upload_id=upload_id, urls=[_b64(u) for u in urls])

    @router.post("/s3/presignedPuts", status_code=201, response_model=PresignedPutsResp,
                 responses=_responses(404, 409))
    async def presigned_puts(body: PresignedPutsBody, who: Who) -> PresignedPutsResp:
        """moverd's own (the reference asks once per file): a presigned single PUT for each of up
        to 1,000 objects of one dataset, in the order asked, as ``presignedUrls`` with
        ``parts = 1`` gives for one. The dataset, groups and reservation are checked once."""
        urls = await ingest().presigned_puts(body.dataset_id, body.object_names, who)
        return PresignedPutsResp(urls=[_b64(u) for u in urls])

    @router.post("/s3/completeUpload", status_code=201, response_model=CompleteUploadResp,
                 responses=_responses())
    async def complete_upload(body: CompleteUploadBody, who: Who) -> CompleteUploadResp:
        """Publish a multipart upload once its parts (numbers, ETags, sizes, SHA-256) match what
        S3 recorded and ``checksum_sha256`` is their composite; else nothing becomes visible."""
        parts = [UploadedPart(p.part_number, 0, p.etag, p.checksum_sha256) for p in body.parts]
        location, key = await ingest().complete(body.dataset_id, body.object_name, body.upload_id, parts,
                                                body.checksum_sha256, who)
        return CompleteUploadResp(location=location, key=key)

    @router.post("/s3/abortMultipartUpload", status_code=201, response_model=AbortUploadResp,
                 responses=_responses(404))
    async def abort_multipart_upload(body: AbortUploadBody, who: Who) -> AbortUploadResp:
        """Discard one multipart upload and its parts."""
        await ingest().abort_multipart(body.dataset_id, body.object_name, body.upload_id, who)
        return AbortUploadResp(message="Abortin multipart upload succeeded.", upload_id=body.upload_id,
                               object_name=body.object_name)

    @router.post("/s3/finalizeDatasetUpload", status_code=201, response_model=FinalizeDatasetUploadResp,
                 responses=_responses(404))
    async def finalize_dataset_upload(body: FinalizeDatasetUploadBody, who: Who) -> FinalizeDatasetUploadResp:
        """Check that every file of the dataset's OrigDatablocks is in the landing zone at its
        size, mark the dataset archivable (``datasetCreated``), release its reservation and,
        with ``create_archiving_job``, create and run its archive job. A retry creates no second job."""
        owner = JobOwner(user=body.owner_user, group=body.owner_group, email=body.contact_email)
        await ingest().finalize(body.dataset_id, owner, body.create_archiving_job, who)
        return FinalizeDatasetUploadResp(dataset_id=body.dataset_id, message="Dataset upload finalized")

    @router.post("/s3/uploadState", status_code=201, response_model=UploadStateResp, responses=_responses(404))
    async def upload_state(body: UploadStateBody, who: Who) -> UploadStateResp:
        """moverd's own (the reference has no listing): the dataset's uploaded objects and its
        open multipart uploads with the parts S3 has, so that a client resumes where it stopped."""
        prefix, objects, uploads = await ingest().upload_state(body.dataset_id, who)
        return UploadStateResp(
            dataset_id=body.dataset_id, landing_prefix=prefix,
            objects=[StoredObject(object_name=n, size=s) for n, s in objects],
            uploads=[OpenUploadState(object_name=n, upload_id=u, parts=[
                StoredPart(part_number=p.number, size=p.size, etag=p.etag, checksum_sha256=p.checksum_sha256)
                for p in parts]) for n, u, parts in uploads])

    @router.post("/s3/abortDatasetUpload", status_code=201, response_model=AbortDatasetUploadResp,
                 responses=_responses(404, 409))
    async def abort_dataset_upload(body: AbortDatasetUploadBody, who: Who) -> AbortDatasetUploadResp:
        """Abort the dataset's open multipart uploads, delete what it uploaded and release its
        reservation (refused once it was finalized)."""
        await ingest().abort_dataset(body.dataset_id, who)
        return AbortDatasetUploadResp(dataset_id=body.dataset_id, message=f"Upload {body.dataset_id} aborted.")

    return router
