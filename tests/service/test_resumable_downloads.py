"""Resumable downloads, end to end: every route that streams stored bytes answers Range (206, 416,
If-Range, malformed and multi-range headers ignored, never a 5xx), and `qlora jobs download` continues
a download that broke off from the byte where it stopped, on local storage through the API and on S3
through the presigned redirect, ending with a file whose sha256 is checked whole.

The breaks are real: a TCP proxy between the CLI and the server cuts the connection after a number
of bytes, or hides the Range header from the server (one that does not resume)."""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
import random
import re
import threading
import time

import httpx
import pytest
from playwright.sync_api import expect

from app.db import session_scope
from app.jobs.tables import Artifact, Job
from app.storage import Storage, make_key, storage_from_settings
from tests import services
from tests.deployment import upload
from tests.service.test_bad_input import local_api  # noqa: F401 (the API on local storage, a fixture)
from tests.service.test_cli_client import clean_env, qlora
from tests.service.test_preference_jobs import succeeded_job

# A few of the CLI's 1 MiB chunks, and not a multiple of anything.
DATA = random.Random(7).randbytes(3 * (1 << 20) + 12_345)
SHA256 = hashlib.sha256(DATA).hexdigest()
CUT_AFTER = 1_600_000  # bytes the proxy passes before it cuts the connection: mid-file


class BreakingProxy:
    """A TCP proxy to `upstream` that passes everything, unless told to cut each connection after
    `cut_after` bytes of answer, to hide requests' Range headers from the server, or to pass requests
    slowly (`request_delay` seconds before each chunk: an upload over a slow link)."""

    def __init__(self, upstream: str):
        host, port = upstream.removeprefix("http://").rstrip("/").split(":")
        self.cut_after: int | None = None
        self.strip_range = False
        self.request_delay = 0.0
        ready, self._box = threading.Event(), {}

        async def answer(upstream_reader, client_writer):
            passed = 0
            while data := await upstream_reader.read(65536):
                if self.cut_after is not None and passed + len(data) >= self.cut_after:
                    client_writer.write(data[:self.cut_after - passed])
                    await client_writer.drain()
                    client_writer.transport.abort()  # the link drops mid-body
                    return
                passed += len(data)
                client_writer.write(data)
                await client_writer.drain()
            client_writer.close()

        async def ask(client_reader, upstream_writer):
            while data := await client_reader.read(65536):
                await asyncio.sleep(self.request_delay)
                if self.strip_range:  # as a server without Range support sees the request
                    data = re.sub(rb"(?im)^(if-)?range:", rb"x-ignored:", data)
                upstream_writer.write(data)
                await upstream_writer.drain()
            upstream_writer.close()

        async def handle(client_reader, client_writer):
            upstream_reader, upstream_writer = await asyncio.open_connection(host, int(port))
            asking = asyncio.create_task(ask(client_reader, upstream_writer))
            try:
                await answer(upstream_reader, client_writer)
            except ConnectionError:
                pass
            finally:
                asking.cancel()
                upstream_writer.close()

        async def serve():
            server = await asyncio.start_server(handle, "127.0.0.1", 0)
            self._box.update(loop=asyncio.get_running_loop(), stopped=asyncio.Event(),
                             port=server.sockets[0].getsockname()[1])
            ready.set()
            async with server:
                await self._box["stopped"].wait()

        self._thread = threading.Thread(target=lambda: asyncio.run(serve()), daemon=True)
        self._thread.start()
        assert ready.wait(10)
        self.url = f"http://127.0.0.1:{self._box['port']}"

    def close(self) -> None:
        self._box["loop"].call_soon_threadsafe(self._box["stopped"].set)
        self._thread.join(10)


def store_artifact(deployment, storage: Storage, team: str = "team-a", data: bytes = DATA) -> str:
    """A succeeded job of `team` whose adapter artifact holds `data`, as a worker leaves it."""
    job_id = succeeded_job(deployment, team, adapter=False)
    replace_artifact(deployment, storage, job_id, data)
    return job_id


def replace_artifact(deployment, storage: Storage, job_id: str, data: bytes) -> None:
    with session_scope(deployment.settings.database_url) as session:
        job = session.get(Job, job_id)
        with storage.writer(make_key(job.team_id, "artifacts")) as writer:
            writer.write(data)
            stored = writer.commit()
        session.query(Artifact).filter_by(job_id=job_id, kind="adapter").delete()
        session.add(Artifact(job_id=job_id, kind="adapter", storage_key=stored.key, bytes=stored.size,
                             sha256=stored.sha256))


