"""Pruning the pre-quantized base cache (quantized_bases, and the 4-bit weights in object storage).

An entry's key covers the transformers and bitsandbytes versions and the weights' sha256
(worker/quantized_bases.py), so after a library upgrade, a changed base model or a retired one, its old
entries are never asked for again, and each holds its quantized weights (~35 GB for a 65B base). Every entry
records when it was last used (stored, or loaded by a job: worker/supervisor.py `_quantized_cache`); the
reaper's pass (app/jobs/reaper.py, one holder per deployment) deletes those unused for
QLORA_QUANTIZED_CACHE_KEEP_DAYS, and `qlora admin prune-quantized-bases` does it by hand.

Nothing a job needs is lost: the row goes first, in a transaction of its own, and only once that has
committed does the object go. A job that looks the entry up afterwards misses and quantizes the base from its
own weights; one that marked it used first keeps it (the DELETE's own WHERE decides); one that was loading it
as it went finds the object missing or cut short and quantizes afresh as well (as for a damaged entry), and
then stores it again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy.orm import Session

from app.config import Settings
from app.db import database_now, session_scope
from app.jobs import repository
from app.jobs.tables import QuantizedBase
from app.storage.base import Storage, delete_objects
from app.text import counted, format_bytes

log = logging.getLogger(__name__)

DAY_S = 86400


def keep_s(settings: Settings) -> float | None:
    """How long an unused entry is kept; None: for ever (QLORA_QUANTIZED_CACHE_KEEP_DAYS=0)."""
    return settings.quantized_cache_keep_days * DAY_S or None


def entry_view(row: QuantizedBase, keep_for_s: float | None = None) -> dict:
    """An entry as `qlora admin list-quantized-bases` shows it: what it was made from, its size and its use.
    prune_after: when the reaper deletes it unless a job loads it first (None: kept for ever)."""
    identity = row.identity or {}
    return {
        "key": row.key, "model": identity.get("model"), "path": identity.get("path"), "hub_id": identity.get("hub_id"),
        "revision": identity.get("revision"), "quantization": _quantization(identity.get("quantization") or {}),
        "gpu_class": identity.get("gpu_class"),
        "transformers": identity.get("transformers"), "bitsandbytes": identity.get("bitsandbytes"),
        "bytes": row.bytes, "storage_key": row.storage_key, "created_at": row.created_at,
        "last_used_at": row.last_used_at,
        "prune_after": row.last_used_at + timedelta(seconds=keep_for_s) if keep_for_s else None,
    }


def entries(session: Session, settings: Settings) -> list[dict]:
    """Every entry, least recently used first."""
    keep_for_s = keep_s(settings)
    return [entry_view(row, keep_for_s) for row in repository.quantized_bases(session)]


@dataclass(frozen=True)
class Pruned:
    used_before: datetime
    entries: list[dict]  # entry_view of each entry deleted
    left_in_storage: list[str]  # objects storage would not delete (strays now: `qlora admin sweep-storage`)

    @property
    def bytes(self) -> int:
        return sum(entry["bytes"] for entry in self.entries)

    def report(self) -> dict:
        """As `qlora admin prune-quantized-bases` prints it on a pipe."""
        return {"used_before": self.used_before, "count": len(self.entries), "bytes": self.bytes,
                "pruned": self.entries, "left_in_storage": self.left_in_storage}


def prune(session: Session, storage: Storage, older_than_s: float, now: datetime | None = None) -> Pruned:
    """Delete the entries no job has used for older_than_s: their rows, committed here (before anything
    else the session's transaction holds, so call it in a transaction of its own), then their objects.
    Read on the database's clock, which last_used_at is written on (runs.mark_cached_base_used): on this host's,
    a reaper whose clock ran 30 days ahead deleted the entry every job loads, and one behind kept stale entries
    (~35 GB each) for as long. `now`: as the database's clock reads."""
    used_before = (now or database_now(session)) - timedelta(seconds=older_than_s)
    deleted = [entry_view(row) for row in repository.delete_quantized_bases_unused_since(session, used_before)]
    # Committed before the objects go: from here on no job finds these entries; one that found one just before
    # falls back to quantizing the base itself (module docstring).
    session.commit()
    left = delete_objects(storage, [entry["storage_key"] for entry in deleted])
    pruned = Pruned(used_before, deleted, left)
    if deleted:
        log.info("pruned %s unused since %s, %s freed: %s", counted(len(deleted), "quantized base"),
                 used_before.isoformat(timespec="seconds"), format_bytes(pruned.bytes),
                 "; ".join(_describe(entry) for entry in deleted))
    return pruned


def prune_unused(settings: Settings, storage: Storage) -> dict[str, int]:
    """The reaper's part: prune the entries unused for QLORA_QUANTIZED_CACHE_KEEP_DAYS (none when it is 0)."""
    keep_for_s = keep_s(settings)
    if keep_for_s is None:
        return {"quantized_bases_pruned": 0, "quantized_base_bytes_freed": 0}
    with session_scope(settings.database_url) as session:
        pruned = prune(session, storage, keep_for_s)
    return {"quantized_bases_pruned": len(pruned.entries), "quantized_base_bytes_freed": pruned.bytes}


def _describe(entry: dict) -> str:
    return (f"{entry['model']} ({entry['quantization']}, {entry['gpu_class']}, transformers {entry['transformers']}, "
            f"bitsandbytes {entry['bitsandbytes']}, {format_bytes(entry['bytes'])}, last used "
            f"{entry['last_used_at'].isoformat(timespec='seconds')})")


def _quantization(spec: dict) -> str | None:
    """"4-bit nf4", "8-bit": the job spec's quantization, as people say it."""
    if "bits" not in spec:
        return None
    return f"{spec['bits']}-bit" + (f" {spec['quant_type']}" if spec["bits"] == 4 and spec.get("quant_type") else "")
