"""Idempotency-Key on the creations (app/idempotency/): a job creation or an upload sent again with the
same key answers with what the first made, through the native API, the openai SDK and the CLI's
client, and under a race of two API processes; another request, a bad key, another team or an old key
do not."""

from __future__ import annotations

import asyncio
import threading
import uuid
from datetime import timedelta

import pytest
from openai import OpenAI
from sqlalchemy import func, select, update

from app.cli.api_client import ApiClient
from app.config import Settings
from app.datasets.tables import Dataset
from app.db import session_scope, sessionmaker_for, utcnow
from app.idempotency import service as idempotency
from app.idempotency.tables import IdempotencyKey
from app.jobs import service as jobs_service
from app.jobs.tables import Job
from app.models.tables import RegisteredModel
from app.teams.service import Caller, create_key, create_team
from tests.deployment import lane, upload, wait_for_a_lock_wait
from tests.model_configs import LLAMA3_8B
from tests.service.test_bad_input import stored_state
from worker.training.tiny import demo_spec

REPLAYED = idempotency.REPLAYED_HEADER


@pytest.fixture(scope="module")
def dataset(team_a, demo_data) -> str:
    return upload(team_a, demo_data["validation"]).json()["id"]


def body(dataset_id: str, **fields) -> dict:
    spec = demo_spec("tiny")
    spec["training"]["max_steps"] = 5
    return {**spec, "dataset_id": dataset_id, "gpu_class": lane("nobody-listens"), **fields}


def create(client, payload: dict, key: str | None):
    return client.post("/jobs", json=payload, headers={"Idempotency-Key": key.encode()} if key is not None else {})


def job_count(deployment) -> int:
    with session_scope(deployment.settings.database_url) as session:
        return session.scalar(select(func.count()).select_from(Job))


def test_the_same_key_sent_again_answers_with_the_job_it_made_and_makes_no_other(deployment, team_a, dataset):
    key, payload = str(uuid.uuid4()), body(dataset, name="once")
    first = create(team_a, payload, key)
    assert first.status_code == 201 and REPLAYED not in first.headers
    before = job_count(deployment)
    again = create(team_a, payload, key)
    assert again.status_code == 201 and again.headers[REPLAYED] == "true"
    assert again.json()["id"] == first.json()["id"]
    assert job_count(deployment) == before
    # The body's keys in another order are the same request.
    reordered = dict(reversed(list(payload.items())))
    assert create(team_a, reordered, key).json()["id"] == first.json()["id"]
    # Without a key, the same body is a new job, as before.
    assert create(team_a, payload, None).json()["id"] != first.json()["id"]


def test_a_whole_number_written_otherwise_when_sent_again_is_the_same_request(deployment, team_a, dataset):
    """`"max_steps": 5` sent again as `5.0` (the same JSON value; a client's JSON writer decides) was 422
    idempotency_key_reused; it answers with the job the first made (tests/fast/test_idempotency_requests.py)."""
    key, payload = str(uuid.uuid4()), body(dataset, name="five")
    first = create(team_a, payload, key)
    assert first.status_code == 201, first.text
    payload["training"]["max_steps"] = 5.0
    again = create(team_a, payload, key)
    assert again.status_code == 201 and again.headers[REPLAYED] == "true", again.text
    assert again.json()["id"] == first.json()["id"]


def test_a_key_sent_with_another_body_is_refused_naming_the_job_it_made(deployment, team_a, dataset):
    key = str(uuid.uuid4())
    made = create(team_a, body(dataset, name="first"), key).json()["id"]
    before = job_count(deployment)
    refused = create(team_a, body(dataset, name="second"), key)
    assert refused.status_code == 422
    error = refused.json()["error"]
    assert error["code"] == "idempotency_key_reused" and made in error["message"]
    assert error["details"][0]["field"] == "Idempotency-Key"
    assert job_count(deployment) == before


@pytest.mark.parametrize("key", ["", "two words", "naïve", "x" * 256, "tab\there"])
def test_a_bad_key_is_refused_and_nothing_is_made(deployment, team_a, dataset, key):
    before = job_count(deployment)
    refused = create(team_a, body(dataset), key)
    assert refused.status_code == 422, refused.text
    assert refused.json()["error"]["code"] == "invalid_idempotency_key"
    assert "1 to 255 visible ASCII characters" in refused.json()["error"]["message"]
    assert job_count(deployment) == before