def key_of(client: httpx.Client) -> str:
    return client.headers["authorization"].removeprefix("Bearer ")


@pytest.fixture(scope="module")
def local_artifact(deployment, local_api):  # noqa: F811 (local_api: the fixture imported above)
    client, storage = local_api
    return client, store_artifact(deployment, storage)


@pytest.fixture
def cli(team_a, tmp_path):
    """`qlora jobs download JOB --no-extract` into tmp_path/out, against a server URL: (done, its JSON)."""
    def download(url: str, job_id: str, *extra: str):
        env = clean_env(tmp_path / "home") | {"QLORA_URL": url, "QLORA_API_KEY": key_of(team_a)}
        done = qlora(env, "jobs", "download", job_id, "--out", str(tmp_path / "out"), "--no-extract", *extra)
        return done, (json.loads(done.stdout) if done.returncode == 0 and "--table" not in extra else None)

    return download


def parts(tmp_path) -> list:
    return sorted((tmp_path / "out").glob(".*.part"))


def cut_midway(cli, url: str, proxy: BreakingProxy, job_id: str, tmp_path) -> int:
    """A download from the API at `url` that breaks off at `proxy` (in front of the API, or of the store
    its links point at); returns how many bytes its part file kept."""
    proxy.cut_after = CUT_AFTER
    done, _ = cli(url, job_id)
    proxy.cut_after = None
    assert done.returncode == 1, done.stdout + done.stderr
    assert "broke off at byte" in done.stderr and "run the same command again to resume" in done.stderr, done.stderr
    [part] = parts(tmp_path)
    held = part.stat().st_size
    assert 0 < held < len(DATA) and part.read_bytes() == DATA[:held]
    assert not (tmp_path / "out" / f"{job_id}-adapter.tar").exists()
    return held


# ---------------------------------------------------------------- the API


def test_each_range_form_gets_its_bytes_with_206(local_artifact):
    client, job_id = local_artifact
    url = f"/jobs/{job_id}/artifacts/adapter"
    whole = client.get(url)
    assert whole.status_code == 200 and whole.content == DATA
    assert whole.headers["accept-ranges"] == "bytes" and whole.headers["etag"] == f'"{SHA256}"'
    assert whole.headers["content-length"] == str(len(DATA)) and whole.headers["x-checksum-sha256"] == SHA256
    size = len(DATA)
    for asked, first, last in [("bytes=0-0", 0, 0), ("bytes=10-1048586", 10, 1048586), ("bytes=2000000-", 2000000, size - 1),
                               ("bytes=-5000", size - 5000, size - 1), (f"bytes=100-{size * 10}", 100, size - 1),
                               (f"bytes=-{size + 1}", 0, size - 1), ("bytes=0-", 0, size - 1)]:
        part = client.get(url, headers={"Range": asked})
        assert part.status_code == 206, (asked, part.text[:200])
        assert part.content == DATA[first:last + 1], asked
        assert part.headers["content-range"] == f"bytes {first}-{last}/{size}"
        assert part.headers["content-length"] == str(last - first + 1)
        assert part.headers["etag"] == f'"{SHA256}"' and part.headers["accept-ranges"] == "bytes"
        assert part.headers["content-type"] == "application/x-tar"
        assert part.headers["content-disposition"].startswith("attachment;")


def test_if_range_resumes_only_the_same_file(local_artifact):
    client, job_id = local_artifact
    url = f"/jobs/{job_id}/artifacts/adapter"
    same = client.get(url, headers={"Range": "bytes=1000-", "If-Range": f'"{SHA256}"'})
    assert same.status_code == 206 and same.content == DATA[1000:]
    for other in (f'"{"0" * 64}"', f'W/"{SHA256}"', SHA256, "Wed, 21 Oct 2015 07:28:00 GMT"):
        whole = client.get(url, headers={"Range": "bytes=1000-", "If-Range": other})
        assert whole.status_code == 200 and whole.content == DATA, other
    # A mismatch wins over a range that would be unsatisfiable: the client holds other bytes.
    stale = client.get(url, headers={"Range": f"bytes={len(DATA)}-", "If-Range": '"other"'})
    assert stale.status_code == 200 and stale.content == DATA


