"""Byte ranges of stored objects (RFC 9110, section 14), so that a download that broke off at 90%
continues from there instead of starting over. One function, `stored_object_response`, answers every
route that streams a stored object: a job's artifact, a dataset's file under /datasets and /v1/files.

One range is served, as 206. A Range header that is malformed, in another unit or asks for several
ranges is ignored and the whole object sent with 200, as RFC 9110 allows: a client that asked for more
than one range gets more than it asked, never wrong bytes, and no Range header can make a 5xx. The
ETag is the object's sha256, a strong validator, so `If-Range` with it continues only the same bytes:
with any other value the whole object comes back. `If-None-Match` with it answers 304 and no bytes.

The dashboard's own files (/static, and the page at /) take a Range by the same rule (RangedFileResponse).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Header, Request, Response
from fastapi.responses import FileResponse, StreamingResponse
from starlette.types import Receive, Scope, Send

from app.conditional import matches
from app.errors import ErrorBody, RangeNotSatisfiable, TooManyDownloads
from app.slots import KeySlot, KeySlots
from app.storage import Storage, StoredObject
from worker.training.spec import excerpt

# A byte-range-spec: first-last, first- or -suffix_length (RFC 9110 14.1.1); ASCII digits, no sign
# (\d would also take other scripts' digits).
RANGE_SPEC = re.compile(r"([0-9]*)-([0-9]*)")
# Past any object's size, and small enough to stay an ordinary int: a 5,000-digit number in a header
# must not cost int() its time, nor trip Python's limit on digits (ValueError, a 500).
HUGE = 1 << 63


@dataclass(frozen=True)
class RangeRequest:
    """What a request asked for with its Range, If-Range and If-None-Match headers, as received, and whether it
    is a HEAD: the headers of the answer without its bytes (a download manager's or `curl -I`'s check of the size)."""

    range: str | None = None
    if_range: str | None = None
    head: bool = False
    if_none_match: str | None = None
    downloads: KeySlots | None = None  # each key's downloads streaming in this process (None: not counted)


def range_request(
    request: Request,
    range_header: Annotated[str | None, Header(alias="Range", description=(
        "One byte range (`bytes=0-99`, `bytes=100-`, `bytes=-100`) to get 206 with those bytes; "
        "a malformed or multi-range header gets the whole file."))] = None,
    if_range: Annotated[str | None, Header(alias="If-Range", description=(
        "The ETag (the quoted sha256) of the bytes already held: the range is served only if the file "
        "is still the same, else the whole file with 200."))] = None,
    if_none_match: Annotated[str | None, Header(alias="If-None-Match", description=(
        "The ETag of the file already held (`curl --etag-compare`): 304 with no bytes while it is the same."))] = None,
) -> RangeRequest:
    return RangeRequest(range_header, if_range, head=request.method == "HEAD", if_none_match=if_none_match,
                        downloads=request.app.state.download_slots)


RangeDep = Annotated[RangeRequest, Depends(range_request)]


def download_slots(per_key: int) -> KeySlots:
    """The downloads each API key has streaming in this process, up to QLORA_MAX_DOWNLOADS_PER_KEY: without a cap,
    one key's client opening downloads and reading none held a socket and a file or a connection to the store
    for each, as many as it liked (600 at once took 450 of the process's file descriptors), until no one else
    could connect."""
    return KeySlots(per_key, lambda held: TooManyDownloads(
        f"this API key already has {held} downloads in progress, the limit per key (QLORA_MAX_DOWNLOADS_PER_KEY="
        f"{per_key}); start the next once one has finished"))

# For a ranged route's OpenAPI entry.
RANGED: dict[int | str, dict[str, Any]] = {
    206: {"description": "The one byte range asked for (Range), with Content-Range."},
    304: {"description": "Not modified: If-None-Match holds the file's ETag; no bytes are sent."},
    416: {"model": ErrorBody, "description": "`range_not_satisfiable`: the range starts at or past the end of the "
                                             "file; Content-Range says its size (`bytes */size`)."},
}


@dataclass(frozen=True)
class ByteRange:
    first: int
    last: int  # included, as in Content-Range

    @property
    def length(self) -> int:
        return self.last - self.first + 1


def etag_of(sha256: str) -> str:
    return f'"{sha256}"'


def _number(digits: str) -> int:
    digits = digits.lstrip("0") or "0"
    return int(digits) if len(digits) < 19 else HUGE


def requested_range(header: str | None, size: int) -> ByteRange | None:
    """The one range `header` asks for, clipped to the object; None to send the whole object (no header,
    another unit, a malformed one, several ranges, or a first > last that RFC 9110 calls invalid).
    Raises RangeNotSatisfiable for a range that holds no byte of the object."""
    if not header:
        return None
    unit, _, specs = header.partition("=")
    if unit.strip().lower() != "bytes":
        return None
    asked = [spec.strip() for spec in specs.split(",") if spec.strip()]
    if len(asked) != 1:
        return None
    spec = RANGE_SPEC.fullmatch(asked[0])
    if spec is None or spec.group(1) == spec.group(2) == "":
        return None
    first_digits, last_digits = spec.groups()
    if first_digits == "":  # -n: the last n bytes
        suffix = _number(last_digits)
        if suffix == 0 or size == 0:
            raise _unsatisfiable(header, size)
        return ByteRange(max(size - suffix, 0), size - 1)
    first = _number(first_digits)
    last = _number(last_digits) if last_digits else HUGE
    if last < first:
        return None
    if first >= size:
        raise _unsatisfiable(header, size)
    return ByteRange(first, min(last, size - 1))


class RangedFileResponse(FileResponse):
    """A file of the API's own (the dashboard's), its Range read as a download's (requested_range): Starlette's
    answered a reversed range (`bytes=100-10`), a malformed one or another unit with a text/plain 400 and an
    unsatisfiable one with an empty text/plain 416, and several ranges as multipart/byteranges. Now the whole file
    comes back (200) where a download's would, and 416 is the API's JSON error with the file's size in
    Content-Range. If-Range is Starlette's: the file's ETag or Last-Modified."""

    # Starlette's own parser, which FileResponse.__call__ asks (a Starlette upgrade that renames it fails
    # tests/fast/test_dashboard_ranges.py); requested_range's RangeNotSatisfiable is answered by the app's handler.
    @classmethod
    def _parse_range_header(cls, http_range: str, file_size: int) -> list[tuple[int, int]]:
        """The ranges to send, as Starlette's [start, end) pairs; none: the whole file."""
        wanted = requested_range(http_range, file_size)
        return [] if wanted is None else [(wanted.first, wanted.last + 1)]


