"""Which cached quantized base a job may load (worker/quantized_bases.py): for a base model in
a local directory, its weight files' contents decide, not how they were copied to each host."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from types import SimpleNamespace

from worker.quantized_bases import WEIGHT_DIGESTS, cache_key, quantized_identity


def key(job, base, work_dir) -> str:
    return cache_key(quantized_identity(job, base, "gpu-default", work_dir))


def make_job(path):
    return SimpleNamespace(base_model={"name": "base", "path": str(path), "hub_id": None, "revision": None},
                           spec={"quantization": {"bits": 4, "quant_type": "nf4", "double_quant": True}})


def test_the_same_weights_copied_to_two_hosts_are_one_entry_and_changed_weights_another(tmp_path):
    """A plain `cp` gives the copy new modification times: each host quantized and stored a copy of its own."""
    first = tmp_path / "host-1" / "base"
    first.mkdir(parents=True)
    for name in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        (first / name).write_bytes(os.urandom(3 * 1024 * 1024))
    (first / "config.json").write_text("{}")
    second = tmp_path / "host-2" / "base"
    shutil.copytree(first, second, copy_function=shutil.copyfile)  # no times copied
    for weights in second.glob("*.safetensors"):
        os.utime(weights, (1_000_000_000, 1_000_000_000))
    job = make_job("/models/base")  # the registry's path, the same on every host
    assert key(job, first, tmp_path / "work-1") == key(job, second, tmp_path / "work-2")

    data = bytearray((second / "model-00002-of-00002.safetensors").read_bytes())
    data[len(data) // 2] ^= 1  # one changed weight, same size
    (second / "model-00002-of-00002.safetensors").write_bytes(bytes(data))
    assert key(job, first, tmp_path / "work-1") != key(job, second, tmp_path / "work-2")


def test_a_file_is_read_whole_once_per_host_and_again_when_it_changes(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    weights = base / "model.safetensors"
    weights.write_bytes(os.urandom(1024 * 1024))
    work = tmp_path / "work"
    job = make_job(base)
    read = quantized_identity(job, base, "gpu-default", work)["weights"]
    assert read == [("model.safetensors", 1024 * 1024, hashlib.sha256(weights.read_bytes()).hexdigest())]

    memo = work / WEIGHT_DIGESTS
    remembered = json.loads(memo.read_text())
    (entry,) = remembered.values()
    entry["sha256"] = "0" * 64  # what the memo says is what the next job takes, unread
    memo.write_text(json.dumps(remembered))
    assert quantized_identity(job, base, "gpu-default", work)["weights"][0][2] == "0" * 64

    weights.write_bytes(os.urandom(1024 * 1024))  # replaced: its stamp no longer matches
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # on a coarse clock too
    assert quantized_identity(job, base, "gpu-default", work)["weights"][0][2] == hashlib.sha256(weights.read_bytes()).hexdigest()

    memo.write_text("{not json")  # a damaged memo costs a read, not the job
    assert quantized_identity(job, base, "gpu-default", work)["weights"][0][2] == hashlib.sha256(weights.read_bytes()).hexdigest()


def test_a_hub_branch_that_moved_to_another_commit_is_another_entry(tmp_path):
    """Keyed on the registry's revision alone, a job on `main` after the branch moved loaded the old commit's
    quantized weights from the cache, while the download had fetched the new ones."""
    job = SimpleNamespace(base_model={"name": "base", "path": None, "hub_id": "org/model", "revision": "main"},
                          spec={"quantization": {"bits": 4, "quant_type": "nf4", "double_quant": True}})
    snapshots = tmp_path / "hub" / "models--org--model" / "snapshots"  # where snapshot_download answers
    before, after = snapshots / ("a" * 40), snapshots / ("b" * 40)
    assert key(job, before, tmp_path / "work") != key(job, after, tmp_path / "work")
    assert key(job, before, tmp_path / "work") == key(job, before, tmp_path / "work-2")
