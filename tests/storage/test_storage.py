"""One set of behaviours, run against a local directory and against S3 over HTTP (moto server)."""

from __future__ import annotations

import hashlib
import os
import random
import re
import tracemalloc
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import boto3
import pytest
from botocore.config import Config

from app.config import Settings
from app.storage import (
    ChecksumMismatch,
    LocalStorage,
    ObjectNotFound,
    Storage,
    StoredObject,
    make_key,
    storage_from_settings,
)
from app.storage.local import TMP_DIR
from app.storage.s3 import MAX_PART_SIZE, MAX_PARTS, PART_SIZE, PLANNED_PARTS, S3Storage, part_size_for
from tests.full_disk import file_size_limit
from tests.services import create_bucket, s3_env, start_s3_server
from worker.training.protocol import out_of_space

MIB = 1 << 20
KEY = "team-a/datasets/0123abcd"


@dataclass
class Backend:
    name: str
    storage: Storage
    # Everything the backend still holds: objects, temp files, pending multipart uploads.
    leftovers: Callable[[], list[str]]


@pytest.fixture(scope="module")
def s3_endpoint():
    endpoint_url, stop = start_s3_server()
    yield endpoint_url
    stop()


@pytest.fixture
def s3_bucket(s3_endpoint, monkeypatch):
    for name, value in s3_env(s3_endpoint).items():
        monkeypatch.setenv(name, value)
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    create_bucket(s3_endpoint, bucket)
    return bucket


@pytest.fixture
def s3_inspect(s3_endpoint, s3_bucket):
    """A plain boto3 client, independent of the code under test, to look inside the bucket."""
    return boto3.client("s3", endpoint_url=s3_endpoint, config=Config(s3={"addressing_style": "path"}))


@pytest.fixture(params=["local", "s3"])
def backend(request, tmp_path) -> Backend:
    if request.param == "local":
        root = tmp_path / "store"
        storage = LocalStorage(root)

        def leftovers() -> list[str]:
            return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())

        return Backend("local", storage, leftovers)

    endpoint = request.getfixturevalue("s3_endpoint")
    bucket = request.getfixturevalue("s3_bucket")
    inspect = request.getfixturevalue("s3_inspect")
    storage = S3Storage(bucket, "objects", endpoint_url=endpoint, region="us-east-1")

    def leftovers() -> list[str]:
        objects = [o["Key"] for o in inspect.list_objects_v2(Bucket=bucket).get("Contents", [])]
        uploads = inspect.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
        return sorted(objects) + [f"pending upload of {u['Key']}" for u in uploads]

    return Backend("s3", storage, leftovers)


def chunks(total: int, size: int, seed: int = 0):
    rng = random.Random(seed)
    for start in range(0, total, size):
        yield rng.randbytes(min(size, total - start))


def read_all(storage: Storage, key: str) -> bytes:
    return b"".join(storage.open(key))


def test_round_trip_reports_sha256_and_size(backend, tmp_path):
    storage = backend.storage
    data = os.urandom(300_000)
    writer = storage.writer(KEY)
    for piece in (data[:1], data[1:100_000], data[100_000:]):
        writer.write(piece)
    assert writer.size == len(data)
    assert not storage.exists(KEY), "an object must not be visible before commit"

    stored = writer.commit()

    assert stored == StoredObject(KEY, len(data), hashlib.sha256(data).hexdigest())
    assert storage.exists(KEY)
    assert storage.size(KEY) == len(data)
    assert read_all(storage, KEY) == data
    assert all(len(c) <= 4096 for c in storage.open(KEY, chunk_size=4096))
    dest = tmp_path / "out" / "copy.bin"
    storage.download(KEY, dest, expected_sha256=stored.sha256)
    assert dest.read_bytes() == data


def test_empty_object(backend):
    stored = backend.storage.writer(KEY).commit()
    assert stored == StoredObject(KEY, 0, hashlib.sha256(b"").hexdigest())
    assert read_all(backend.storage, KEY) == b""


