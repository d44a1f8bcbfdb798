"""`qlora admin sweep-storage` against S3 over HTTP (moto server) and Postgres: stray objects made for real
(tests/stray_objects.py) beside referenced ones and other files in the bucket, in and out of the
service's prefix. S3 dates objects itself (no way to age one), so the age rule is tested with a real
wait of a few seconds at the service level, and the command with --older-than 0 --force (and 1h, which
leaves every object here alone)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from app.datasets.tables import Dataset
from app.db import FAULT_CLOCK_SKEW, engine_for, session_scope, sessionmaker_for
from app.operations import storage_sweep as sweeping
from app.storage import make_key
from app.storage.s3 import S3Storage
from tests import services
from tests.deployment import ROOT
from tests.storage.test_storage import s3_bucket, s3_endpoint, s3_inspect  # noqa: F401 (fixtures)
from tests.stray_objects import build, store

PREFIX = "objects"


def postgres_database() -> str:
    services.ensure_postgres()
    return services.create_migrated_postgres_database()


@pytest.fixture
def database_url():
    url = postgres_database()
    yield url
    engine_for(url).dispose()
    services.drop_postgres_database(url)


@pytest.fixture
def storage(s3_endpoint, s3_bucket) -> S3Storage:  # noqa: F811
    return S3Storage(s3_bucket, PREFIX, endpoint_url=s3_endpoint, region="us-east-1")


@pytest.fixture
def outside(s3_inspect, s3_bucket) -> list[str]:  # noqa: F811
    """Files of others in the same bucket, outside the service's prefix: even of its form, never its own."""
    keys = ["README.txt", f"other-app/{uuid.uuid4().hex}/datasets/{uuid.uuid4().hex}",
            f"{PREFIX}-old/{uuid.uuid4().hex}/datasets/{uuid.uuid4().hex}"]
    for key in keys:
        s3_inspect.put_object(Bucket=s3_bucket, Key=key, Body=b"not the service's")
    return keys


def in_bucket(s3_inspect, bucket: str) -> set[str]:  # noqa: F811
    paginator = s3_inspect.get_paginator("list_objects_v2")
    return {o["Key"] for page in paginator.paginate(Bucket=bucket) for o in page.get("Contents", [])}


def inside(keys: list[str]) -> set[str]:
    return {f"{PREFIX}/{key}" for key in keys}


def test_the_sweep_finds_and_deletes_exactly_the_strays_and_keeps_what_a_row_claims_meanwhile(
        database_url, storage, outside, s3_inspect, s3_bucket):  # noqa: F811
    with sessionmaker_for(database_url)() as session:
        scene = build(session, storage)
    time.sleep(2.5)  # the scene's objects are now at least 2 s old, as S3 dates them
    # The sweep's "now" is taken before the young object is stored, so it is young however long the machine
    # takes between the upload and the listing (with the listing's own now, a second's delay made it a stray).
    # It is the store's clock, in whole seconds as S3's LastModified: the scene's objects are 2 s old on it.
    as_of = storage.now()
    just_uploaded = store(storage, make_key(scene.team_id, "datasets")).key

    with session_scope(database_url) as session:
        sweep = sweeping.find_strays(session, storage, older_than_s=1, now=as_of)
    assert sorted(s.key for s in sweep.strays) == sorted(scene.strays + scene.young)
    assert (sweep.stored, sweep.referenced, sweep.young, sweep.foreign) == (11, 4, 1, len(scene.foreign))
    assert {s.key: s.bytes for s in sweep.strays}[scene.strays[1]] == 5000  # the checkpoint's size, as listed

    claimed = scene.strays[0]  # recorded after the listing, before the delete: it must stay
    with session_scope(database_url) as other:
        other.add(Dataset(team_id=scene.team_id, filename="late.jsonl", storage_key=claimed, bytes=1, sha256="0" * 64,
                          status="ready", format="chat", rows=1))
    with session_scope(database_url) as session:
        done = sweeping.delete_strays(session, storage, sweep)

    assert [s.key for s in done.kept] == [claimed] and done.failed is None
    assert sorted(s.key for s in done.deleted) == sorted(scene.strays[1:] + scene.young)
    assert in_bucket(s3_inspect, s3_bucket) == (
        inside(scene.referenced + scene.foreign + [claimed, just_uploaded]) | set(outside))


def test_an_empty_database_refuses_to_delete_unless_forced(database_url, storage, outside, s3_inspect, s3_bucket):  # noqa: F811
    with sessionmaker_for(database_url)() as session:
        scene = build(session, storage)
    empty = postgres_database()  # another deployment's, or one not restored yet
    try:
        with session_scope(empty) as session:
            sweep = sweeping.find_strays(session, storage, older_than_s=0)
            assert sweeping.database_looks_wrong(sweep) and len(sweep.strays) == 10
            with pytest.raises(sweeping.DatabaseLooksWrong, match="QLORA_DATABASE_URL"):
                sweeping.delete_strays(session, storage, sweep)
        assert in_bucket(s3_inspect, s3_bucket) == inside(scene.strays + scene.referenced + scene.young + scene.foreign) \
            | set(outside)
        with session_scope(empty) as session:
            assert len(sweeping.delete_strays(session, storage, sweep, force=True).deleted) == 10
        assert in_bucket(s3_inspect, s3_bucket) == inside(scene.foreign) | set(outside)
    finally:
        engine_for(empty).dispose()
        services.drop_postgres_database(empty)