def test_a_range_past_the_end_is_416_naming_the_size(local_artifact, team_a):
    client, job_id = local_artifact
    for asked in (f"bytes={len(DATA)}-", f"bytes={len(DATA) + 5}-{len(DATA) + 9}", "bytes=-0", "bytes=" + "9" * 5000 + "-"):
        refused = client.get(f"/jobs/{job_id}/artifacts/adapter", headers={"Range": asked})
        assert refused.status_code == 416, asked
        assert refused.headers["content-range"] == f"bytes */{len(DATA)}"
        error = refused.json()["error"]
        assert error["code"] == "range_not_satisfiable" and f"which has {len(DATA)} bytes" in error["message"]
        assert len(error["message"]) < 300  # a 5,000-digit header is not echoed whole


def test_malformed_and_multi_range_headers_get_the_whole_file(local_artifact):
    client, job_id = local_artifact
    for asked in ("bytes=5-2", "bytes=0-1,5-9", "bytes=0-1, -3", "items=0-9", "bytes=abc", "bytes=-", "bytes=--3",
                  "bytes=-1-2", "bytes=+1-2", "bytes=0x10-", "garbage", "bytes", "=0-1", "bytes=1.5-3"):
        whole = client.get(f"/jobs/{job_id}/artifacts/adapter", headers={"Range": asked})
        assert whole.status_code == 200 and whole.content == DATA, asked
        assert whole.headers["content-length"] == str(len(DATA))
        assert whole.headers["accept-ranges"] == "bytes"  # a client may still ask for one range


def test_no_range_header_ever_makes_a_5xx(local_artifact):
    """Hostile and random Range headers: each answer is 200 with the whole file, 206 with exactly the bytes
    its Content-Range names, or 416 in the error shape."""
    client, job_id = local_artifact
    size = len(DATA)
    rng = random.Random(0)
    pieces = ["", "0", "1", "-", ",", " ", "=", "bytes", "bytes=", str(size - 1), str(size), str(size + 1), "9" * 30,
              "9" * 5000, "-1", "00000000000000000000000000001", "18446744073709551616", "x", ";", "\t"]
    headers = ["bytes=" + ",".join(f"{i}-{i}" for i in range(500)), "bytes=-" + "0" * 5000, "bytes=0-" + "9" * 5000]
    headers += ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 6))) for _ in range(150)]
    headers += [f"bytes={rng.choice(pieces)}-{rng.choice(pieces)}" for _ in range(150)]
    seen = set()
    for asked in headers:
        answer = client.get(f"/jobs/{job_id}/artifacts/adapter", headers={"Range": asked.strip() or "bytes=0-"})
        assert answer.status_code in (200, 206, 416), (asked[:80], answer.status_code, answer.text[:200])
        seen.add(answer.status_code)
        if answer.status_code == 200:
            assert answer.content == DATA
        elif answer.status_code == 206:
            first, last = map(int, re.fullmatch(r"bytes (\d+)-(\d+)/\d+", answer.headers["content-range"]).groups())
            assert answer.content == DATA[first:last + 1] and 0 <= first <= last < size
        else:
            assert answer.json()["error"]["code"] == "range_not_satisfiable"
    assert seen == {200, 206, 416}  # the headers reached each kind of answer


def test_a_download_sent_with_the_etag_it_holds_is_304_without_its_bytes(local_artifact):
    """If-None-Match was ignored: a download manager or `curl --etag-compare` checking whether an artifact changed
    got all of it again (RFC 9110 13.2.2: the condition is evaluated, and before Range). Each download route
    answers 304 with its ETag and no bytes for the tag it sent, and the whole file for any other."""
    client, job_id = local_artifact
    rows = b'{"prompt": "a", "completion": "b"}\n'
    dataset = upload(client, content=rows).json()["id"]
    etag = f'"{SHA256}"'
    for url, tag, size in [(f"/jobs/{job_id}/artifacts/adapter", etag, len(DATA)),
                           (f"/datasets/{dataset}/content", f'"{hashlib.sha256(rows).hexdigest()}"', len(rows)),
                           (f"/v1/files/file-{dataset}/content", f'"{hashlib.sha256(rows).hexdigest()}"', len(rows))]:
        for held in (tag, f'"other", {tag}', f"W/{tag}", "*"):
            for method, headers in [("GET", {}), ("GET", {"Range": "bytes=0-9"}), ("HEAD", {})]:
                answer = client.request(method, url, headers={"If-None-Match": held, **headers})
                assert answer.status_code == 304 and answer.content == b"", (url, held, method, headers, answer.text[:200])
                assert answer.headers["etag"] == tag
        changed = client.get(url, headers={"If-None-Match": '"another-file"'})
        assert changed.status_code == 200 and len(changed.content) == size and changed.headers["etag"] == tag


