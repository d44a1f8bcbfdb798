"""A small HTTP client for the qlora-service API, used by the `qlora datasets` and `qlora jobs` verbs.

All HTTP lives here; the verbs (client.py) only parse arguments and format answers. Nothing in this
module imports torch, and the dataset check imports the server's own ingest code lazily, so
`qlora --help` stays fast.
"""

from __future__ import annotations

import copy
import glob
import hashlib
import json
import os
import re
import sys
import tarfile
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import httpx

from app.openai.ids import FILE, JOB, native

CHUNK_BYTES = 1 << 20  # 1 MiB reads and writes: steady progress, bounded memory for a 2 GiB file
REDIRECTS = (301, 302, 303, 307, 308)
CREATE_TRIES = 4  # a creation (a job, an upload) whose answer is lost is sent again (1, 2, 4 s apart), with its key
RETRIED_STATUSES = (502, 503, 504)  # a proxy or a full server that may have passed the request on, or not

Progress = Callable[[int], None]  # called with the bytes just moved


class ClientError(Exception):
    """An error to show the user: the API's message (and details) or why the API could not be reached."""

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None, details: Any = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.details = details


# ---------------------------------------------------------------- where the server is


def qlora_home() -> Path:
    # Read directly rather than through app.config.Settings: the client must work on a laptop
    # that has none of the server's configuration, and must not fail on it either.
    return Path(os.environ.get("QLORA_HOME") or "~/.qlora").expanduser()


def resolve_credentials(url: str | None = None, api_key: str | None = None,
                        warn: Callable[[str], None] | None = None) -> tuple[str, str]:
    """The server URL and API key: each from the flag, else QLORA_URL / QLORA_API_KEY, else the
    credentials file that the embedded server writes on its first start. Both are checked here, so a
    mistyped URL or a key pasted with a line break is named as such, not as a server out of reach."""
    path = qlora_home() / "credentials.json"
    for flag, value in (("--url", url), ("--api-key", api_key)):
        if value is not None and not value.strip():
            # `--api-key "$KEY"` with KEY unset: falling back to another identity would be a surprise.
            raise ClientError(f"{flag} is empty: give a value, or leave the flag out to use the environment or {path}")
    # Each value with where it came from, for the message when it cannot be used.
    found_url = (url, "--url") if url else (os.environ.get("QLORA_URL"), "QLORA_URL")
    found_key = (api_key, "--api-key") if api_key else (os.environ.get("QLORA_API_KEY"), "QLORA_API_KEY")
    if not found_url[0] or not found_key[0]:  # the file only where the flags and the environment leave a gap
        saved = _saved_credentials(path, warn)
        found_url = found_url if found_url[0] else (saved.get("url"), str(path))
        found_key = found_key if found_key[0] else (saved.get("api_key"), str(path))
    (url, url_source), (api_key, key_source) = found_url, found_key
    if not url or not api_key:
        missing = [name for name, value in (("server URL", url), ("API key", api_key)) if not value]
        raise ClientError(
            f"no {' and no '.join(missing)}: pass --url and --api-key, or set QLORA_URL and QLORA_API_KEY (an admin "
            f"makes a key with `qlora admin create-key TEAM`); the embedded server (`qlora serve` with no database "
            f"configured) saves both to {path} on its first start")
    return _checked_url(url, url_source), _checked_key(api_key, key_source)


def _saved_credentials(path: Path, warn: Callable[[str], None] | None) -> dict:
    """credentials.json's {"url", "api_key"}, {} where there is none; ClientError for one that cannot be used."""
    if not path.exists():
        return {}
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as exc:  # a directory, unreadable, not JSON, not UTF-8
        raise ClientError(f"cannot read {path}: {exc}; fix or delete it, or pass --url and --api-key") from None
    if not isinstance(saved, dict) or not all(isinstance(saved.get(k, ""), str) for k in ("url", "api_key")):
        raise ClientError(f"{path} must hold a JSON object with the strings \"url\" and \"api_key\"; fix or delete "
                          "it, or pass --url and --api-key")
    if warn and os.name == "posix" and path.stat().st_mode & 0o077:
        # As ssh says of a private key: anyone who can read the file can act as the team.
        warn(f"warning: {path} holds an API key and others on this machine can read it: chmod 600 {path}")
    return saved