def test_two_keys_in_one_request_are_refused_and_nothing_is_made(deployment, team_a, dataset):
    """`Idempotency-Key: a` and `Idempotency-Key: b` (a script appending its key to headers that held one):
    the API took the first and made a job, while a proxy in front may read the last; now refused, as two
    Authorization headers are, for a job and for an upload (before its body is read)."""
    two = [("Idempotency-Key", str(uuid.uuid4())), ("Idempotency-Key", str(uuid.uuid4()))]
    before, stored = job_count(deployment), stored_state(deployment)
    for status, refused in ((422, team_a.post("/jobs", json=body(dataset), headers=two)),
                            (422, team_a.post("/datasets", files={"file": ("data.jsonl", CHAT, "application/jsonl")},
                                              headers=two)),
                            (400, team_a.post("/v1/files", files={"file": ("data.jsonl", CHAT, "application/jsonl")},
                                              data={"purpose": "fine-tune"}, headers=two))):  # 400: OpenAI's shape
        assert refused.status_code == status, refused.text
        error = refused.json()["error"]
        assert error["code"] == "invalid_idempotency_key" and "2 Idempotency-Key headers" in error["message"], error
    assert (job_count(deployment), stored_state(deployment)) == (before, stored)
    # One of them alone makes the job, as ever.
    assert team_a.post("/jobs", json=body(dataset), headers=[two[0]]).status_code == 201


def test_a_creation_that_failed_binds_nothing_and_the_key_makes_the_job_when_sent_right(deployment, team_a, dataset):
    key = str(uuid.uuid4())
    refused = create(team_a, body(dataset, training={"max_steps": -1}), key)
    assert refused.status_code == 422 and refused.json()["error"]["code"] == "invalid_job"
    made = create(team_a, body(dataset), key)
    assert made.status_code == 201 and REPLAYED not in made.headers


def test_a_key_is_the_teams_own_and_its_endpoints_own(deployment, team_a, team_b, dataset):
    key, payload = str(uuid.uuid4()), body(dataset)
    mine = create(team_a, payload, key).json()["id"]
    theirs = create(team_b, body(upload(team_b, content=b'{"prompt": "a", "completion": "b"}\n').json()["id"]), key)
    assert theirs.status_code == 201 and REPLAYED not in theirs.headers and theirs.json()["id"] != mine
    # Team b's own dataset under a's key: nothing of a's is read or named.
    assert mine not in theirs.text
    # The OpenAI-compatible endpoint with the same key is another request, and makes its own job.
    sdk = OpenAI(base_url=deployment.url + "/v1", api_key=team_a.headers["Authorization"].split()[1], max_retries=0)
    extra = {"training": {"max_steps": 5}, "gpu_class": lane("nobody-listens")}
    first = sdk.fine_tuning.jobs.with_raw_response.create(model="tiny", training_file=f"file-{dataset}", extra_body=extra,
                                                          extra_headers={"Idempotency-Key": key})
    assert first.parse().id != f"ftjob-{mine}" and REPLAYED not in first.headers
    again = sdk.fine_tuning.jobs.with_raw_response.create(model="tiny", training_file=f"file-{dataset}", extra_body=extra,
                                                          extra_headers={"Idempotency-Key": key})
    assert again.parse().id == first.parse().id and again.headers[REPLAYED] == "true"


def test_a_key_older_than_a_day_makes_a_new_job_and_names_it_from_then_on(deployment, team_a, dataset):
    key, payload = str(uuid.uuid4()), body(dataset)
    old = create(team_a, payload, key).json()["id"]
    with session_scope(deployment.settings.database_url) as session:
        session.execute(update(IdempotencyKey).where(IdempotencyKey.key == key)
                        .values(created_at=utcnow() - idempotency.KEPT - timedelta(minutes=1)))
    new = create(team_a, payload, key)
    assert new.status_code == 201 and REPLAYED not in new.headers and new.json()["id"] != old
    assert create(team_a, payload, key).json()["id"] == new.json()["id"]
    with session_scope(deployment.settings.database_url) as session:  # the old binding is gone, not kept beside
        assert session.scalars(select(IdempotencyKey.job_id).where(IdempotencyKey.key == key)).all() == [new.json()["id"]]