def test_dataset_and_v1_file_content_are_ranged_too(local_api, team_b):  # noqa: F811
    client, _ = local_api
    rows = b"".join(json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}).encode() + b"\n" for i in range(200))
    dataset = upload(client, content=rows).json()
    assert dataset["status"] == "ready", dataset
    for url in (f"/datasets/{dataset['id']}/content", f"/v1/files/file-{dataset['id']}/content"):
        whole = client.get(url)
        assert whole.status_code == 200 and whole.content == rows and whole.headers["accept-ranges"] == "bytes"
        etag = whole.headers["etag"]
        assert etag == f'"{hashlib.sha256(rows).hexdigest()}"'
        part = client.get(url, headers={"Range": "bytes=100-199", "If-Range": etag})
        assert part.status_code == 206 and part.content == rows[100:200], url
        assert part.headers["content-range"] == f"bytes 100-199/{len(rows)}"
        tail = client.get(url, headers={"Range": "bytes=-10"})
        assert tail.status_code == 206 and tail.content == rows[-10:]
        refused = client.get(url, headers={"Range": f"bytes={len(rows)}-"})
        assert refused.status_code == 416 and refused.headers["content-range"] == f"bytes */{len(rows)}"
    native = client.get(f"/datasets/{dataset['id']}/content", headers={"Range": "bytes=99999-"}).json()["error"]
    openai = client.get(f"/v1/files/file-{dataset['id']}/content", headers={"Range": "bytes=99999-"}).json()["error"]
    assert native["code"] == "range_not_satisfiable" and openai["type"] == "invalid_request_error"

    # Another team's file answers 404 with a Range as without one.
    other = httpx.Client(base_url=client.base_url, headers=team_b.headers, timeout=60)
    for url in (f"/datasets/{dataset['id']}/content", f"/v1/files/file-{dataset['id']}/content"):
        for headers in ({"Range": "bytes=0-9"}, {"Range": "bytes=99999-"}, {}):
            assert other.get(url, headers=headers).status_code == 404, (url, headers)


def test_another_teams_artifact_is_404_with_a_range(local_artifact, team_b):
    client, job_id = local_artifact
    other = httpx.Client(base_url=client.base_url, headers=team_b.headers, timeout=60)
    for headers, owners_status in (({"Range": "bytes=0-9"}, 206), ({"Range": "bytes=99999999-"}, 416),
                                   ({"Range": "bytes=0-", "If-Range": f'"{SHA256}"'}, 206)):
        assert client.get(f"/jobs/{job_id}/artifacts/adapter", headers=headers).status_code == owners_status
        answer = other.get(f"/jobs/{job_id}/artifacts/adapter", headers=headers)
        assert answer.status_code == 404 and answer.json()["error"]["code"] == "not_found"


def test_head_answers_the_size_and_etag_of_every_download_without_its_bytes(deployment, local_artifact, local_api,  # noqa: F811
                                                                           team_a, team_b):
    """A download manager, or `curl -I`, asks HEAD for the size before it fetches: it answered 405. On S3 the
    keyed route answers HEAD itself, not with the presigned URL, which is signed for GET only."""
    client, job_id = local_artifact
    link = link_of(client, job_id)["url"]
    for url, http in ((f"/jobs/{job_id}/artifacts/adapter", client), (link, httpx.Client(timeout=60))):
        got = http.get(url, headers={"Range": "bytes=10-19"})
        head = http.head(url)
        assert head.status_code == 200 and head.content == b"", (url, head.status_code)
        assert head.headers["content-length"] == str(len(DATA)) and head.headers["etag"] == f'"{SHA256}"'
        assert head.headers["accept-ranges"] == "bytes" and "sft-adapter.tar" in head.headers["content-disposition"]
        ranged = http.head(url, headers={"Range": "bytes=10-19"})
        assert ranged.status_code == 206 and ranged.content == b""
        assert {k: ranged.headers[k] for k in ("content-range", "content-length", "etag")} == {
            k: got.headers[k] for k in ("content-range", "content-length", "etag")}
        assert http.head(url, headers={"Range": f"bytes={len(DATA)}-"}).status_code == 416
    other = httpx.Client(base_url=client.base_url, headers=team_b.headers, timeout=60)
    assert other.head(f"/jobs/{job_id}/artifacts/adapter").status_code == 404
    assert httpx.head(f"{client.base_url}/jobs/{job_id}/artifacts/adapter").status_code == 401

    rows = b'{"prompt": "q", "completion": "a"}\n' * 50
    dataset = upload(client, content=rows).json()
    for url in (f"/datasets/{dataset['id']}/content", f"/v1/files/file-{dataset['id']}/content"):
        head = client.head(url)
        assert head.status_code == 200 and head.headers["content-length"] == str(len(rows)) and head.content == b""
        assert other.head(url).status_code == 404

    s3_job = store_artifact(deployment, storage_from_settings(deployment.settings))
    head = team_a.head(f"/jobs/{s3_job}/artifacts/adapter")
    assert head.status_code == 200 and head.headers["content-length"] == str(len(DATA)), head.headers
    assert head.headers["x-checksum-sha256"] == SHA256