def _checked_url(url: str, source: str) -> str:
    url = url.strip()
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        problem = str(exc)
    else:
        problem = ("it must start with http:// or https://" if parsed.scheme not in ("http", "https")
                   else "it names no host" if not parsed.host
                   else "the API's address takes no ?query or #fragment" if parsed.query or parsed.fragment else "")
    if problem:
        raise ClientError(f"the server URL from {source}, {url!r}, cannot be used: {problem} "
                          "(e.g. http://127.0.0.1:8000, or https://host/prefix behind a proxy)")
    return url.rstrip("/")


API_KEY = re.compile(r"[!-~]+")  # printable ASCII without spaces: what an HTTP header carries as is


def _checked_key(api_key: str, source: str) -> str:
    if not API_KEY.fullmatch(api_key):
        # Never echoed: it may be a real key with a stray character.
        raise ClientError(f"the API key from {source} holds a space, a line break or a non-ASCII character, "
                          "which no API key has: copy it again")
    return api_key


# An id goes into the URL's path: anything but these characters could name another route (`../jobs/ID`
# sent to `datasets delete` would reach DELETE /jobs/ID/...), or make a URL httpx refuses.
ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
ID_HINTS = {"job id": "32 hex digits, as `qlora jobs list` shows them",
            "dataset id": "32 hex digits, as `qlora datasets list` shows them",
            "artifact kind": "adapter, merged or report"}


# The same job and dataset as /v1 names them (`ftjob-<job id>`, `file-<dataset id>`): what the openai SDK printed
# for a job made with it, which a user then downloads with `qlora jobs download`.
OPENAI_PREFIXES = {"job id": JOB, "dataset id": FILE}


def native_id(value: str, what: str) -> str:
    """A job or dataset id as the native API names it: taken as given, or from its /v1 name."""
    prefix = OPENAI_PREFIXES.get(what)
    return native(value, prefix) if prefix else value


def _id(value: str, what: str = "job id") -> str:
    value = native_id(value, what)
    if not ID.fullmatch(value):
        shown = value if len(value) <= 80 else f"{value[:60]}… ({len(value):,} characters)"
        raise ClientError(f"{shown!r} is not a{'n' if what[0] in 'aeiou' else ''} {what}: {ID_HINTS[what]}")
    return value


# ---------------------------------------------------------------- the API

POLLED_KEPT = 16  # answers kept for If-None-Match: a watch polls one job and its curve
# Nor any answer larger than this: a page of a long curve (up to 3 MB of JSON, ~30 MB once parsed) is asked once,
# the next poll asks past it; keeping the last 16 held hundreds of MB in `jobs watch` for nothing.
POLLED_KEPT_BYTES = 512 * 1024


