"""Datasets: streamed uploads that are stored whole or not at all, validated line by line."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from app.config import Settings
from app.datasets import repository
from app.datasets.tables import Dataset
from app.db import after_commit, on_rollback, release_connection
from app.errors import Conflict, Invalid, NotFound, PayloadTooLarge
from app.idempotency import service as idempotency
from app.jobs.states import ACTIVE
from app.pagination import Page, page
from app.quotas import service as quotas
from app.storage.base import ObjectWriter, Storage, delete_objects, make_key
from app.teams.service import Caller
from app.text import format_bytes
from app.uploads import declared_file_bytes, read_multipart
from worker.training.data import DataError, DatasetValidator
from worker.training.estimate import token_estimate
from worker.training.spec import excerpt

log = logging.getLogger(__name__)

# One row longer than this is a broken file, not a long chat: 4 MiB of text is about a million tokens,
# eight times the longest context a model trains on today (128k). Tokenizing a row holds ~300 bytes a
# token, so a 16 MiB row took 5 GB in the preflight process, and as much in the training process.
MAX_LINE_BYTES = 4 * 1024 * 1024
OVERLONG = f"line is longer than {format_bytes(MAX_LINE_BYTES)}"
LINE_HEAD_BYTES = 4096  # of an overlong line, what the validator sees: enough to tell what a first line is


class Room(Protocol):
    """What an upload may store: the team's storage room (quotas.StorageRoom), or a replay's (ReplayRoom)."""

    def check_declared(self, declared_bytes: int | None) -> None: ...

    def check_stream(self, stored_bytes: int) -> None: ...

    def release(self) -> None: ...


class ByteSink(Protocol):
    size: int

    def write(self, data: bytes) -> None: ...


SinkT = TypeVar("SinkT", bound=ByteSink)


class DatasetIngest(Generic[SinkT]):
    """Takes an upload's bytes as they arrive: stores them, counts them, validates each line.

    The sink is the upload's ObjectWriter on the server, and a writer that keeps nothing in the
    CLI's local check, which runs this same code for its verdict alone. `room`: what the upload may
    store (the team's storage quota), checked before each write, so no byte past it is stored."""

    def __init__(self, writer: SinkT, max_bytes: int, room: Room | None = None):
        self.writer = writer
        self.max_bytes = max_bytes
        self.room = room
        self.validator = DatasetValidator(keep_examples=False)
        self._partial = b""  # the start of a line whose newline has not arrived yet
        self._skipping = False  # inside a line already reported as too long

    def write(self, data: bytes) -> None:
        if self.writer.size + len(data) > self.max_bytes:
            raise PayloadTooLarge(
                f"the file is larger than the limit of {format_bytes(self.max_bytes)}; "
                "split it, or ask an operator to raise QLORA_MAX_UPLOAD_BYTES")
        if self.room is not None:
            self.room.check_stream(self.writer.size + len(data))
        self.writer.write(data)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            if self._skipping:
                self._skipping = False  # the newline that ends the overlong line
                continue
            if len(line) > MAX_LINE_BYTES:  # whole within this chunk: as overlong as one that spans chunks
                self.validator.skip_line(OVERLONG, line[:LINE_HEAD_BYTES])
                continue
            self.validator.feed(line)
        if len(self._partial) > MAX_LINE_BYTES and not self._skipping:
            self.validator.skip_line(OVERLONG, self._partial[:LINE_HEAD_BYTES])
            self._skipping, self._partial = True, b""
        elif self._skipping:
            self._partial = b""

    def finish(self) -> None:
        if self._partial and not self._skipping:
            self.validator.feed(self._partial)  # a last line without a trailing newline
        self._partial = b""


async def upload(session: Session, storage: Storage, settings: Settings, caller: Caller, request: Request,
                 check_fields: Callable[[dict[str, str]], None] | None = None, *, idempotency_key: str | None = None,
                 scope: str = "POST /datasets") -> tuple[Dataset, bool]:
    """Stream a multipart upload to storage and record it. `check_fields` may refuse the request
    on its other form fields (they can come after the file): the stored bytes are then dropped.
    Returns the dataset and whether an earlier upload with the same Idempotency-Key made it (the
    same file, name and fields: app/idempotency/); then this copy is dropped and nothing is recorded.

    The team's storage quota is read first: a team at its limit, or a body declared larger than what
    is left, is refused before a byte of it is read; a body that declares no length is cut off where
    it passes the limit. An upload whose key made a dataset already is bound by that dataset's size
    instead (ReplayRoom): a replay keeps nothing, so the quota need not have room for it.

    The session has only authenticated the caller so far. Its connection goes back to the pool
    while the body streams (a slow client can take minutes), and a new one is taken to record."""
    idempotency.checked_key(idempotency_key)  # before a byte of the body is read
    slot = request.app.state.upload_slots.take(caller.key_id)  # 429 at the key's cap, before a byte is read
    try:
        room = await run_in_threadpool(_room, session, settings, caller, idempotency_key, scope,
                                       request.app.state.uploads_in_flight)
        await run_in_threadpool(release_connection, session)
        try:
            if room is not None:
                room.check_declared(declared_file_bytes(request))
            return await _stream_and_record(session, storage, settings, caller, request, room, check_fields,
                                            idempotency_key, scope)
        finally:
            if room is not None:
                room.release()
    finally:
        slot.release()


async def _stream_and_record(session: Session, storage: Storage, settings: Settings, caller: Caller, request: Request,
                             room: Room | None, check_fields: Callable[[dict[str, str]], None] | None,
                             idempotency_key: str | None, scope: str) -> tuple[Dataset, bool]:
    key = make_key(caller.team_id, "datasets")
    ingest: list[DatasetIngest[ObjectWriter]] = []
    filename: list[str] = []

    def open_file(_field: str, name: str) -> DatasetIngest[ObjectWriter]:
        filename.append(name)
        ingest.append(DatasetIngest(storage.writer(key, expected_size=settings.max_upload_bytes), settings.max_upload_bytes,
                                    room))  # at most that: its parts sized for it
        return ingest[0]

    try:
        fields, has_file = await read_multipart(request, open_file, settings.max_upload_bytes)
        if not has_file:
            raise Invalid("no file in the upload: send it as the multipart field 'file' (curl -F file=@data.jsonl)")
        if check_fields:
            check_fields(fields)
        ingest[0].finish()
        stored = await run_in_threadpool(ingest[0].writer.commit)  # the last part's upload: off the event loop
    except BaseException:
        if ingest:
            ingest[0].writer.abort()  # nothing of a refused or broken upload is kept
        raise
    keyed = idempotency.requested(idempotency_key, scope, {"filename": filename[0], "sha256": stored.sha256,
                                                           "fields": fields})
    return await run_in_threadpool(_record, session, storage, settings, caller, ingest[0].validator, stored,
                                   filename[0], keyed)


@dataclass(frozen=True)
class ReplayRoom:
    """What an upload may store whose key made a dataset already: that dataset's bytes and no more.
    Sent again, the same file is as large, and what it stores is dropped once it is found the same
    (_record); a larger file cannot be the same, so it is refused as the key's reuse where it passes
    that size, before a byte more is stored."""

    key: str
    made: idempotency.Made
    earlier_bytes: int

    def refused(self, what: str) -> idempotency.KeyReused:
        return idempotency.reused(self.key, self.made, f"was sent with a file of {format_bytes(self.earlier_bytes)} "
                                                       f"(this one is {what})")

    def check_declared(self, declared_bytes: int | None) -> None:
        if declared_bytes is not None and declared_bytes > self.earlier_bytes:
            raise self.refused(format_bytes(declared_bytes))

    def check_stream(self, stored_bytes: int) -> None:
        if stored_bytes > self.earlier_bytes:
            raise self.refused(f"already over {format_bytes(self.earlier_bytes)}")

    def release(self) -> None:
        """Nothing held: a replay's copy is dropped, and its size is bound by the earlier one's."""


def _room(session: Session, settings: Settings, caller: Caller, key: str | None, scope: str,
          in_flight: quotas.UploadsInFlight) -> Room | None:
    """What this upload may store: a replay's room when its key made a dataset, else the team's storage room."""
    made = idempotency.made_with(session, caller.team_id, scope, key) if key is not None else None
    earlier = repository.get(session, caller.team_id, made.dataset_id) if made and made.dataset_id else None
    if key is not None and made is not None and earlier is not None:  # (a deleted dataset takes its key with it)
        return ReplayRoom(key, made, earlier.bytes)
    return quotas.storage_room(session, settings, caller.team_id, in_flight)


def _record(session, storage, settings, caller, validator: DatasetValidator, stored, filename: str,
            keyed: idempotency.Keyed | None) -> tuple[Dataset, bool]:
    # The object is stored; if the row is never committed (refused here, or the request fails later),
    # the object must go too.
    on_rollback(session, lambda: storage.delete(stored.key))
    if keyed is not None:
        try:
            idempotency.check_not_made_meanwhile(session, caller.team_id, keyed)  # takes the team's row
        except idempotency.MadeMeanwhile as earlier:  # sent before: its dataset is the answer, this copy goes
            storage.delete(stored.key)
            assert earlier.made.dataset_id is not None  # a key of an upload endpoint made a dataset
            return get(session, caller, earlier.made.dataset_id), True
    quotas.check_storage_fits(session, settings, caller, stored.size)
    fmt: str | None
    try:
        verdict = validator.finish()
        status, errors, error_count, fmt = "ready", [], 0, verdict.format
    except DataError as exc:  # the lines are listed on the record, not raised
        status = "invalid"
        errors = [{"line": e.line, "message": e.message} for e in exc.errors]
        error_count, fmt = exc.total, validator.format
    dataset = Dataset(
        team_id=caller.team_id, filename=filename[:255], storage_key=stored.key, bytes=stored.size,
        sha256=stored.sha256, status=status, format=fmt, rows=validator.rows,
        token_estimate=token_estimate(validator.chars), error_count=error_count, errors=errors,
    )
    session.add(dataset)
    session.flush()
    if keyed is not None:
        idempotency.bind(session, caller.team_id, keyed, dataset_id=dataset.id)
    return dataset, False


def get(session: Session, caller: Caller, dataset_id: str) -> Dataset:
    dataset = repository.get(session, caller.team_id, dataset_id)
    if dataset is None:
        raise NotFound(f"no dataset {excerpt(dataset_id)}")
    return dataset


def list_page(session: Session, caller: Caller, cursor: str | None, limit: int) -> Page:
    """The team's datasets newest first."""
    return page(repository.list_page(session, caller.team_id, cursor, limit), limit)


def delete(session: Session, storage: Storage, caller: Caller, dataset_id: str) -> None:
    quotas.lock_team(session, caller.team_id)  # as a job creation does: a job created meanwhile is seen, or sees the delete
    dataset = get(session, caller, dataset_id)
    users = repository.active_jobs_using(session, caller.team_id, dataset.id, ACTIVE)
    if users:
        names = ", ".join(f"{job.id} ({job.status})" for job in users[:5])
        raise Conflict(f"dataset {dataset.id} is used by jobs that have not finished: {names}; "
                       "cancel them or wait for them to finish", code="dataset_in_use")
    key = dataset.storage_key
    session.delete(dataset)
    session.flush()
    after_commit(session, lambda: delete_objects(storage, [key]))  # the row goes first; a stray object is harmless