def test_the_command_on_s3_and_postgres(tmp_path, database_url, storage, outside, s3_endpoint, s3_bucket, s3_inspect):  # noqa: F811
    with sessionmaker_for(database_url)() as session:
        scene = build(session, storage)
    env = {k: v for k, v in os.environ.items() if not k.startswith("QLORA_")} | services.s3_env(s3_endpoint) | {
        "QLORA_HOME": str(tmp_path), "QLORA_DATABASE_URL": database_url, "QLORA_STORAGE_URL": f"s3://{s3_bucket}/{PREFIX}"}

    def qlora(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "app.cli", "admin", "sweep-storage", *args], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)

    hour = qlora("--older-than", "1h")
    assert hour.returncode == 0, hour.stderr
    assert json.loads(hour.stdout)["strays"] == [] and json.loads(hour.stdout)["storage"]["young"] == 6

    listed = qlora("--older-than", "0", "--force")
    assert listed.returncode == 0, listed.stderr
    answer = json.loads(listed.stdout)
    assert sorted(s["key"] for s in answer["strays"]) == sorted(scene.strays + scene.young)
    assert answer["storage"] == {"objects": 10, "referenced": 4, "young": 0, "foreign": len(scene.foreign)}
    assert answer["deleted"] is None and len(in_bucket(s3_inspect, s3_bucket)) == 10 + len(scene.foreign) + 3

    deleted = qlora("--older-than", "0", "--force", "--delete")
    assert deleted.returncode == 0, deleted.stderr
    assert json.loads(deleted.stdout)["deleted"]["count"] == 6
    assert in_bucket(s3_inspect, s3_bucket) == inside(scene.referenced + scene.foreign) | set(outside)


def test_the_command_on_a_host_whose_clock_runs_ahead_keeps_what_was_uploaded_a_moment_ago(
        tmp_path, database_url, storage, s3_endpoint, s3_bucket, s3_inspect):  # noqa: F811
    """S3 dates its objects on its own clock (LastModified), and the sweep reads their ages on it (the Date of the
    store's answer): on the operator's host's clock two days ahead, every stray uploaded a moment ago (a checkpoint
    whose row was about to be committed) looked two days old, and `--older-than 1h --delete` deleted it."""
    with sessionmaker_for(database_url)() as session:
        scene = build(session, storage)
    env = {k: v for k, v in os.environ.items() if not k.startswith("QLORA_")} | services.s3_env(s3_endpoint) | {
        "QLORA_HOME": str(tmp_path), "QLORA_DATABASE_URL": database_url, "QLORA_STORAGE_URL": f"s3://{s3_bucket}/{PREFIX}",
        FAULT_CLOCK_SKEW: str(2 * 86400)}

    swept = subprocess.run([sys.executable, "-m", "app.cli", "admin", "sweep-storage", "--older-than", "1h", "--delete"],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)

    assert swept.returncode == 0, swept.stderr
    answer = json.loads(swept.stdout)
    assert answer["deleted"]["count"] == 0 and answer["storage"]["young"] == 6, answer
    assert in_bucket(s3_inspect, s3_bucket) >= inside(scene.strays + scene.young + scene.referenced)


def test_listing_goes_past_a_page_of_a_thousand(storage, s3_inspect, s3_bucket):  # noqa: F811
    """ListObjectsV2 answers 1,000 keys a page: the rest must be read too."""
    team = uuid.uuid4().hex
    keys = [make_key(team, "checkpoints") for _ in range(1003)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda key: s3_inspect.put_object(Bucket=s3_bucket, Key=f"{PREFIX}/{key}", Body=b"x"), keys))
    listed = list(storage.list_objects())
    assert sorted(o.key for o in listed) == sorted(keys) and {o.size for o in listed} == {1}


def test_a_delete_storage_refuses_stops_the_sweep_and_says_where(database_url, s3_endpoint, s3_bucket, s3_inspect):  # noqa: F811
    """S3 answering 503 to deletes (past boto's retries): the sweep stops at the first, reports it with what
    it had deleted, and a later sweep finds the same strays."""
    from tests.faults.throttle import ThrottlingProxy

    proxy = ThrottlingProxy(s3_endpoint)
    try:
        storage = S3Storage(s3_bucket, PREFIX, endpoint_url=proxy.url, region="us-east-1")
        with sessionmaker_for(database_url)() as session:
            scene = build(session, storage)
        with session_scope(database_url) as session:
            sweep = sweeping.find_strays(session, storage, older_than_s=0)
        proxy.refuse("DELETE", f"/{PREFIX}/", times=1000)
        with session_scope(database_url) as session:
            done = sweeping.delete_strays(session, storage, sweep)
            answer = sweeping.report(session, sweep, done)
        assert done.deleted == [] and done.failed is not None and done.failed[0] == sweep.strays[0]
        assert answer["deleted"]["failed"]["key"] == sweep.strays[0].key and "ServiceUnavailable" in answer["deleted"]["failed"]["error"]
        proxy.clear()
        with session_scope(database_url) as session:
            again = sweeping.find_strays(session, storage, older_than_s=0)
        assert sorted(s.key for s in again.strays) == sorted(scene.strays + scene.young)
    finally:
        proxy.close()
