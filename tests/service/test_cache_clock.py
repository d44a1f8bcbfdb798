"""The pre-quantized base cache is pruned on the database's clock, whatever the hosts' clocks read: on real
Postgres (SQLite's clock is its one host's), with the reaper, or the worker that marks an entry used, in a process
of its own whose clock runs 31 or 40 days off (QLORA_FAULT_CLOCK_SKEW_S, app/db.py). On their own clocks, a reaper
ahead deleted the entry a job had loaded a moment ago (and the next job quantized its ~35 GB base afresh), one
behind kept stale entries for as long as it was behind, and a worker behind marked an entry it loaded as unused for
40 days, so the reaper's next pass deleted it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, update

from app.config import Settings
from app.db import FAULT_CLOCK_SKEW, database_now, session_scope
from app.jobs import repository
from app.jobs.quantized_cache import prune_unused
from app.jobs.tables import QuantizedBase
from app.storage.base import make_key, storage_from_settings

ROOT = Path(__file__).resolve().parents[2]
DAY_S = 86400

# Run in a process of its own, whose clock is skewed: the reaper's pass over the cache, or a worker's job marking
# the entry it is about to load used (worker/supervisor.py _quantized_cache).
SKEWED = """
import json, sys
from app.config import Settings
from app.db import session_scope
from app.jobs import runs
from app.jobs.quantized_cache import prune_unused
from app.storage.base import storage_from_settings
url, home, who, key = sys.argv[1:]
settings = Settings(home=home, database_url=url, storage_url=f"file://{home}/storage", broker_url="")
if who == "reaper":
    print(json.dumps(prune_unused(settings, storage_from_settings(settings))))
else:
    with session_scope(url) as session:
        assert runs.mark_cached_base_used(session, key)
    print("{}")
"""


def settings_for(home: Path, database_url: str) -> Settings:
    """As the skewed process builds them: Postgres, local storage; entries kept 30 days (the default)."""
    return Settings(home=home, database_url=database_url, storage_url=f"file://{home}/storage", broker_url="")


def add_entry(settings, storage, key: str, last_used_days_ago: float) -> str:
    """An entry as a worker stores one (object, then row), last used that long ago by the database's clock."""
    with storage.writer(make_key("shared", "quantized-bases")) as writer:
        writer.write(b"4-bit weights")
        stored = writer.commit()
    with session_scope(settings.database_url) as session:
        assert repository.add_quantized_base(session, key, stored.key, stored.size, stored.sha256, {"model": key[:1]})
        session.flush()
        session.execute(update(QuantizedBase).where(QuantizedBase.key == key)
                        .values(last_used_at=database_now(session) - timedelta(days=last_used_days_ago)))
    return stored.key


def in_skewed_process(settings, skew_s: float, who: str, key: str = "") -> dict:
    env = {**os.environ, FAULT_CLOCK_SKEW: str(skew_s), "QLORA_HOME": str(settings.home)}
    done = subprocess.run([sys.executable, "-c", SKEWED, settings.database_url, str(settings.home), who, key],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def entries(settings) -> set[str]:
    with session_scope(settings.database_url) as session:
        return set(session.scalars(select(QuantizedBase.key)))


@pytest.mark.parametrize("skew_days", [31, -31], ids=["reaper-ahead", "reaper-behind"])
def test_a_reaper_whose_clock_is_off_prunes_exactly_the_entries_unused_for_keep_days(database_url, tmp_path, skew_days):
    settings = settings_for(tmp_path, database_url)
    storage = storage_from_settings(settings)
    fresh = add_entry(settings, storage, "a" * 64, last_used_days_ago=0)  # a job loaded it a moment ago
    stale = add_entry(settings, storage, "b" * 64, last_used_days_ago=31)

    counts = in_skewed_process(settings, skew_days * DAY_S, "reaper")

    assert counts["quantized_bases_pruned"] == 1 and entries(settings) == {"a" * 64}, counts
    assert storage.exists(fresh) and not storage.exists(stale)


def test_an_entry_a_worker_whose_clock_runs_behind_loads_is_kept_by_the_next_pass(database_url, tmp_path):
    settings = settings_for(tmp_path, database_url)
    storage = storage_from_settings(settings)
    kept = add_entry(settings, storage, "c" * 64, last_used_days_ago=20)

    in_skewed_process(settings, -40 * DAY_S, "worker", "c" * 64)  # a job on that worker is about to load it
    counts = prune_unused(settings, storage)  # the reaper's pass, on a host whose clock is right

    assert counts["quantized_bases_pruned"] == 0 and entries(settings) == {"c" * 64}
    assert storage.exists(kept)
