"""Streaming multipart/form-data: the file part goes to a sink chunk by chunk, never whole in memory.

Starlette's own form parser spools a file to a temporary file first and only then hands it over,
so a 2 GiB upload would be written twice and its size limit checked only at the end. Here the
file's bytes flow straight from the socket to the sink (which hashes, validates and stores them),
in batches written from a thread so the event loop keeps serving other requests.

Everything a caller sends is bounded while it arrives, whatever the request declares: the body as
counted (a chunked body has no Content-Length to check up front), and the rest of the form around
the file (the number of fields, and the bytes of their headers and values, which are held in memory).
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import unquote_to_bytes

from python_multipart.exceptions import FormParserError, MultipartParseError
from python_multipart.multipart import MultipartParser, MultipartState, parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request

from app.errors import Invalid, PayloadTooLarge, TooManyUploads, UploadInterrupted
from app.slots import KeySlots
from app.text import format_bytes, has_control_characters
from worker.training.spec import excerpt

FLUSH_BYTES = 1 << 20  # hand the sink ~1 MiB at a time: few thread hops, bounded memory
# The form around the file: the API reads one field besides it (`purpose`, under /v1). These bound
# what a caller can make the server hold in memory; a real client sends a fraction of either.
MAX_FORM_FIELDS = 16
MAX_FORM_BYTES = 64 * 1024  # every part's headers and every plain field's value, together
# The body may exceed the file by the form and the boundaries between parts (each under 80 bytes).
MULTIPART_OVERHEAD = MAX_FORM_BYTES + (MAX_FORM_FIELDS + 2) * 80
# Set in a request's scope by a reader that streams its body under a limit of its own (read_multipart):
# the cap on bodies read whole (QLORA_MAX_JSON_BYTES, app.main.RequestScope) then lets it through.
STREAMED_BODY = "qlora.streamed_body"


def upload_slots(per_key: int) -> KeySlots:
    """The uploads each API key has in flight in this process, up to QLORA_MAX_UPLOADS_PER_KEY: without a
    cap, one key's client opening uploads and sending each a little at a time held an S3 part buffer
    (8 MiB) per upload, as many as it liked, until the process ran out of memory."""
    return KeySlots(per_key, lambda held: TooManyUploads(
        f"this API key already has {held} uploads in flight, the limit per key (QLORA_MAX_UPLOADS_PER_KEY="
        f"{per_key}); send the next once one has finished"))


# A file name in RFC 5987's extended form, `filename*=UTF-8''%C3%A9t%C3%A9.jsonl`, as clients send a name that is not
# ASCII (urllib3 before 1.25, and so `requests`; RFC 6266 has it preferred to a plain `filename` beside it). The
# multipart parser drops such a parameter: the file was then read as a plain field, and refused past 64 KiB as
# a form too large, telling the caller to send the file as 'file', which it had.
_EXTENDED_FILENAME = re.compile(rb"""(?:^|;)\s*filename\*\s*=\s*([!#$&+.^`|~\w-]*)'[^']*'([^;\s]*)""", re.IGNORECASE)


# A quoted string in a header's parameters: what it holds is a value, never another parameter.
_QUOTED = re.compile(rb'"(?:[^"\\]|\\.)*"')


def _filename(disposition: bytes, plain: bytes | None) -> str | None:
    """A part's file name: its extended form where it has one (percent-decoded in its charset, or as UTF-8
    where that is no text encoding Python knows), else its plain form as UTF-8; None for a part without one."""
    extended = _EXTENDED_FILENAME.search(_QUOTED.sub(b'""', disposition))
    if extended is not None:
        raw = unquote_to_bytes(extended.group(2).decode("latin-1"))
        charset = extended.group(1).decode("ascii", "replace") or "utf-8"
        try:
            if codecs.lookup(charset)._is_text_encoding:  # not idna, punycode, rot13, zlib...: they raise, or are no text
                return _whole_characters(raw.decode(charset, "replace"))
        except (LookupError, UnicodeError):  # a charset Python does not know, or one that cannot decode with "replace"
            pass
        return raw.decode("utf-8", "replace")
    return plain.decode("utf-8", "replace") if plain is not None else None


def _whole_characters(name: str) -> str:
    """`name` with each half of a surrogate pair that stands alone replaced, as a byte its charset cannot read is.
    Some charsets' decoders make one (utf-7's "+2AA-", unicode_escape's "\\ud800") where UTF-8's refuses it: no
    database driver can encode it, and a name holding one was a 500 at the dataset's insert. A whole pair
    (unicode_escape's "\\ud83d\\ude00") is joined into the one character it spells: replacing every half, as a
    pattern over U+D800-DFFF did, stored that emoji as two U+FFFD."""
    return name.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


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


def _too_large(max_file_bytes: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"the upload is over the limit of {format_bytes(max_file_bytes)}; split the file, "
                           "or ask an operator to raise QLORA_MAX_UPLOAD_BYTES")


def declared_file_bytes(request: Request) -> int | None:
    """The least the file part can hold, by the body's declared length: its Content-Length less the
    most the form around the file may take. None for a body that declares none (chunked). A limit
    checked against this refuses a body before a byte of it is read, and never one whose file fits."""
    declared = request.headers.get("content-length")
    if not (declared and declared.isdigit()):
        return None
    return max(int(declared) - MULTIPART_OVERHEAD, 0)


async def read_multipart(request: Request, open_file: Callable[[str, str], FileSink], max_file_bytes: int,
                         file_field: str = "file") -> tuple[dict[str, str], bool]:
    """Parse the request body; stream the `file_field` part to open_file(field, filename).

    Returns the plain fields and whether the file part was present. Raises Invalid for a body
    that is not multipart, PayloadTooLarge for a body over max_file_bytes (plus the form around
    it) or a form over its bounds, and UploadInterrupted when the client disconnects mid-body.
    The sink checks the file's own size; the body's size is checked here on the bytes as they
    are read, so a chunked body, or bytes after the form's last boundary, cannot get past it.
    """
    request.scope[STREAMED_BODY] = True
    content_type, params = parse_options_header(request.headers.get("content-type"))
    if content_type != b"multipart/form-data" or b"boundary" not in params:
        raise Invalid(f"send the file as multipart/form-data with a {file_field!r} field "
                      f"(curl -F {file_field}=@data.jsonl)")
    max_body_bytes = max_file_bytes + MULTIPART_OVERHEAD
    declared = declared_file_bytes(request)
    if declared is not None and declared > max_file_bytes:
        raise _too_large(max_file_bytes)  # refused before a byte of the body is read

    fields: dict[str, str] = {}
    part = _Part()
    sink: FileSink | None = None
    pending: list[bytes] = []  # file bytes parsed but not yet handed to the sink
    seen_file = False
    form_parts = 0
    form_bytes = 0  # headers of every part, values of plain fields: what is held in memory

    def count_form_bytes(n: int) -> None:
        nonlocal form_bytes
        form_bytes += n
        if form_bytes > MAX_FORM_BYTES:
            raise PayloadTooLarge(f"the form's fields and part headers are over {format_bytes(MAX_FORM_BYTES)} "
                                  f"in all; send the file as the {file_field!r} field and only the fields the API reads")

    def on_header_field(data, start, end):
        count_form_bytes(end - start)
        part.header_field += data[start:end]

    def on_header_value(data, start, end):
        count_form_bytes(end - start)
        part.header_value += data[start:end]

    def on_header_end():
        part.headers[part.header_field.decode("latin-1").lower()] = part.header_value
        part.header_field, part.header_value = b"", b""

    def on_headers_finished():
        nonlocal sink, seen_file, form_parts
        _, disposition = parse_options_header(part.headers.get("content-disposition"))
        part.name = disposition.get(b"name", b"").decode("utf-8", "replace")
        part.filename = _filename(part.headers.get("content-disposition", b""), disposition.get(b"filename"))
        part.buffer = []
        part.in_file = part.name == file_field and part.filename is not None
        if part.filename and not part.in_file:
            # A file under another name (`curl -F data=@train.jsonl`) would be held as a plain field's value and
            # refused past 64 KiB as a form too large: say which field it came as, before more of it is read. (An
            # HTML form's file input left empty sends filename="" and nothing else: a plain, empty field.)
            raise Invalid(f"no file in the multipart field {file_field!r}: the file came as the field "
                          f"{excerpt(part.name)}; send it as {file_field!r} (curl -F {file_field}=@data.jsonl)")
        if part.in_file:
            if has_control_characters(part.filename or ""):  # Postgres cannot store a NUL in it
                raise Invalid(f"the file's name holds a control character (NUL, a line break, a tab, a bidi override): "
                              f"{excerpt(part.filename)}; rename the file")
            if seen_file:
                raise Invalid(f"send one {file_field!r} part per request")
            seen_file = True
            sink = open_file(part.name, part.filename or "upload")
            return
        form_parts += 1
        if form_parts > MAX_FORM_FIELDS:
            raise PayloadTooLarge(f"the form has more than {MAX_FORM_FIELDS} fields besides {file_field!r}; "
                                  "send only the fields the API reads")

    def on_part_data(data, start, end):
        if part.in_file:
            pending.append(bytes(data[start:end]))
        else:
            count_form_bytes(end - start)
            part.buffer.append(bytes(data[start:end]))

    def on_part_end():
        if not part.in_file and part.name:
            fields[part.name] = b"".join(part.buffer).decode("utf-8", "replace")
        part.headers = {}
        part.buffer = []

    try:
        parser = MultipartParser(params[b"boundary"], {
            "on_header_field": on_header_field, "on_header_value": on_header_value,
            "on_header_end": on_header_end, "on_headers_finished": on_headers_finished,
            "on_part_data": on_part_data, "on_part_end": on_part_end,
        })
    except FormParserError as exc:  # a boundary over the parser's 256 characters (RFC 2046 allows 70)
        raise Invalid(f"the multipart boundary is not one this API reads: {exc}") from None

    async def flush(force: bool = False) -> None:
        if sink is not None and pending and (force or sum(map(len, pending)) >= FLUSH_BYTES):
            data = b"".join(pending)
            pending.clear()
            await run_in_threadpool(sink.write, data)

    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > max_body_bytes:
                raise _too_large(max_file_bytes)
            parser.write(chunk)
            await flush()
        parser.finalize()
        if parser.state != MultipartState.END:  # a body cut off before its closing boundary: the file may be too
            raise Invalid("the request body ended before the multipart form's closing boundary "
                          f"(--{params[b'boundary'].decode('latin-1')}--): the upload was cut off; nothing was kept")
    except ClientDisconnect:
        raise UploadInterrupted("the client disconnected before the upload was complete") from None
    except MultipartParseError as exc:
        raise Invalid(f"the request body is not valid multipart/form-data: {exc}") from None
    await flush(force=True)
    return fields, seen_file
