"""Streaming multipart/form-data: the file part goes to a sink chunk by chunk, never whole in memory.

Starlette's own form parser spools a file to a temporary file first and only then hands it over,
so a 2 GiB upload would be written twice and its size limit checked only at the end. Here the
file's bytes flow straight from the socket to the sink (which hashes, validates and stores them),
in batches written from a thread so the event loop keeps serving other requests.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
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


@dataclass
class _Part:
    """The part being parsed: its headers as they arrive, then its name and (for a plain field) its bytes."""
    header_field: bytes = b""
    header_value: bytes = b""
    headers: dict[str, bytes] = field(default_factory=dict)
    name: str = ""
    filename: str | None = None
    in_file: bool = False
    buffer: list[bytes] = field(default_factory=list)


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
    part = _Part()
    sink: FileSink | None = None
    pending: list[bytes] = []  # file bytes parsed but not yet handed to the sink
    seen_file = False

    def on_header_field(data, start, end):
        part.header_field += data[start:end]

    def on_header_value(data, start, end):
        part.header_value += data[start:end]

    def on_header_end():
        part.headers[part.header_field.decode("latin-1").lower()] = part.header_value
        part.header_field, part.header_value = b"", b""

    def on_headers_finished():
        nonlocal sink, seen_file
        _, disposition = parse_options_header(part.headers.get("content-disposition"))
        part.name = disposition.get(b"name", b"").decode("utf-8", "replace")
        filename = disposition.get(b"filename")
        part.filename = filename.decode("utf-8", "replace") if filename is not None else None
        part.buffer = []
        part.in_file = part.name == file_field and part.filename is not None
        if part.in_file:
            if seen_file:
                raise Invalid(f"send one {file_field!r} part per request")
            seen_file = True
            sink = open_file(part.name, part.filename or "upload")

    def on_part_data(data, start, end):
        if part.in_file:
            pending.append(bytes(data[start:end]))
        else:
            part.buffer.append(bytes(data[start:end]))
            if sum(map(len, part.buffer)) > MAX_FIELD_BYTES:
                raise Invalid(f"form field {part.name!r} is over {MAX_FIELD_BYTES} bytes")

    def on_part_end():
        if not part.in_file and part.name:
            fields[part.name] = b"".join(part.buffer).decode("utf-8", "replace")
        part.headers = {}

    parser = MultipartParser(params[b"boundary"], {
        "on_header_field": on_header_field, "on_header_value": on_header_value,
        "on_header_end": on_header_end, "on_headers_finished": on_headers_finished,
        "on_part_data": on_part_data, "on_part_end": on_part_end,
    })

    async def flush(force: bool = False) -> None:
        if sink is not None and pending and (force or sum(map(len, pending)) >= FLUSH_BYTES):
            data = b"".join(pending)
            pending.clear()
            await run_in_threadpool(sink.write, data)

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
    return fields, seen_file
