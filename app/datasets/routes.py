from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse

from app.datasets import service
from app.datasets.schemas import DatasetOut, DatasetPage
from app.deps import CallerDep, DatasetId, IdempotencyKeyHeader, SessionDep, SettingsDep, StorageDep
from app.idempotency import service as idempotency
from app.ranges import RANGED, RangeDep, stored_object_response
from app.routing import CheckedJSONRoute, outside_team_shares
from app.storage import StoredObject

router = APIRouter(prefix="/datasets", tags=["datasets"], route_class=CheckedJSONRoute)


@router.post("", response_model=DatasetOut, status_code=201,
             responses={413: {"description": "Over QLORA_MAX_UPLOAD_BYTES, or a form over its bounds around the file."},
                        429: {"description": "`too_many_uploads`: the key has QLORA_MAX_UPLOADS_PER_KEY uploads in flight."}},
             openapi_extra={"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
                 "type": "object", "required": ["file"],
                 "properties": {"file": {"type": "string", "format": "binary"}}}}}}})
@outside_team_shares
async def upload_dataset(request: Request, response: Response, session: SessionDep, storage: StorageDep,
                         settings: SettingsDep, caller: CallerDep, idempotency_key: IdempotencyKeyHeader = None):
    """Upload a JSONL file (multipart field `file`). It is streamed to storage and every line is
    validated; the answer says `ready`, or `invalid` with the first bad lines and their numbers.
    The body is counted as it arrives (413 past QLORA_MAX_UPLOAD_BYTES, with or without a
    Content-Length), and the form around the file is small: at most 16 other fields, 64 KiB in all."""
    dataset, replayed = await service.upload(session, storage, settings, caller, request, idempotency_key=idempotency_key)
    if replayed:
        response.headers[idempotency.REPLAYED_HEADER] = "true"
    return dataset


@router.get("", response_model=DatasetPage)
def list_datasets(session: SessionDep, caller: CallerDep, cursor: str | None = None, limit: int = 50):
    datasets = service.list_page(session, caller, cursor, limit)
    return {"data": datasets.data, "next_cursor": datasets.next_cursor}


@router.get("/{dataset_id}", response_model=DatasetOut)
def get_dataset(dataset_id: DatasetId, session: SessionDep, caller: CallerDep):
    return service.get(session, caller, dataset_id)


@router.get("/{dataset_id}/content", response_class=StreamingResponse, responses=RANGED)
@router.head("/{dataset_id}/content", include_in_schema=False)
def dataset_content(dataset_id: DatasetId, session: SessionDep, storage: StorageDep, caller: CallerDep, asked: RangeDep):
    """The file as uploaded; resumable with Range and If-Range, as an artifact's download."""
    dataset = service.get(session, caller, dataset_id)
    return stored_object_response(asked, storage, StoredObject(dataset.storage_key, dataset.bytes, dataset.sha256),
                                  "application/x-ndjson", {
                                      "Content-Disposition": f'attachment; filename="{dataset.id}.jsonl"',
                                      "X-Checksum-Sha256": dataset.sha256}, key_id=caller.key_id)


@router.delete("/{dataset_id}", status_code=204)
def delete_dataset(dataset_id: DatasetId, session: SessionDep, storage: StorageDep, caller: CallerDep):
    service.delete(session, storage, caller, dataset_id)