class ApiClient:
    def __init__(self, url: str, api_key: str, timeout: float = 60):
        self.url = url
        self._http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {api_key}"}, timeout=timeout,
                                  event_hooks={"response": [self._answered]})
        # The last request the API answered, "GET http://host/jobs": an answer this client cannot use is
        # named by it (UnexpectedAnswer), wherever the command found that out.
        self.last_answered: str | None = None
        # The last answer to each polled read, with its ETag: `qlora jobs watch` asks again with
        # If-None-Match, and an unchanged job or curve comes back as a 304 with no body.
        self._polled: OrderedDict[str, tuple[str, Any]] = OrderedDict()

    @classmethod
    def from_sources(cls, url: str | None = None, api_key: str | None = None,
                     warn: Callable[[str], None] | None = None) -> ApiClient:
        return cls(*resolve_credentials(url, api_key, warn))

    def _answered(self, response: httpx.Response) -> None:
        self.last_answered = _named(response.request)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- datasets
    def upload_dataset(self, path: Path, on_progress: Progress | None = None, *, tries: int = CREATE_TRIES,
                       backoff_s: float = 1.0, on_restart: Callable[[], None] | None = None,
                       on_sent: Callable[[], None] | None = None, idempotency_key: str | None = None) -> dict:
        """POST /datasets, streamed, with an Idempotency-Key: sent again (`on_restart` hears it before the
        file is read from its start again) when the connection could not be made, or the whole file went
        and its answer was lost; not when the upload broke off halfway (a refusal, or a link that broke:
        sending gigabytes again is the user's call). A repeat is answered with the dataset the first try
        recorded. `on_sent` hears when the whole file has gone: from then on the server may record it.
        `idempotency_key` (a new UUID when None) lets a later command send the same upload again just as safely."""
        state = {"tries": 0, "whole": False}

        def send(headers: dict[str, str]) -> httpx.Response:
            if state["tries"] and on_restart:
                on_restart()
            state.update(tries=state["tries"] + 1, whole=False)
            chunks, form = multipart_file_body(path, on_progress)

            def body() -> Iterator[bytes]:
                last = None
                for chunk in chunks:
                    if last is not None:
                        yield last
                    last = chunk
                # Heard before the last piece goes, not after: once it is written the server may hold the whole
                # file before this process runs again, and a Ctrl-C then must not say nothing was recorded.
                if on_sent:
                    on_sent()
                if last is not None:
                    yield last
                state["whole"] = True

            # No read timeout while the body is sent: the server validates as it stores, and a slow
            # link must not abort a 2 GiB upload halfway.
            return self._http.post("/datasets", content=body(), headers={**form, **headers},
                                   timeout=httpx.Timeout(60, read=None, write=None))

        def again(exc: Exception | None) -> bool:
            return exc is None or isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout) or bool(state["whole"])

        return self._once(send, tries=tries, backoff_s=backoff_s, again=again, key=idempotency_key, expect=dict)

    def list_datasets(self, limit: int = 50, cursor: str | None = None) -> tuple[list[dict], str | None]:
        """One page of the team's datasets, newest first, starting after `cursor`: (the datasets, the cursor of
        the next page, None on the last)."""
        return self._cursor_page("/datasets", {"limit": limit} | ({"cursor": cursor} if cursor else {}))

    def get_dataset(self, dataset_id: str) -> dict:
        return self._json("GET", f"/datasets/{_id(dataset_id, 'dataset id')}", expect=dict)

    def delete_dataset(self, dataset_id: str) -> None:
        self._json("DELETE", f"/datasets/{_id(dataset_id, 'dataset id')}")

    # --- jobs
    # A creation or a preflight may wait its team's turn (60 s), then a preflight process (30 s), then
    # the preflight itself (60 s at most) before the server answers: read for longer than that.
    PREFLIGHTED = httpx.Timeout(60, read=180)

    def create_job(self, body: dict, *, tries: int = CREATE_TRIES, backoff_s: float = 1.0,
                   idempotency_key: str | None = None) -> dict:
        """POST /jobs, sent again when its answer is lost (the connection dropped, a read timed out, a
        proxy's 502/503/504): a repeat is answered with the job the first try made. `idempotency_key`
        (a new UUID when None) lets a later command send the same creation again just as safely."""
        return self._once(lambda headers: self._http.post("/jobs", json=body, headers=headers, timeout=self.PREFLIGHTED),
                          tries=tries, backoff_s=backoff_s, key=idempotency_key, expect=dict)

    def _once(self, send: Callable[[dict[str, str]], httpx.Response], *, tries: int, backoff_s: float,
              again: Callable[[Exception | None], bool] = lambda _: True, key: str | None = None,
              expect: type | None = None) -> Any:
        """A creation sent with an Idempotency-Key of its own, and sent again with the same key (1, 2, 4 s
        apart) when it failed in transit or a proxy answered 502/503/504 and `again` agrees (it is told the
        transport error, or None for such an answer): the server answers a repeat with what the first
        try made, so a lost answer never makes a second one."""
        headers = {"Idempotency-Key": key or str(uuid.uuid4())}
        for attempt in range(1, tries + 1):
            last = attempt == tries
            try:
                response = send(headers)
            except httpx.TransportError as exc:
                if last or not again(exc):
                    raise _unreachable(self.url, exc) from None
            else:
                if last or response.status_code not in RETRIED_STATUSES or not again(None):
                    _raise_for_error(response)
                    return _decoded(response, expect)
            time.sleep(backoff_s * 2 ** (attempt - 1))
        raise AssertionError("unreachable: the last try returns or raises")

    def preflight_job(self, body: dict) -> dict:
        return self._json("POST", "/jobs/preflight", json=body, timeout=self.PREFLIGHTED, expect=dict)

    def list_jobs(self, status: str | None = None, limit: int = 20, cursor: str | None = None) -> tuple[list[dict], str | None]:
        """One page of the team's jobs, newest first, starting after `cursor`: (the jobs, the cursor of the
        next page, None on the last)."""
        params = {"limit": limit} | ({"status": status} if status else {}) | ({"cursor": cursor} if cursor else {})
        return self._cursor_page("/jobs", params)

    def get_job(self, job_id: str) -> dict:
        return self._poll(f"/jobs/{_id(job_id)}", expect=dict)

    def job_request(self, job_id: str, verb: str) -> dict:
        """POST /jobs/{id}/cancel, /pause or /resume: the job as it is after the request."""
        return self._json("POST", f"/jobs/{_id(job_id)}/{verb}", expect=dict)

    def delete_checkpoints(self, job_id: str) -> dict:
        return self._json("DELETE", f"/jobs/{_id(job_id)}/checkpoints", expect=dict)

    def delete_artifact(self, job_id: str, kind: str) -> dict:
        return self._json("DELETE", f"/jobs/{_id(job_id)}/artifacts/{_id(kind, 'artifact kind')}", expect=dict)

    def job_events(self, job_id: str, after: int | None = None, limit: int | None = None) -> list[dict]:
        """One page of events, oldest first, after the event with id `after`: at most `limit` (the API's default
        is 200, its most 1,000); a full page means there may be more."""
        params = {name: value for name, value in (("after", after), ("limit", limit)) if value is not None}
        return self._poll(f"/jobs/{_id(job_id)}/events", params=params, expect=list)

    def job_metrics(self, job_id: str, after_step: int | None = None, after_eval_step: int | None = None,
                    limit: int | None = None) -> dict:
        """One page of the curve (GET /jobs/{id}/metrics): at most `limit` points (the API's default when None)."""
        params = {name: value for name, value in (("after_step", after_step), ("after_eval_step", after_eval_step),
                                                  ("limit", limit)) if value is not None}
        return self._poll(f"/jobs/{_id(job_id)}/metrics", params=params, expect=dict)

    def job_curve_pages(self, job_id: str, after_step: int | None = None, after_eval_step: int | None = None,
                        limit: int | None = None) -> Iterator[dict]:
        """The curve past after_step / after_eval_step, a page at a time (the API answers at most `limit` points
        a request and says where to go on, `next`, while `has_more`): for a reader that keeps only what it needs
        of each page, whatever the length of the curve."""
        page = self.job_metrics(job_id, after_step, after_eval_step, limit)
        yield page
        while page.get("has_more"):
            page = self.job_metrics(job_id, page["next"]["after_step"], page["next"]["after_eval_step"], limit)
            yield page

    def job_curve(self, job_id: str, after_step: int | None = None, after_eval_step: int | None = None,
                  limit: int | None = None) -> dict:
        """The curve past after_step / after_eval_step, every page of it joined into one answer."""
        pages = self.job_curve_pages(job_id, after_step, after_eval_step, limit)
        curve = next(pages)
        page = curve
        for page in pages:
            curve["train"] += page["train"]
            curve["eval"] += page["eval"]
        curve["has_more"], curve["next"] = False, page.get("next")
        return curve

    def job_curve_thinned(self, job_id: str, points: int) -> dict:
        """The shape of the whole curve in at most `points` points (GET /jobs/{id}/metrics?points=N): each
        bucket of `bucket_steps` steps keeps its first, last, lowest and highest point of each series."""
        return self._poll(f"/jobs/{_id(job_id)}/metrics", params={"points": points}, expect=dict)

    def job_report(self, job_id: str) -> dict:
        return self._json("GET", f"/jobs/{_id(job_id)}/report", expect=dict)

    def job_artifacts(self, job_id: str) -> list[dict]:
        return self._json("GET", f"/jobs/{_id(job_id)}/artifacts", expect=list)

    def download_artifact(self, job_id: str, kind: str, out_dir: Path,
                          on_start: Callable[[int, int], None] | None = None,
                          on_progress: Progress | None = None) -> Downloaded:
        """Download an artifact's tar to out_dir, verified against the sha256 the API recorded.

        Resumable: what a download that broke off (a dropped connection, Ctrl-C) had written stays in
        its part file, and the next download of the same artifact asks only for the rest (Range, with
        If-Range: its sha256); the whole file is checked at the end all the same. `on_start` hears the
        size and the byte the transfer starts from (0, or where an earlier one stopped)."""
        listing = {a["kind"]: a for a in self.job_artifacts(job_id)}
        if kind not in listing:
            raise ClientError(f"job {job_id} has no {kind!r} artifact{self._why_none(job_id, listing)}", status=404)
        expected = listing[kind]
        total = expected["bytes"]
        try:
            with PartFile(Path(out_dir) / f"{job_id}-{kind}.tar", expected["sha256"]) as part:
                start = part.continue_within(total)
                if start < total:
                    with self._artifact_response(job_id, kind, expected["sha256"], start) as response:
                        if response.status_code != 206:  # the whole file: the server could not or would not resume
                            start = part.start_over()
                        if on_start:
                            on_start(total, start)
                        try:
                            # As the bytes arrive, not gathered into 1 MiB chunks: what arrived before a
                            # break is on disk, not lost with a half-filled chunk.
                            for data in response.iter_bytes():
                                part.write(data)
                                if on_progress:
                                    on_progress(len(data))
                        except httpx.TransportError as exc:
                            raise ClientError(f"the download broke off at byte {part.size:,} of {total:,} "
                                              f"({exc or type(exc).__name__}); run the same command again to resume "
                                              f"from there (kept in {part.path})") from None
                elif on_start:
                    on_start(total, start)
                return Downloaded(part.finish(total, resumed_from=start), expected, start)
        except OSError as exc:  # --out not a directory, not writable, or full
            raise ClientError(f"cannot write the download into {out_dir}: {exc.strerror or exc}"
                              f"{f' ({exc.filename})' if exc.filename else ''}; what was written stays for the "
                              "same command to resume") from None

    def _why_none(self, job_id: str, listing: dict) -> str:
        """Why a job has not the artifact asked for. "(it has: none yet)" told a job that failed or was
        cancelled, which never will have one, to wait."""
        if listing:
            return f" (it has: {', '.join(sorted(listing))})"
        status = self.get_job(job_id)["status"]
        if status in ("failed", "cancelled"):
            return f": it {'failed' if status == 'failed' else 'was cancelled'}, and artifacts are made only when a job succeeds"
        if status == "succeeded":
            return " (it has none left: they were deleted)"
        return f" yet: it is {status}, and its artifacts are stored when it succeeds (`qlora jobs watch {job_id}` follows it)"

    @contextmanager
    def _artifact_response(self, job_id: str, kind: str, sha256: str, start: int) -> Iterator[httpx.Response]:
        """The artifact's bytes from `start` (206) or whole (200), from the API or the storage it redirects to."""
        resume = {"Range": f"bytes={start}-"} if start else {}
        # If-Range: should the artifact have changed since its part was written, the API sends it whole.
        with self._send_stream("GET", f"/jobs/{_id(job_id)}/artifacts/{_id(kind, 'artifact kind')}",
                               headers={**resume, "If-Range": f'"{sha256}"'} if start else None) as response:
            if response.status_code not in REDIRECTS:
                _check_range(response, start)
                yield response
                return
            location = response.headers["location"]
            # The link serves what the API says it does: a storage key is written once and never
            # overwritten. No If-Range there: S3 compares it with its own ETag (an MD5, or a hash of the
            # parts), never our sha256, so it would always send the whole file.
            same = response.headers.get("x-checksum-sha256") == sha256
        # Redirects are followed by hand: the presigned URL carries its own signature, and the
        # API key must never travel to the storage host (nor would S3 accept two kinds of auth).
        # Range is not part of that signature, so the link takes it as sent.
        try:
            with httpx.Client(timeout=httpx.Timeout(60, read=300)) as storage:
                with storage.stream("GET", location, headers=resume if same else None) as response:
                    if response.status_code not in (200, 206):
                        response.read()
                        raise ClientError(f"the storage server answered {response.status_code} for the download "
                                          f"link: {response.text[:300]}", status=response.status_code)
                    _check_range(response, start if same else 0)
                    yield response
        except httpx.TransportError as exc:
            raise ClientError(f"the download from storage ({httpx.URL(location).host}) failed: {exc}; "
                              "try again") from None

    # --- usage
    def list_models(self) -> list[dict]:
        return self._json("GET", "/models", expect=list)

    def usage(self, from_: str | None = None, to: str | None = None, all_teams: bool = False) -> dict:
        params = {k: v for k, v in (("from", from_), ("to", to)) if v} | ({"all_teams": "true"} if all_teams else {})
        return self._json("GET", "/usage", params=params, expect=dict)

    # --- plumbing
    def _json(self, method: str, path: str, *, expect: type | None = None, **kwargs) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise _unreachable(self.url, exc) from None
        _raise_for_error(response)
        if not response.content and expect is not None:
            raise UnexpectedAnswer(self.last_answered, "it is empty")
        return _decoded(response, expect) if response.content else None

    def _cursor_page(self, path: str, params: dict) -> tuple[list[dict], str | None]:
        """A list endpoint's page: its {"data": [...]} and its "next_cursor" (None on the last page)."""
        page = self._json("GET", path, params=params, expect=dict)
        if "data" not in page:
            raise UnexpectedAnswer(self.last_answered, 'the field "data" is missing')
        if not isinstance(page["data"], list):
            raise UnexpectedAnswer(self.last_answered, f'its "data" is {_json_type(page["data"])}, not an array')
        cursor = page.get("next_cursor")
        if cursor is not None and not isinstance(cursor, str):
            raise UnexpectedAnswer(self.last_answered, f'its "next_cursor" is {_json_type(cursor)}, not a string')
        return page["data"], cursor

    def _poll(self, path: str, params: dict | None = None, expect: type | None = None) -> Any:
        """GET a polled read, sending the ETag of the last answer to the same URL: on 304 that answer
        is still current. Keeps the last few URLs only (a curve's URL moves on with after_step)."""
        url = str(self._http.build_request("GET", path, params=params).url)
        seen = self._polled.get(url)
        try:
            response = self._http.get(path, params=params, headers={"If-None-Match": seen[0]} if seen else None)
        except httpx.TransportError as exc:
            raise _unreachable(self.url, exc) from None
        if response.status_code == 304 and seen:
            self._polled.move_to_end(url)
            return copy.deepcopy(seen[1])  # the caller may change what it gets
        _raise_for_error(response)
        body = _decoded(response, expect)
        if (etag := response.headers.get("etag")) and len(response.content) <= POLLED_KEPT_BYTES:
            self._polled[url] = (etag, copy.deepcopy(body))
            self._polled.move_to_end(url)
            while len(self._polled) > POLLED_KEPT:
                self._polled.popitem(last=False)
        return body

    @contextmanager
    def _send_stream(self, method: str, path: str, headers: dict[str, str] | None = None) -> Iterator[httpx.Response]:
        try:
            with self._http.stream(method, path, headers=headers, timeout=httpx.Timeout(60, read=300)) as response:
                if response.status_code >= 400:
                    response.read()
                    _raise_for_error(response)
                yield response
        except httpx.TransportError as exc:
            raise _unreachable(self.url, exc) from None