def test_a_read_from_an_offset_gets_exactly_those_bytes(backend):
    """What a resumed download asks of storage: `length` bytes from `start`, across chunk boundaries,
    clipped at the end, nothing past it."""
    storage = backend.storage
    data = os.urandom(3 * MIB + 17)
    with storage.writer(KEY) as writer:
        writer.write(data)
        writer.commit()
    size = len(data)
    for start, length in [(0, None), (5, None), (5, 10), (MIB - 1, 2), (size - 1, None), (100, 10 * size),
                          (size, None), (size + 100, 5), (0, 0), (MIB, 0)]:
        got = b"".join(storage.open(KEY, start=start, length=length))
        assert got == data[start:None if length is None else start + length], (start, length)
    pieces = list(storage.open(KEY, start=7, length=10_000, chunk_size=4096))
    assert b"".join(pieces) == data[7:10_007] and all(len(p) <= 4096 for p in pieces)
    for start, length in [(-1, None), (0, -1)]:
        with pytest.raises(ValueError):
            storage.open(KEY, start=start, length=length)
    for start, length in [(10, None), (0, 0)]:
        with pytest.raises(ObjectNotFound):
            storage.open("team-a/datasets/missing", start=start, length=length)

    empty = storage.writer(KEY + "-empty").commit()
    assert b"".join(storage.open(empty.key, start=0, length=1)) == b""


def test_large_object_streams_in_bounded_memory(backend):
    total = 20 * MIB
    expected = hashlib.sha256()
    writer = backend.storage.writer(KEY)
    tracemalloc.start()
    try:
        for piece in chunks(total, 64 * 1024):
            expected.update(piece)
            writer.write(piece)
        assert not backend.storage.exists(KEY), "an object must not be visible before commit"
        stored = writer.commit()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    # Holding the whole object would peak above 20 MiB; streaming holds at most one part.
    assert peak < PART_SIZE + 2 * MIB, f"peak Python memory {peak / MIB:.1f} MiB while writing 20 MiB"
    assert stored.size == total and stored.sha256 == expected.hexdigest()
    assert backend.storage.size(KEY) == total
    got = hashlib.sha256()
    for chunk in backend.storage.open(KEY):
        got.update(chunk)
    assert got.hexdigest() == expected.hexdigest()
    # Exactly the object: no temp file, no pending multipart upload.
    assert len(backend.leftovers()) == 1