def _unsatisfiable(header: str, size: int) -> RangeNotSatisfiable:
    fix = f"ask for bytes 0 to {size - 1}, or without Range for the whole file" if size else "ask without Range"
    return RangeNotSatisfiable(f"Range {excerpt(header)} holds no byte of this file, which has {size} bytes: {fix}",
                               headers={"Content-Range": f"bytes */{size}"})


def stored_object_response(asked: RangeRequest, storage: Storage, stored: StoredObject, media_type: str,
                           headers: dict[str, str], *, key_id: str) -> Response:
    """The stored object streamed whole (200) or the one range asked for (206), with Accept-Ranges and
    its ETag either way; `headers` (Content-Disposition, ...) go on both. To a HEAD the same headers,
    and storage is not read (the server would send none of the bytes, but a stream would read them all).
    A stream counts among the downloads of the key `key_id` (the caller's, or the one that signed a link)
    until its last byte is sent or its client leaves: 429 at QLORA_MAX_DOWNLOADS_PER_KEY."""
    etag = etag_of(stored.sha256)
    headers = {**headers, "Accept-Ranges": "bytes", "ETag": etag}
    # The client holds these bytes already (RFC 9110 13.2.2: If-None-Match is evaluated before Range): a download
    # manager or `curl --etag-compare` checking a 16 GB merged model for a change got all of it again.
    if matches(asked.if_none_match, etag):
        return Response(status_code=304, headers=headers)
    # If-Range other than our ETag (another file's tag, a weak one, a date: we send no Last-Modified)
    # means the client holds other bytes than these: the whole file is its answer, not a range of it.
    wanted = requested_range(asked.range, stored.size) if asked.if_range in (None, etag) else None
    if wanted is None:
        headers["Content-Length"] = str(stored.size)
        if asked.head:
            return Response(media_type=media_type, headers=headers)
        return _download(asked, key_id, lambda: storage.open(stored.key), status_code=200, media_type=media_type,
                         headers=headers)
    headers.update({"Content-Length": str(wanted.length),
                    "Content-Range": f"bytes {wanted.first}-{wanted.last}/{stored.size}"})
    if asked.head:
        return Response(status_code=206, media_type=media_type, headers=headers)
    return _download(asked, key_id, lambda: storage.open(stored.key, start=wanted.first, length=wanted.length),
                     status_code=206, media_type=media_type, headers=headers)


def _download(asked: RangeRequest, key_id: str, open_stored: Callable[[], Iterator[bytes]], **response: Any) -> Response:
    """The stored bytes as a stream, opened once the key has a download's slot (429 without)."""
    slot = asked.downloads.take(key_id) if asked.downloads is not None else None
    try:
        chunks = open_stored()
    except BaseException:
        if slot is not None:
            slot.release()
        raise
    return _StoredStream(chunks, slot, **response)


class _StoredStream(StreamingResponse):
    """A stored object's bytes, which give their key's download slot back and close the object (a file, a
    connection to the store) as soon as the answer ends, however it ends. Starlette leaves the iterator of a
    stream whose client left mid-body to the garbage collector, which in an idle API process (its start-up
    frozen out of the collector's sight) ran minutes later: the slot, the file and the connection were held that long."""

    def __init__(self, chunks: Iterator[bytes], slot: KeySlot | None, **response: Any):
        super().__init__(chunks, **response)
        self._chunks, self._slot = chunks, slot

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if self._slot is not None:
                self._slot.release()
            close = getattr(self._chunks, "close", None)
            if close is not None:
                with contextlib.suppress(ValueError):  # a cancelled answer whose read runs on in a thread: left to the collector
                    close()