def _unreachable(url: str, exc: Exception) -> ClientError:
    reason = str(exc).rstrip(".") or type(exc).__name__  # httpx's "Server disconnected ... response." ends in one
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
        return ClientError(f"cannot reach the API at {url}: {reason}; is the server running, "
                           "and is QLORA_URL (or --url) right?")
    # It was reached: saying otherwise would send the user to check a URL that is right.
    return ClientError(f"the connection to the API at {url} broke off, or its answer did not come in time: {reason}; "
                       "try again")


def _raise_for_error(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        error = response.json()["error"]
        raise ClientError(error["message"], status=response.status_code, code=error.get("code"),
                          details=error.get("details"))
    except (ValueError, KeyError, TypeError):  # not our error shape: a proxy, a crash page, another server
        if "html" in response.headers.get("content-type", ""):
            raise ClientError(f"{_not_the_api(response)} (an HTML page)", status=response.status_code) from None
        raise ClientError(f"the API answered {response.status_code}: {response.text[:300]}",
                          status=response.status_code) from None


def _decoded(response: httpx.Response, expect: type | None = None) -> Any:
    """A success's JSON body; ClientError where it is none, as from a server that is not this API, and
    UnexpectedAnswer where it is not the `expect`ed dict (a JSON object) or list (an array)."""
    try:
        if "json" in response.headers.get("content-type", ""):
            body = response.json()
            if expect is not None and not isinstance(body, expect):
                raise UnexpectedAnswer(_named(response.request), f"it is {_json_type(body)}, not {_json_type(expect())}")
            return body
    except ValueError:
        pass
    raise ClientError(f"{_not_the_api(response)} ({response.headers.get('content-type') or 'no content type'})",
                      status=response.status_code)


class UnexpectedAnswer(ClientError):
    """JSON from the API that is not what this client reads: another server, or another version of the API."""

    def __init__(self, request: str | None, what: str):
        super().__init__(f"the answer to {request or 'a request'} is not what this CLI expects ({what}): is the "
                         "server at QLORA_URL (or --url) the qlora-service API, of this CLI's version?")


def _named(request: httpx.Request) -> str:
    """A request as an error names it: "GET http://host/jobs" (its query left out)."""
    return f"{request.method} {request.url.copy_with(query=None)}"


def _json_type(value: Any) -> str:
    """How JSON calls a decoded value's type: "an object", "an array", "a string", "null"..."""
    if value is None:
        return "null"
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}.get(type(value), "a number")