# ---------------------------------------------------------------- a browser's link, on local storage


def link_of(client: httpx.Client, job_id: str) -> dict:
    answer = client.get(f"/jobs/{job_id}/artifacts/adapter/link")
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_a_local_link_downloads_without_the_key_ranged_like_the_route(deployment, local_artifact):
    """A browser cannot send the key as it navigates to a download. On local storage the link route
    answered url null, and the dashboard fetched the archive with its key and saved it from the tab's
    memory (a 16 GB merged model took the tab down): the link is now the API's own signed route, as S3's
    is its presigned URL, and it answers as the keyed route does."""
    client, job_id = local_artifact
    link = link_of(client, job_id)
    assert link["url"].startswith(f"{client.base_url}/jobs/{job_id}/artifacts/adapter/signed?")
    assert (link["bytes"], link["sha256"], link["filename"]) == (len(DATA), SHA256, "sft-adapter.tar")
    anyone = httpx.Client(timeout=60)  # no Authorization header
    whole = anyone.get(link["url"])
    assert whole.status_code == 200 and whole.content == DATA, whole.text[:200]
    assert whole.headers["content-disposition"].startswith("attachment;") and "sft-adapter.tar" in whole.headers[
        "content-disposition"]
    assert whole.headers["etag"] == f'"{SHA256}"' and whole.headers["x-checksum-sha256"] == SHA256
    part = anyone.get(link["url"], headers={"Range": "bytes=1000-", "If-Range": f'"{SHA256}"'})
    assert part.status_code == 206 and part.content == DATA[1000:]

    # Whoever reads the API's access log must not be able to download with what it shows.
    signature = link["url"].rsplit("signature=", 1)[1]
    deadline = time.monotonic() + 30
    while "signature=[redacted]" not in deployment.log("api-local") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "signature=[redacted]" in deployment.log("api-local") and signature not in deployment.log("api-local")


def test_a_local_link_altered_expired_or_of_a_revoked_key_is_refused(deployment, local_api, local_artifact, team_b):  # noqa: F811
    from datetime import UTC, datetime

    from app.jobs.service import link_message
    from app.teams import service as teams
    from app.teams.tables import ApiKey

    client, job_id = local_artifact
    anyone = httpx.Client(timeout=60)
    url = httpx.URL(link_of(client, job_id)["url"])
    query = dict(url.params)

    def fetch(path: str = url.path, **changed: str) -> httpx.Response:
        return anyone.get(url.copy_with(path=path, params={**query, **changed}))

    assert fetch().status_code == 200
    other_job = store_artifact(deployment, local_api[1], data=b"another archive")
    # A signature outside ASCII ("é" typed or pasted into the query) was a 500: hmac.compare_digest refuses such a str.
    for answer in (fetch(signature="0" * 64), fetch(signature=""), fetch(signature="é" * 64), fetch(signature="\u2603"),
                   fetch(expires=str(int(query["expires"]) + 3600)),
                   fetch(key_id=query["key_id"] + "x"), fetch(key_id=""),
                   fetch(path=url.path.replace(job_id, other_job)),  # another job, the same team's
                   fetch(path=url.path.replace("/adapter/", "/merged/"))):
        assert answer.status_code == 403, answer.text
        assert answer.json()["error"]["code"] == "forbidden" and "not valid" in answer.json()["error"]["message"]
    for broken in ({"expires": "soon"}, {"expires": "9" * 400}):
        assert fetch(**broken).status_code in (403, 422)

    # Expired: signed by the key for a time gone by.
    with session_scope(deployment.settings.database_url) as session:
        key = session.get(ApiKey, query["key_id"])
        caller = teams.Caller(team_id=key.team_id, team_name="team-a", key_id=key.id, is_admin=False)
        past = int(datetime.now(UTC).timestamp()) - 1
        signature = teams.sign(session, caller, link_message(job_id, "adapter", past))
    expired = fetch(expires=str(past), signature=signature)
    assert expired.status_code == 403 and "expired" in expired.json()["error"]["message"], expired.text

    # Another team's key signs only its own team's jobs: its link route says 404, as every route does.
    assert team_b.get(f"/jobs/{job_id}/artifacts/adapter/link").status_code == 404

    # Revoking the key revokes the links it made.
    fresh = httpx.Client(base_url=client.base_url, headers={"Authorization": f"Bearer {deployment.team_key('team-a')}"},
                         timeout=60)
    revocable = link_of(fresh, job_id)["url"]
    assert anyone.get(revocable).status_code == 200
    with session_scope(deployment.settings.database_url) as session:
        teams.revoke_key(session, httpx.URL(revocable).params["key_id"])
    revoked = anyone.get(revocable)
    assert revoked.status_code == 403 and "revoked" in revoked.json()["error"]["message"]


