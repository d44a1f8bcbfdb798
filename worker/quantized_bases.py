"""Which pre-quantized base a job may load from the cache (quantized_bases in the database, the 4-bit
weights in object storage): the identity of everything that decides the quantized bytes, hashed into the
entry's key by the worker (worker/supervisor.py `_quantized_cache`)."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from app.jobs.runs import ClaimedJob
from worker.training.protocol import write_json_atomic

log = logging.getLogger(__name__)


def quantized_identity(job: ClaimedJob, base_path: Path, queue: str, work_dir: Path) -> dict:
    """Everything that decides the bytes of a quantized base. A local directory has no revision, so the
    sha256 of its weight files stands in for one: a changed file is a new entry, never a stale hit, and
    the same files on every host are one entry, however they were copied there (modification times
    differ after a plain `cp`, and each host used to quantize and store a copy of its own)."""
    from importlib.metadata import version

    model = job.base_model
    weights = None
    if model["path"]:
        weights = sorted((p.name, p.stat().st_size, digest) for p, digest in
                         weight_digests(sorted(base_path.glob("*.safetensors")), work_dir / WEIGHT_DIGESTS).items())
    identity = {
        "model": model["name"], "path": model["path"], "hub_id": model["hub_id"], "revision": model["revision"],
        "weights": weights, "quantization": job.spec["quantization"],
        # The compute dtype "auto" resolves per device kind: workers of one GPU class share entries (an entry saved for
        # another dtype than a run computes in is passed over by it: worker.training.model.cache_holds).
        "gpu_class": queue,
        "transformers": version("transformers"), "bitsandbytes": version("bitsandbytes"),
    }
    if model["hub_id"] and base_path.name != model["revision"]:
        # A branch or a tag (the registry takes both) moves: the commit it resolved to, which names the snapshot
        # directory the download returned, decides the weights. Keyed on "main" alone, a job after the branch moved
        # loaded the old commit's quantized weights from the cache. (A revision that is the commit keys as before.)
        identity["commit"] = base_path.name
    return identity


def cache_key(identity: dict) -> str:
    """The cache entry's key (quantized_bases.key): the sha256 of the identity."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


# Per host, in the work directory its workers share: the sha256 of each weight file read so far, by the
# file's device, inode, size and modification time, so a file is read whole once per host and version,
# not at every job (a 65B base is 130 GB).
WEIGHT_DIGESTS = ".weight-digests.json"


def weight_digests(files: list[Path], memo: Path) -> dict[Path, str]:
    """The sha256 of each file, from the memo where the file is unchanged since it was read, else read now."""
    try:
        known = json.loads(memo.read_text())
        known = known if isinstance(known, dict) else {}
    except (OSError, ValueError):
        known = {}
    digests, changed = {}, False
    for path in files:
        status = path.stat()
        stamp = f"{status.st_dev}:{status.st_ino}:{status.st_size}:{status.st_mtime_ns}"
        entry = known.get(str(path.resolve()))
        if isinstance(entry, dict) and entry.get("stamp") == stamp and isinstance(entry.get("sha256"), str):
            digests[path] = entry["sha256"]
            continue
        digest = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(8 * 1024 * 1024), b""):
                digest.update(block)
        digests[path] = digest.hexdigest()
        known[str(path.resolve())] = {"stamp": stamp, "sha256": digests[path]}
        changed = True
    if changed:
        try:  # files gone since are forgotten; two workers writing at once: either whole memo is right
            memo.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(memo, {name: entry for name, entry in known.items() if Path(name).exists()})
        except OSError:  # a full disk costs a read next time, not the job
            log.warning("could not save the weight files' digests to %s", memo, exc_info=True)
    return digests