def _not_the_api(response: httpx.Response) -> str:
    request = response.request
    return (f"{request.url.copy_with(query=None)} answered {request.method} with {response.status_code}, not with "
            "the API's JSON: is QLORA_URL (or --url) the address of the qlora-service API?")


# ---------------------------------------------------------------- uploads


def multipart_file_body(path: Path, on_progress: Progress | None = None) -> tuple[Iterator[bytes], dict[str, str]]:
    """A multipart/form-data body with one part, field `file`, as a generator over the file.

    Framed by hand because httpx's `files=` reads a file it cannot size into memory and sends no
    Content-Length; here the length is known up front, so the server can refuse an oversized
    upload before a byte of it is stored, and memory stays at one chunk.
    """
    boundary = f"qlora-{uuid.uuid4().hex}"
    # The filename is metadata only (the server makes the storage key), so quotes and line
    # breaks are simply replaced rather than escaped.
    filename = path.name.replace('"', "'").replace("\r", " ").replace("\n", " ")
    head = (f"--{boundary}\r\n"
            f'Content-Disposition: form-data; name="file"; filename="{filename}"\r\n'
            "Content-Type: application/jsonl\r\n\r\n").encode()
    tail = f"\r\n--{boundary}--\r\n".encode()

    def chunks() -> Iterator[bytes]:
        yield head
        with open(path, "rb") as f:
            while data := f.read(CHUNK_BYTES):
                yield data
                if on_progress:
                    on_progress(len(data))
        yield tail

    length = len(head) + path.stat().st_size + len(tail)
    return chunks(), {"Content-Type": f"multipart/form-data; boundary={boundary}", "Content-Length": str(length)}


