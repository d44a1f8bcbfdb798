"""Streaming multipart/form-data: the file part goes to a sink chunk by chunk, never whole in memory.

Starlette's own form parser spools a file to a temporary file first and only then hands it over,
so a 2 GiB upload would be written twice and its size limit checked only at the end. Here the
file's bytes flow straight from the socket to the sink (which hashes, validates and stores them),
in batches written from a thread so the event loop keeps serving other requests.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request

from app.errors import Invalid, UploadInterrupted

FLUSH_BYTES = 1 << 20  # hand the sink ~1 MiB at a time: few thread hops, bounded memory
MAX_FIELD_BYTES = 64 * 1024  # plain form fields (purpose, a name) are small


class FileSink(Protocol):
    def write(self, data: bytes) -> None: ...


async def read_multipart(request: Request, open_file: Callable[[str, str], FileSink],
                         file_field: str = "file") -> tuple[dict[str, str], bool]:
    """Parse the request body; stream the `file_field` part to open_file(field, filename).

    Returns the plain fields and whether the file part was present. Raises Invalid for a body
    that is not multipart, and UploadInterrupted when the client disconnects mid-body.
    """
    content_type, params = parse_options_header(request.headers.get("content-type"))
    if content_type != b"multipart/form-data" or b"boundary" not in params:
        raise Invalid(f"send the file as multipart/form-data with a {file_field!r} field "
                      f"(curl -F {file_field}=@data.jsonl)")

    fields: dict[str, str] = {}
    state = {"headers": {}, "field": b"", "value": b"", "name": None, "filename": None, "buffer": [],
             "in_file": False}
    sink: list[FileSink | None] = [None]
    pending: list[bytes] = []  # file bytes parsed but not yet handed to the sink
    seen_file = [False]

    def on_header_field(data, start, end):
        state["field"] += data[start:end]

    def on_header_value(data, start, end):
        state["value"] += data[start:end]

    def on_header_end():
        state["headers"][state["field"].decode("latin-1").lower()] = state["value"]
        state["field"], state["value"] = b"", b""

    def on_headers_finished():
        _, disposition = parse_options_header(state["headers"].get("content-disposition"))
        state["name"] = disposition.get(b"name", b"").decode("utf-8", "replace")
        filename = disposition.get(b"filename")
        state["filename"] = filename.decode("utf-8", "replace") if filename is not None else None
        state["buffer"] = []
        state["in_file"] = state["name"] == file_field and state["filename"] is not None
        if state["in_file"]:
            if seen_file[0]:
                raise Invalid(f"send one {file_field!r} part per request")
            seen_file[0] = True
            sink[0] = open_file(state["name"], state["filename"] or "upload")

    def on_part_data(data, start, end):
        if state["in_file"]:
            pending.append(bytes(data[start:end]))
        else:
            state["buffer"].append(bytes(data[start:end]))
            if sum(map(len, state["buffer"])) > MAX_FIELD_BYTES:
                raise Invalid(f"form field {state['name']!r} is over {MAX_FIELD_BYTES} bytes")

    def on_part_end():
        if not state["in_file"] and state["name"]:
            fields[state["name"]] = b"".join(state["buffer"]).decode("utf-8", "replace")
        state["headers"] = {}

    parser = MultipartParser(params[b"boundary"], {
        "on_header_field": on_header_field, "on_header_value": on_header_value,
        "on_header_end": on_header_end, "on_headers_finished": on_headers_finished,
        "on_part_data": on_part_data, "on_part_end": on_part_end,
    })

    async def flush(force: bool = False) -> None:
        if sink[0] is not None and pending and (force or sum(map(len, pending)) >= FLUSH_BYTES):
            data = b"".join(pending)
            pending.clear()
            await run_in_threadpool(sink[0].write, data)

    try:
        async for chunk in request.stream():
            parser.write(chunk)
            await flush()
        parser.finalize()
    except ClientDisconnect:
        raise UploadInterrupted("the client disconnected before the upload was complete") from None
    except MultipartParseError as exc:
        raise Invalid(f"the request body is not valid multipart/form-data: {exc}") from None
    await flush(force=True)
    return fields, seen_file[0]