def test_the_cli_client_sends_a_creation_again_when_its_answer_is_lost_and_one_job_is_made(deployment, team_a, dataset):
    """A proxy in front of the API passes the first POST /jobs on, then drops the connection before the
    answer reaches the client; the client sends it again with the same key and is answered with that job."""
    key = team_a.headers["Authorization"].split()[1]
    served, proxy_url, stop = lossy_proxy(deployment.url)
    try:
        before = job_count(deployment)
        with ApiClient(proxy_url, key) as api:
            job = api.create_job(body(dataset, name="lost-answer"), backoff_s=0.05)
        assert served["connections"] == 2  # the answer was lost once, and the request sent again
        assert job_count(deployment) == before + 1
        assert job["name"] == "lost-answer"
    finally:
        stop()


def lossy_proxy(upstream: str):
    """A TCP proxy to `upstream` that drops its first connection's answer (after the API has read and
    answered the request) and passes every later connection through. Returns (connections served, url, stop)."""
    host, port = upstream.removeprefix("http://").split(":")
    ready, box, served = threading.Event(), {}, {"connections": 0}

    async def pipe(reader, writer):
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()

    async def handle(client_reader, client_writer):
        served["connections"] += 1
        first = served["connections"] == 1
        upstream_reader, upstream_writer = await asyncio.open_connection(host, int(port))
        to_api = asyncio.create_task(pipe(client_reader, upstream_writer))
        if first:  # wait for the API's whole answer, then cut the client off without it
            await upstream_reader.read(65536)
            client_writer.transport.abort()
            to_api.cancel()
            upstream_writer.close()
            return
        await pipe(upstream_reader, client_writer)
        to_api.cancel()

    async def serve():
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        box.update(loop=asyncio.get_running_loop(), stopped=asyncio.Event(), port=server.sockets[0].getsockname()[1])
        ready.set()
        async with server:
            await box["stopped"].wait()

    thread = threading.Thread(target=lambda: asyncio.run(serve()), daemon=True)
    thread.start()
    assert ready.wait(10)

    def stop():
        box["loop"].call_soon_threadsafe(box["stopped"].set)
        thread.join(10)

    return served, f"http://127.0.0.1:{box['port']}", stop


def test_two_creations_with_one_key_at_once_through_two_processes_make_one_job(database_url, tmp_path):
    """The early look finds nothing for either; the second then waits on the team's row, which the first
    holds until it commits, and finds the key bound when it gets it (MadeMeanwhile): one job for both."""
    settings = Settings(home=tmp_path, database_url=database_url, storage_url=f"file://{tmp_path / 'storage'}",
                        broker_url="").model_copy(update={"gpu_classes": {"l4": 24}})  # as tests/fast/test_job_create.py
    with session_scope(database_url) as session:
        team = create_team(session, "racers")
        key_row, _ = create_key(session, "racers")
        session.add(RegisteredModel(name="llama-3-8b", hub_id="meta-llama/Meta-Llama-3-8B", revision="main",
                                    config=LLAMA3_8B))
        dataset = Dataset(team_id=team.id, filename="t.jsonl", storage_key="k", bytes=1, sha256="0" * 64,
                          status="ready", format="chat", rows=1)
        session.add(dataset)
        session.flush()
        caller, dataset_id = Caller.of(team, key_row), dataset.id
    payload = {"dataset_id": dataset_id, "base_model": "llama-3-8b", "training": {"max_steps": 10}}
    keyed = idempotency.requested("race-1", "POST /jobs", payload)
    first_session, second_session = sessionmaker_for(database_url)(), sessionmaker_for(database_url)()
    try:
        first, replayed = jobs_service.create_once(first_session, settings, caller, payload, keyed)
        assert not replayed  # made, not committed: the team's row stays locked
        second: dict = {}
        racer = threading.Thread(target=lambda: second.update(
            answer=jobs_service.create_once(second_session, settings, caller, payload, keyed)))
        racer.start()
        wait_for_a_lock_wait(database_url, "the second creation, on the team's row,")
        first_session.commit()
        racer.join(30)
        job, replayed = second["answer"]
        assert (job.id, replayed) == (first.id, True)
        second_session.commit()
    finally:
        first_session.close()
        second_session.close()
    with session_scope(database_url) as session:
        assert session.scalar(select(func.count()).select_from(Job)) == 1