@dataclass
class LocalCheck:
    """The verdict the server would give the file: format, rows and token estimate, or its bad lines."""

    format: str | None
    rows: int
    token_estimate: int
    error_count: int
    errors: list = field(default_factory=list)  # worker.training.data.LineError: line, message

    @property
    def ok(self) -> bool:
        return self.error_count == 0


class _Discard:
    """A sink that stores nothing: the server's ingest code, run for its verdict alone."""

    size = 0

    def write(self, data: bytes) -> None:
        pass


def check_dataset(path: Path, on_progress: Progress | None = None) -> LocalCheck:
    """Validate a JSONL file exactly as an upload is validated, by running the server's own ingest
    (the same line splitting, overlong-line rule, validator and token estimate) over the file."""
    from app.datasets.service import DatasetIngest
    from worker.training.data import DataError
    from worker.training.estimate import token_estimate

    ingest = DatasetIngest(_Discard(), max_bytes=sys.maxsize)  # the size limit is the server's to apply
    with open(path, "rb") as f:
        while data := f.read(CHUNK_BYTES):
            ingest.write(data)
            if on_progress:
                on_progress(len(data))
    ingest.finish()
    validator = ingest.validator
    try:
        validator.finish(source=str(path))
        errors, error_count = [], 0
    except DataError as exc:  # includes a file with no rows at all
        errors, error_count = exc.errors, exc.total
    return LocalCheck(format=validator.format, rows=validator.rows, token_estimate=token_estimate(validator.chars),
                      error_count=error_count, errors=errors)