def test_the_dashboard_saves_a_local_archive_through_its_link_not_the_tabs_memory(local_artifact, browser):
    client, job_id = local_artifact
    context = browser.new_context(base_url=str(client.base_url), accept_downloads=True)
    try:
        page = context.new_page()
        page.set_default_timeout(20_000)
        page.goto("/")
        page.get_by_label("API key").fill(key_of(client))
        page.get_by_role("button", name="Sign in").click()
        expect(page.get_by_role("heading", name="Jobs", exact=True)).to_be_visible()
        page.goto(f"/#/jobs/{job_id}")
        with page.expect_download() as download_info:
            page.get_by_role("button", name=re.compile("^Download adapter")).click()
        download = download_info.value
        assert download.failure() is None
        assert download.url.startswith(f"{client.base_url}/jobs/{job_id}/artifacts/adapter/signed?")  # not blob:
        assert download.suggested_filename == "sft-adapter.tar"
        assert hashlib.sha256(open(download.path(), "rb").read()).hexdigest() == SHA256
    finally:
        context.close()


# ---------------------------------------------------------------- the CLI


@pytest.fixture
def local_proxy(local_api):  # noqa: F811
    proxy = BreakingProxy(str(local_api[0].base_url))
    yield proxy
    proxy.close()


def test_cli_resumes_a_download_cut_midway_on_local_storage(local_artifact, local_proxy, cli, tmp_path):
    _, job_id = local_artifact
    held = cut_midway(cli, local_proxy.url, local_proxy, job_id, tmp_path)

    done, written = cli(local_proxy.url, job_id)
    assert done.returncode == 0, done.stderr
    assert written["resumed_from"] == held and written["sha256"] == SHA256 and written["bytes"] == len(DATA)
    assert f"resuming an interrupted download at byte {held:,} of {len(DATA):,}" in done.stderr
    assert (tmp_path / "out" / f"{job_id}-adapter.tar").read_bytes() == DATA
    assert parts(tmp_path) == []