# ---------------------------------------------------------------- uploads


def upload_keyed(client, content: bytes, key: str, name: str = "data.jsonl"):
    return client.post("/datasets", files={"file": (name, content, "application/jsonl")},
                       headers={"Idempotency-Key": key.encode()})


CHAT = b'{"messages": [{"role": "user", "content": "What does a cow say?"}, {"role": "assistant", "content": "Moo."}]}\n'


def test_an_upload_sent_again_with_its_key_answers_with_the_dataset_and_keeps_no_second_copy(deployment, team_a):
    key = str(uuid.uuid4())
    first = upload_keyed(team_a, CHAT * 3, key)
    assert first.status_code == 201 and REPLAYED not in first.headers
    before = stored_state(deployment)
    again = upload_keyed(team_a, CHAT * 3, key)
    assert again.status_code == 201 and again.headers[REPLAYED] == "true"
    assert again.json()["id"] == first.json()["id"]
    assert stored_state(deployment) == before  # no row, no object, no pending part: the copy was dropped

    # Another file, or the same file under another name, with that key: refused, and nothing kept.
    for content, name in ((CHAT * 4, "data.jsonl"), (CHAT * 3, "other.jsonl")):
        refused = upload_keyed(team_a, content, key, name)
        assert refused.status_code == 422 and refused.json()["error"]["code"] == "idempotency_key_reused"
        assert first.json()["id"] in refused.json()["error"]["message"]
        assert stored_state(deployment) == before


def test_an_upload_with_a_bad_key_is_refused_before_its_body_and_nothing_is_kept(deployment, team_a):
    before = stored_state(deployment)
    refused = upload_keyed(team_a, CHAT, "two words")
    assert refused.status_code == 422 and refused.json()["error"]["code"] == "invalid_idempotency_key"
    assert stored_state(deployment) == before


def test_a_file_sent_again_through_the_openai_sdk_with_its_key_is_the_same_file(deployment, demo_data):
    sdk = OpenAI(base_url=deployment.url + "/v1", api_key=deployment.team_key("sdk-keys"), max_retries=0)
    key = {"Idempotency-Key": str(uuid.uuid4())}
    with open(demo_data["validation"], "rb") as f:
        first = sdk.files.with_raw_response.create(file=f, purpose="fine-tune", extra_headers=key)
    before = stored_state(deployment)
    with open(demo_data["validation"], "rb") as f:
        again = sdk.files.with_raw_response.create(file=f, purpose="fine-tune", extra_headers=key)
    assert again.parse().id == first.parse().id and again.headers[REPLAYED] == "true"
    assert REPLAYED not in first.headers
    assert stored_state(deployment) == before


def test_the_cli_client_sends_an_upload_again_when_its_answer_is_lost_and_one_dataset_is_kept(deployment, team_a,
                                                                                             tmp_path):
    path = tmp_path / "lost.jsonl"
    path.write_bytes(CHAT * 5)
    key = team_a.headers["Authorization"].split()[1]
    served, proxy_url, stop = lossy_proxy(deployment.url)
    moved: list[int] = []
    restarts: list[int] = []
    try:
        datasets_before = stored_state(deployment)[0]
        with ApiClient(proxy_url, key) as api:
            dataset = api.upload_dataset(path, on_progress=moved.append, backoff_s=0.05,
                                         on_restart=lambda: restarts.append(sum(moved)) or moved.clear())
        assert served["connections"] == 2  # the answer was lost once, and the file sent again
        assert stored_state(deployment)[0] == datasets_before + 1
        assert dataset["rows"] == 5 and dataset["status"] == "ready"
        # The bar started over for the second try, told so rather than moved backwards (a negative speed).
        assert restarts == [path.stat().st_size] and sum(moved) == path.stat().st_size
    finally:
        stop()