# ---------------------------------------------------------------- downloads


@dataclass(frozen=True)
class Downloaded:
    path: Path  # the verified archive
    artifact: dict  # as GET /jobs/{id}/artifacts lists it
    resumed_from: int  # the byte this download continued from; 0 when it fetched the whole file


CONTENT_RANGE = re.compile(r"bytes (\d+)-\d+/(\d+|\*)")


def _check_range(response: httpx.Response, start: int) -> None:
    """A 206 must hold the bytes from `start` on, or appending it to the part file would corrupt it."""
    if response.status_code != 206:
        return
    sent = CONTENT_RANGE.fullmatch(response.headers.get("content-range", ""))
    if not start or sent is None or int(sent.group(1)) != start:
        raise ClientError(f"asked for the bytes from {start:,} on, the server sent "
                          f"{response.headers.get('content-range') or 'a range without Content-Range'}; try again")


class PartFile:
    """A download in progress, beside its destination: `.{name}.{sha256[:16]}.part`, renamed to the
    destination once whole and verified, so the destination never holds a partial or corrupted archive.

    Named after the content it holds, so a part is continued only with the same artifact's bytes (a
    part of an earlier version of the artifact is deleted when a download of the new one starts). Locked
    (flock) while a download writes it: a second download of the same artifact at the same time stops
    at once, saying so, instead of writing into the same file. The lock goes with its process, so a
    crash leaves no stale lock, only the part, which the next download continues.
    """

    def __init__(self, dest: Path, sha256: str):
        self.dest = dest
        self.sha256 = sha256
        self.path = dest.with_name(f".{dest.name}.{sha256[:16]}.part")
        self._digest = hashlib.sha256()
        self._file: BinaryIO | None = None

    def __enter__(self) -> PartFile:
        self.dest.parent.mkdir(parents=True, exist_ok=True)
        self._file = _locked(self.path)
        if self._file is None:
            raise ClientError(f"another download of {self.dest.name} is running (it writes {self.path}); "
                              "wait for it to finish, or stop it first")
        for stale in self.dest.parent.glob(glob.escape(f".{self.dest.name}.") + "*.part"):
            if stale != self.path and (held := _locked(stale)) is not None:  # not one being written now
                stale.unlink(missing_ok=True)
                held.close()
        return self

    def __exit__(self, *exc) -> None:
        # Whatever went wrong (a dropped connection, Ctrl-C), what was written stays for the next try.
        assert self._file is not None
        self._file.close()

    @property
    def size(self) -> int:
        assert self._file is not None
        return self._file.tell()

    def continue_within(self, total: int) -> int:
        """Where the download goes on: the end of what an earlier one wrote, hashed now so the whole file
        is checked at the end; 0 for an empty part or one longer than the artifact (started over)."""
        assert self._file is not None
        held = self._file.seek(0, os.SEEK_END)
        if held > total:
            return self.start_over()
        self._file.seek(0)
        while data := self._file.read(CHUNK_BYTES):
            self._digest.update(data)
        return held

    def start_over(self) -> int:
        assert self._file is not None
        self._file.seek(0)
        self._file.truncate()
        self._digest = hashlib.sha256()
        return 0

    def write(self, data: bytes) -> None:
        assert self._file is not None
        self._file.write(data)
        self._digest.update(data)

    def finish(self, total: int, resumed_from: int = 0) -> Path:
        """Rename the part into place if it holds `total` bytes that hash to the sha256; a short one stays
        for the next try, a corrupted one is deleted."""
        assert self._file is not None
        self._file.flush()
        if self.size < total:
            raise ClientError(f"the download ended early, at byte {self.size:,} of {total:,}; run the same command "
                              f"again to resume from there (kept in {self.path})")
        got = self._digest.hexdigest()
        if self.size > total or got != self.sha256:
            self.path.unlink()
            resumed = (f" (it continued an earlier download from byte {resumed_from:,}, and that part may be what "
                       "was corrupt)") if resumed_from else ""
            raise ClientError(f"checksum mismatch for {self.dest.name}: expected sha256 {self.sha256}, got {got}{resumed}; "
                              "the download was corrupted or tampered with and its part file has been deleted: "
                              "run the same command again to download it whole")
        os.replace(self.path, self.dest)
        return self.dest


def _locked(path: Path) -> BinaryIO | None:
    """`path` opened for reading and writing (created if missing) and locked, or None if another process
    holds its lock."""
    import fcntl  # POSIX only: imported here, so that the verbs which never lock work without it

    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return os.fdopen(fd, "r+b")
        except FileNotFoundError:
            pass
        # The download that held it finished meanwhile and renamed it into place: this file is the
        # archive now, not a part; open the name again.
        os.close(fd)


def extract_tar(archive: Path, out_dir: Path) -> list[str]:
    """Extract an artifact archive; the `data` filter refuses absolute paths, `..`, links out of
    out_dir and device files, so an archive cannot write outside out_dir. Returns the top-level names."""
    with tarfile.open(archive) as tar:
        tar.extractall(out_dir, filter="data")
        return sorted({name.split("/", 1)[0] for name in tar.getnames()})