def test_a_corrupted_part_ends_in_a_checksum_mismatch_that_deletes_it(local_artifact, local_proxy, cli, tmp_path):
    _, job_id = local_artifact
    held = cut_midway(cli, local_proxy.url, local_proxy, job_id, tmp_path)
    [part] = parts(tmp_path)
    with open(part, "r+b") as f:  # a bit flipped on disk
        f.seek(held // 2)
        byte = f.read(1)
        f.seek(held // 2)
        f.write(bytes([byte[0] ^ 1]))

    done, _ = cli(local_proxy.url, job_id)
    assert done.returncode == 1
    assert "checksum mismatch" in done.stderr and "part file has been deleted" in done.stderr
    assert f"continued an earlier download from byte {held:,}" in done.stderr
    assert parts(tmp_path) == [] and not (tmp_path / "out" / f"{job_id}-adapter.tar").exists()

    again, written = cli(local_proxy.url, job_id)  # what the message says to do
    assert again.returncode == 0 and written["resumed_from"] == 0
    assert (tmp_path / "out" / f"{job_id}-adapter.tar").read_bytes() == DATA


def test_a_server_that_sends_the_whole_file_makes_the_download_start_over(local_artifact, local_proxy, cli, tmp_path):
    _, job_id = local_artifact
    cut_midway(cli, local_proxy.url, local_proxy, job_id, tmp_path)
    local_proxy.strip_range = True  # the server never sees the Range: 200, the whole file
    done, written = cli(local_proxy.url, job_id)
    assert done.returncode == 0, done.stderr
    assert written["resumed_from"] == 0 and (tmp_path / "out" / f"{job_id}-adapter.tar").read_bytes() == DATA
    assert parts(tmp_path) == []


def test_a_part_of_an_artifact_since_replaced_is_not_continued(deployment, local_api, local_proxy, cli, tmp_path):  # noqa: F811
    client, storage = local_api
    job_id = store_artifact(deployment, storage)
    cut_midway(cli, local_proxy.url, local_proxy, job_id, tmp_path)
    newer = DATA[::-1]  # the same size, other bytes: a length alone would resume it
    replace_artifact(deployment, storage, job_id, newer)
    done, written = cli(local_proxy.url, job_id)
    assert done.returncode == 0, done.stderr
    assert written["resumed_from"] == 0 and written["sha256"] == hashlib.sha256(newer).hexdigest()
    assert (tmp_path / "out" / f"{job_id}-adapter.tar").read_bytes() == newer
    assert parts(tmp_path) == []  # the old part was deleted, not left behind


def test_a_second_download_of_the_same_artifact_at_once_stops_saying_so(local_artifact, local_proxy, cli, tmp_path):
    _, job_id = local_artifact
    held = cut_midway(cli, local_proxy.url, local_proxy, job_id, tmp_path)
    [part] = parts(tmp_path)
    with open(part, "rb") as other:  # what a running download holds
        fcntl.flock(other, fcntl.LOCK_EX)
        done, _ = cli(local_proxy.url, job_id)
        assert done.returncode == 1 and f"another download of {job_id}-adapter.tar is running" in done.stderr
        assert part.read_bytes() == DATA[:held]  # untouched
    done, written = cli(local_proxy.url, job_id)
    assert done.returncode == 0 and written["resumed_from"] == held


@pytest.fixture(scope="module")
def s3_api(deployment):
    """A second API process on the deployment's database and S3 store, whose presigned links point at a
    proxy in front of the store (QLORA_S3_PUBLIC_ENDPOINT_URL): the storage leg of a download can break."""
    proxy = BreakingProxy(deployment.settings.s3_endpoint_url)
    port = services.free_port()
    proc = deployment.spawn("serve", "--no-worker", log_name="api-s3-proxied", extra_env={
        "QLORA_PORT": str(port), "QLORA_S3_PUBLIC_ENDPOINT_URL": proxy.url, "QLORA_REAPER_INTERVAL_S": "0"})
    url = f"http://127.0.0.1:{port}"
    assert services.wait_until_up(url + "/health", proc, need_ok=True), deployment.log("api-s3-proxied")
    yield url, proxy
    deployment.stop(proc)
    proxy.close()


def test_cli_resumes_through_the_presigned_redirect_on_s3(deployment, s3_api, team_a, cli, tmp_path):
    url, proxy = s3_api
    job_id = store_artifact(deployment, storage_from_settings(deployment.settings))
    api = httpx.Client(base_url=url, headers=team_a.headers, timeout=60)
    redirect = api.get(f"/jobs/{job_id}/artifacts/adapter", headers={"Range": "bytes=99999999-"})
    assert redirect.status_code == 307 and redirect.headers["location"].startswith(proxy.url)  # S3 answers the range
    # The presigned link takes a Range it did not sign.
    ranged = httpx.get(redirect.headers["location"], headers={"Range": "bytes=100-199"})
    assert ranged.status_code == 206 and ranged.content == DATA[100:200]

    held = cut_midway(cli, url, proxy, job_id, tmp_path)  # the storage leg breaks off
    done, _ = cli(url, job_id, "--table")  # a person's view
    assert done.returncode == 0, done.stderr
    archive = tmp_path / "out" / f"{job_id}-adapter.tar"
    assert f"{archive}: sha256 verified (resumed from byte {held:,})" in done.stdout.replace("\n", "")
    assert archive.read_bytes() == DATA and parts(tmp_path) == []

