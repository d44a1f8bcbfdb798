"""A full disk. Under the API: an upload the disk refuses answers 507 and keeps nothing, a write the
database's disk refuses answers 503 and keeps nothing either (not even the upload's stored object), and
both succeed again once there is room; the app runs in this process, on the embedded default (SQLite, a
local storage directory). Under a worker: what each library raises on a full disk gives the job another
attempt, naming the disks (tests/service/test_full_disk.py runs it through a worker). The disk fills for
real (tests/full_disk.py: the kernel refuses the writes)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from tests.full_disk import file_size_limit
from worker.supervisor import JobRun
from worker.training.protocol import out_of_space, write_json_atomic

LIMIT = 512 * 1024


def line(i: int) -> bytes:
    return b'{"messages": [{"role": "user", "content": "q%d"}, {"role": "assistant", "content": "a"}]}\n' % i


def stored_files(settings) -> list[str]:
    root = settings.home / "storage"
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_an_upload_the_full_disk_refuses_answers_507_keeps_nothing_and_goes_through_once_there_is_room(
        client, settings):
    data = b"".join(line(i) for i in range(20_000))  # 1.7 MiB: past what the disk takes
    assert len(data) > 2 * LIMIT
    with file_size_limit(LIMIT):
        refused = client.post("/datasets", files={"file": ("train.jsonl", data)})
        refused_v1 = client.post("/v1/files", files={"file": ("train.jsonl", data)}, data={"purpose": "fine-tune"})
    assert refused.status_code == 507, refused.text
    assert refused.json()["error"]["code"] == "insufficient_storage"
    assert "storage is full" in refused.json()["error"]["message"]
    assert "nothing of it was kept" in refused.json()["error"]["message"]
    assert refused_v1.status_code == 507, refused_v1.text
    assert refused_v1.json()["error"]["type"] == "server_error"  # what the openai SDK reads
    assert client.get("/datasets").json()["data"] == []
    assert stored_files(settings) == []  # no object, no temp file

    stored = client.post("/datasets", files={"file": ("train.jsonl", data)})
    assert stored.status_code == 201, stored.text
    assert stored.json()["rows"] == 20_000


def test_a_write_the_databases_full_disk_refuses_answers_503_and_keeps_no_stored_object(client, settings):
    # The database's write-ahead log is past the limit: the next commit's write goes beyond it and is
    # refused, after the upload's object (smaller than the limit) was stored.
    db = sqlite3.connect(settings.home / "qlora.db")
    db.execute("CREATE TABLE filler (x BLOB)")
    db.execute("INSERT INTO filler VALUES (?)", (b"x" * (2 * LIMIT),))
    db.commit()
    db.close()
    wal = settings.home / "qlora.db-wal"
    assert wal.stat().st_size > LIMIT, "the test needs a write-ahead log past the limit"
    data = b"".join(line(i) for i in range(100))

    with file_size_limit(LIMIT):
        refused = client.post("/datasets", files={"file": ("train.jsonl", data)})
    assert refused.status_code == 503, refused.text
    assert refused.json()["error"]["code"] == "database_unavailable"
    assert refused.headers["retry-after"]
    assert stored_files(settings) == []  # the row was never committed, so its object went too

    stored = client.post("/datasets", files={"file": ("train.jsonl", data)})
    assert stored.status_code == 201, stored.text
    assert [d["id"] for d in client.get("/datasets").json()["data"]] == [stored.json()["id"]]


def plain_write(path: Path) -> None:
    with path.open("wb") as f:
        f.write(b"x" * 2 * LIMIT)


def torch_save(path: Path) -> None:  # a checkpoint's optimizer state
    import torch

    torch.save({"state": torch.zeros(LIMIT // 2)}, path)


def safetensors_save(path: Path) -> None:  # an adapter, a merged model
    import torch
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(LIMIT // 2)}, path)


@pytest.mark.parametrize("write", [plain_write, torch_save, safetensors_save])
def test_a_write_the_full_disk_refuses_gives_the_job_another_attempt_naming_the_disks(settings, tmp_path, write):
    """Each library says it in its own words (an OSError, torch's short write, Rust's "os error 27"): all
    are a full disk, which freeing space mends, not a fault of the job that another attempt would repeat."""
    with file_size_limit(LIMIT), pytest.raises(Exception) as refused:
        write(tmp_path / "written")
    assert out_of_space(refused.value)
    why = JobRun(settings, "job-1", "w1")._not_the_jobs_fault(refused.value)
    assert why is not None and why.startswith("a disk was full"), why
    assert f"free for {settings.work_dir.parent}" in why  # the work directory's filesystem, not made yet
    assert "free space there" in why


def test_other_errors_fail_the_job_as_before(settings):
    run = JobRun(settings, "job-1", "w1")
    assert run._not_the_jobs_fault(ValueError("a bug")) is None
    assert run._not_the_jobs_fault(PermissionError(13, "Permission denied", "/models/x")) is None
    assert run._not_the_jobs_fault(RuntimeError("CUDA error: an illegal memory access")) is None


def test_a_json_file_the_full_disk_refuses_leaves_no_temp_file(tmp_path):
    """The worker's and the training process's small files (progress, the held attempt, the result)."""
    with file_size_limit(LIMIT), pytest.raises(OSError) as refused:
        write_json_atomic(tmp_path / "progress.json", {"text": "y" * 2 * LIMIT})
    assert out_of_space(refused.value)
    assert list(tmp_path.iterdir()) == []