def test_s3_large_object_goes_multipart(s3_endpoint, s3_bucket, s3_inspect):
    storage = S3Storage(s3_bucket, "objects", endpoint_url=s3_endpoint)
    writer = storage.writer(KEY)
    for piece in chunks(20 * MIB, 64 * 1024):
        writer.write(piece)
    assert len(s3_inspect.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", [])) == 1
    writer.commit()

    assert s3_inspect.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []
    head = s3_inspect.head_object(Bucket=s3_bucket, Key=f"objects/{KEY}")
    assert head["ContentLength"] == 20 * MIB
    assert head["ETag"].endswith('-3"'), "8 + 8 + 4 MiB parts"


def test_s3_an_uploads_parts_are_of_one_size_that_fits_the_largest_merged_model_in_the_stores_part_limit():
    """S3 and MinIO take 10,000 parts of at most 5 GiB, R2 only parts of one size. Of 8 MiB each they ended at
    78 GiB: the 130 GB of a 65B model merged in bfloat16 (the streaming merge writes it) was refused at part 10,001,
    after the whole run, and the job failed. An upload's one part size comes from the size it expects."""
    assert part_size_for(None) == part_size_for(MIB) == part_size_for(PLANNED_PARTS * PART_SIZE) == PART_SIZE
    merged_70b = 140 * 10**9
    size = part_size_for(merged_70b)
    assert size % MIB == 0 and size * PLANNED_PARTS >= merged_70b and size <= 16 * MIB  # held in memory, one at a time
    assert size * MAX_PARTS >= 1.1 * merged_70b  # room for what a tar adds
    assert part_size_for(50 << 40) == MAX_PART_SIZE


def test_s3_an_upload_expected_larger_goes_up_in_parts_of_one_larger_size(s3_endpoint, s3_bucket, s3_inspect, tmp_path):
    # Planned over 4 parts here (9,000 by default): 30 MiB expected, 8 MiB parts, 8 + 8 + 8 + 6 written.
    storage = S3Storage(s3_bucket, "objects", endpoint_url=s3_endpoint, part_size=5 * MIB, planned_parts=4)
    expected = hashlib.sha256()
    with storage.writer(KEY, expected_size=30 * MIB) as writer:
        for piece in chunks(30 * MIB, MIB):
            writer.write(piece)
            expected.update(piece)
        stored = writer.commit()
    head = s3_inspect.head_object(Bucket=s3_bucket, Key=f"objects/{KEY}")
    assert head["ContentLength"] == 30 * MIB and head["ETag"].endswith('-4"'), head["ETag"]
    first = s3_inspect.head_object(Bucket=s3_bucket, Key=f"objects/{KEY}", PartNumber=1)
    assert first["ContentLength"] == 8 * MIB
    assert stored.sha256 == expected.hexdigest()
    storage.download(KEY, tmp_path / "back", expected_sha256=stored.sha256)  # checked against it as it lands


def test_s3_small_object_carries_sha256_metadata(s3_endpoint, s3_bucket, s3_inspect):
    storage = S3Storage(s3_bucket, "objects", endpoint_url=s3_endpoint)
    with storage.writer(KEY) as writer:
        writer.write(b"hello")
        stored = writer.commit()
    head = s3_inspect.head_object(Bucket=s3_bucket, Key=f"objects/{KEY}")
    assert head["Metadata"] == {"sha256": stored.sha256}


def test_abort_leaves_nothing(backend):
    writer = backend.storage.writer(KEY)
    # More than one S3 part, so there is an uploaded part and a pending upload to clean up.
    for piece in chunks(PART_SIZE + MIB, 64 * 1024):
        writer.write(piece)
    assert backend.leftovers(), "the half-written object should be somewhere before abort"

    writer.abort()
    writer.abort()

    assert backend.leftovers() == []
    assert not backend.storage.exists(KEY)
    with pytest.raises(ValueError):
        writer.write(b"more")
    with pytest.raises(ValueError):
        writer.commit()


def test_error_inside_writer_block_aborts(backend):
    with pytest.raises(RuntimeError, match="client went away"):
        with backend.storage.writer(KEY) as writer:
            for piece in chunks(PART_SIZE + MIB, 64 * 1024):
                writer.write(piece)
            raise RuntimeError("client went away")
    assert backend.leftovers() == []
    assert not backend.storage.exists(KEY)


def test_writer_block_without_commit_keeps_nothing(backend):
    with backend.storage.writer(KEY) as writer:
        writer.write(b"forgotten")
    assert backend.leftovers() == []


def test_a_write_the_full_disk_refuses_leaves_no_temp_file(tmp_path):
    """Small writes wait in the file's buffer; when the disk refuses them, closing the file fails the same
    way. The temp file must go even then: on a full disk its bytes are what keeps it full."""
    storage = LocalStorage(tmp_path / "store")
    with file_size_limit(64 * 1024), pytest.raises(OSError) as refused:
        with storage.writer(KEY) as writer:
            for _ in range(100):
                writer.write(b"x" * 1000)
            writer.commit()
    assert out_of_space(refused.value)
    assert list((tmp_path / "store" / TMP_DIR).iterdir()) == []
    assert not storage.exists(KEY)


def test_put_file_streams_a_local_file(backend, tmp_path):
    src = tmp_path / "adapter.safetensors"
    with src.open("wb") as f:
        for piece in chunks(PART_SIZE + 17, MIB):
            f.write(piece)
    data = src.read_bytes()

    stored = backend.storage.put_file(KEY, src)

    assert stored == StoredObject(KEY, len(data), hashlib.sha256(data).hexdigest())
    assert read_all(backend.storage, KEY) == data
    assert len(backend.leftovers()) == 1


def test_download_with_wrong_sha256_raises_and_leaves_no_file(backend, tmp_path):
    stored = backend.storage.writer(KEY)
    stored.write(b"the real bytes")
    stored = stored.commit()
    dest_dir = tmp_path / "dl"
    wrong = "0" * 64

    with pytest.raises(ChecksumMismatch) as err:
        backend.storage.download(KEY, dest_dir / "data.jsonl", expected_sha256=wrong)

    assert isinstance(err.value, ValueError)
    assert (err.value.key, err.value.expected, err.value.got) == (KEY, wrong, stored.sha256)
    assert KEY in str(err.value) and wrong in str(err.value) and stored.sha256 in str(err.value)
    assert list(dest_dir.iterdir()) == []


def test_missing_object(backend, tmp_path):
    storage = backend.storage
    missing = "team-a/datasets/missing"
    assert not storage.exists(missing)
    with pytest.raises(ObjectNotFound):
        storage.open(missing)
    with pytest.raises(ObjectNotFound):
        storage.size(missing)
    with pytest.raises(ObjectNotFound):
        storage.download(missing, tmp_path / "dl" / "x")
    assert not (tmp_path / "dl").exists() or list((tmp_path / "dl").iterdir()) == []
    storage.delete(missing)


def test_presigned_url(backend):
    data = os.urandom(5000)
    writer = backend.storage.writer(KEY)
    writer.write(data)
    writer.commit()

    url = backend.storage.presigned_url(KEY, expires_s=300, filename="résumé data.jsonl")

    if backend.name == "local":
        assert url is None
        return
    # Signature Version 4: what every AWS region and S3-compatible store takes (botocore's default
    # presigns SigV2, AWSAccessKeyId=...&Signature=..., which newer regions refuse).
    assert "X-Amz-Algorithm=AWS4-HMAC-SHA256" in url and "X-Amz-Signature=" in url and "AWSAccessKeyId" not in url
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.read() == data
        disposition = response.headers["Content-Disposition"]
    assert disposition.startswith("attachment;")
    assert "filename*=UTF-8''r%C3%A9sum%C3%A9%20data.jsonl" in disposition


@pytest.mark.parametrize("bad", ["../escape", "a/../../b", "/etc/passwd", "a//b", "a/./b", "a/b/", ""])
def test_keys_that_could_escape_are_refused(backend, tmp_path, bad):
    storage = backend.storage
    for call in (
        lambda: storage.writer(bad),
        lambda: storage.open(bad),
        lambda: storage.exists(bad),
        lambda: storage.size(bad),
        lambda: storage.delete(bad),
        lambda: storage.download(bad, tmp_path / "x"),
        lambda: storage.presigned_url(bad, 60),
    ):
        with pytest.raises(ValueError, match="invalid storage key"):
            call()
    with pytest.raises(ValueError):
        storage.list("../")
    assert backend.leftovers() == []
    assert sorted(p.name for p in tmp_path.iterdir()) in ([], ["store"])


def test_local_refuses_its_temp_directory(tmp_path):
    storage = LocalStorage(tmp_path)
    with pytest.raises(ValueError, match=r"\.tmp"):
        storage.writer(".tmp/x")


def test_list_and_delete_prefix(backend):
    storage = backend.storage
    keys = ["team-a/datasets/1", "team-a/datasets/2", "team-a/adapters/3", "team-ab/datasets/4", "team-b/datasets/5"]
    for key in keys:
        writer = storage.writer(key)
        writer.write(key.encode())
        writer.commit()
    # An unfinished write is not an object and is never listed.
    pending = storage.writer("team-a/datasets/6")
    pending.write(b"not yet")

    assert storage.list("") == sorted(keys)
    assert storage.list("team-a/") == ["team-a/adapters/3", "team-a/datasets/1", "team-a/datasets/2"]
    assert storage.list("team-a/datasets/") == ["team-a/datasets/1", "team-a/datasets/2"]
    assert storage.list("team-c/") == []

    assert storage.delete_prefix("team-a/") == 3
    assert storage.delete_prefix("team-a/") == 0
    assert storage.list("") == ["team-ab/datasets/4", "team-b/datasets/5"]
    storage.delete("team-b/datasets/5")
    assert storage.list("") == ["team-ab/datasets/4"]
    assert read_all(storage, "team-ab/datasets/4") == b"team-ab/datasets/4"
    pending.abort()


def test_list_objects_gives_each_committed_object_with_its_size_and_time(backend):
    """What the storage sweep reads (app/operations/storage_sweep.py): committed objects only, a multipart
    upload under way included (it is no object until completed)."""
    storage = backend.storage
    before = datetime.now(UTC) - timedelta(seconds=2)  # S3 dates to the second
    sizes = {"team-a/datasets/1": 0, "team-a/checkpoints/2": 70_000, "team-b/datasets/3": 5}
    for key, size in sizes.items():
        with storage.writer(key) as writer:
            writer.write(b"x" * size)
            writer.commit()
    pending = storage.writer("team-a/artifacts/4")
    pending.write(b"p" * (PART_SIZE + 1))  # on S3 a multipart upload under way, on disk a temp file
    after = datetime.now(UTC) + timedelta(seconds=2)
    store_now = storage.now()  # the store's clock, which the sweep reads ages on: theirs are never negative on it

    listed = {o.key: o for o in storage.list_objects()}
    assert {key: o.size for key, o in listed.items()} == sizes
    assert all(before <= o.modified_at <= after and o.modified_at.tzinfo is not None for o in listed.values())
    assert all(o.modified_at <= store_now for o in listed.values()) and before <= store_now <= after
    assert sorted(o.key for o in storage.list_objects("team-a/")) == ["team-a/checkpoints/2", "team-a/datasets/1"]
    assert storage.abort_stale_writes(older_than_s=3600) == 0  # the write under way is young on the store's clock
    pending.abort()
    assert backend.leftovers() == sorted((f"objects/{key}" if backend.name == "s3" else key) for key in sizes)


def test_make_key():
    key = make_key("team-a", "datasets")
    assert re.fullmatch(r"team-a/datasets/[0-9a-f]{32}", key)
    assert make_key("team-a", "datasets") != key
    for team, kind in (("a/b", "datasets"), ("team", ""), ("..", "datasets")):
        with pytest.raises(ValueError):
            make_key(team, kind)


def test_storage_from_settings_local(tmp_path):
    storage = storage_from_settings(Settings(home=tmp_path, storage_url=f"file://{tmp_path}/objects"))
    assert isinstance(storage, LocalStorage) and storage.root == tmp_path / "objects"
    storage.put_file("t/k/1", Path(__file__))
    assert (tmp_path / "objects" / "t/k/1").read_bytes() == Path(__file__).read_bytes()


def test_storage_from_settings_s3(tmp_path, s3_endpoint, s3_bucket, s3_inspect):
    settings = Settings(home=tmp_path, storage_url=f"s3://{s3_bucket}/deploy/one", s3_endpoint_url=s3_endpoint)
    storage = storage_from_settings(settings)
    assert isinstance(storage, S3Storage)
    storage.put_file("t/k/1", Path(__file__))
    body = s3_inspect.get_object(Bucket=s3_bucket, Key="deploy/one/t/k/1")["Body"].read()
    assert body == Path(__file__).read_bytes()
    assert storage.list("t/") == ["t/k/1"]


def test_presigned_urls_use_the_public_endpoint_when_set(s3_endpoint, s3_bucket):
    """Servers reach the store as http://minio:9000, users as some public name: links carry the latter."""
    from app.storage.s3 import S3Storage

    storage = S3Storage(s3_bucket, "p", endpoint_url=s3_endpoint, public_endpoint_url="https://files.example.com")
    url = storage.presigned_url("team/artifacts/abc", 60, filename="adapter.tar")
    assert url.startswith(f"https://files.example.com/{s3_bucket}/p/team/artifacts/abc?")
    assert S3Storage(s3_bucket, endpoint_url=s3_endpoint).presigned_url("k", 60).startswith(s3_endpoint)
