"""`qlora admin sweep-storage` on the embedded default (SQLite, a local directory): stray objects made for
real (tests/stray_objects.py), aged with os.utime; exactly the old, unreferenced objects of the service's
form are listed, and deleted only with --delete; each is checked again before its delete; an empty
database refuses; other files are never touched."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from app.datasets.tables import Dataset
from app.db import FAULT_CLOCK_SKEW, Base, engine_for
from app.migrate import upgrade
from app.operations import repository
from app.operations import storage_sweep as sweeping
from app.storage import LocalStorage, make_key, storage_from_settings
from app.storage.local import TMP_DIR
from tests.deployment import ROOT
from tests.fast.conftest import open_session
from tests.stray_objects import Scene, build

DAY = 86400


def age(storage: LocalStorage, keys: list[str], seconds: float) -> None:
    then = time.time() - seconds
    for key in keys:
        os.utime(storage.root / key, (then, then))


def on_disk(storage: LocalStorage) -> set[str]:
    return {p.relative_to(storage.root).as_posix() for p in storage.root.rglob("*")
            if p.is_file() and p.parent != storage.root / TMP_DIR}


@pytest.fixture
def storage(settings) -> LocalStorage:
    made = storage_from_settings(settings)
    assert isinstance(made, LocalStorage)
    return made


@pytest.fixture
def scene(session, storage) -> Scene:
    made = build(session, storage)
    age(storage, made.old, 2 * DAY)
    return made


def qlora(home: Path, *args: str, storage_url: str | None = None, clock_skew_s: float = 0) -> subprocess.CompletedProcess:
    """The command as an operator runs it, against QLORA_HOME's database (and its storage, or storage_url's), on
    a host whose clock runs clock_skew_s off (QLORA_FAULT_CLOCK_SKEW_S)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("QLORA_")} | {"QLORA_HOME": str(home)}
    if storage_url:
        env["QLORA_STORAGE_URL"] = storage_url
    if clock_skew_s:
        env[FAULT_CLOCK_SKEW] = str(clock_skew_s)
    return subprocess.run([sys.executable, "-m", "app.cli", "admin", "sweep-storage", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


def test_the_sweep_lists_exactly_the_old_unreferenced_objects_of_the_services_form(session, storage, scene):
    everything = on_disk(storage)
    pending = storage.writer(make_key(scene.team_id, "datasets"))  # an upload under way: a temp file, not an object
    pending.write(b"half")
    for temp in (storage.root / TMP_DIR).iterdir():  # as old as the rest: still never listed
        os.utime(temp, (time.time() - 2 * DAY,) * 2)
    sweep = sweeping.find_strays(session, storage, DAY)
    pending.abort()

    assert sorted(s.key for s in sweep.strays) == sorted(scene.strays)
    assert (sweep.stored, sweep.referenced, sweep.young, sweep.foreign) == (10, 4, 1, len(scene.foreign))
    assert {s.key: (s.team_id, s.kind) for s in sweep.strays} == {key: tuple(key.split("/")[:2]) for key in scene.strays}
    assert all(DAY < s.age_s < 2 * DAY + 60 for s in sweep.strays)
    assert on_disk(storage) == everything, "a sweep without delete deletes nothing"

    # An object is young until --older-than has passed since it was last written.
    assert sweeping.find_strays(session, storage, 3 * DAY).strays == []
    age(storage, scene.young, DAY + 60)
    assert sorted(s.key for s in sweeping.find_strays(session, storage, DAY).strays) == sorted(scene.strays + scene.young)


def test_delete_removes_the_strays_and_nothing_else(session, storage, scene):
    sweep = sweeping.find_strays(session, storage, DAY)
    done = sweeping.delete_strays(session, storage, sweep)

    assert sorted(s.key for s in done.deleted) == sorted(scene.strays) and not done.kept and done.failed is None
    assert on_disk(storage) == set(scene.referenced + scene.young + scene.foreign)
    answer = sweeping.report(session, sweep, done)
    assert answer["deleted"]["count"] == 5 and answer["deleted"]["bytes"] == sum(s.bytes for s in sweep.strays)


def test_a_row_recorded_after_the_listing_keeps_its_object(settings, session, storage, scene):
    """As a worker that records a checkpoint while the operator reads the list: asked again just before
    the delete, the database names the object, and it stays."""
    sweep = sweeping.find_strays(session, storage, DAY)
    late = scene.strays[0]  # a dataset's upload, recorded late
    with open_session(settings) as other:
        other.add(Dataset(team_id=scene.team_id, filename="late.jsonl", storage_key=late, bytes=1, sha256="0" * 64,
                          status="ready", format="chat", rows=1))
        other.commit()

    done = sweeping.delete_strays(session, storage, sweep)

    assert [s.key for s in done.kept] == [late]
    assert sorted(s.key for s in done.deleted) == sorted(scene.strays[1:])
    assert late in on_disk(storage)


def test_an_empty_database_refuses_to_delete_unless_forced(tmp_path, session, storage, scene):
    """A sweep pointed at the wrong database (here: a new, empty one) must not take every object for a stray."""
    empty_home = tmp_path / "elsewhere"
    empty_home.mkdir()
    empty_database = f"sqlite:///{empty_home / 'qlora.db'}"  # where QLORA_HOME puts it
    upgrade(empty_database)
    everything = on_disk(storage)
    try:
        def run(*args: str) -> subprocess.CompletedProcess:
            return qlora(empty_home, *args, storage_url=f"file://{storage.root}")

        listed = run()
        assert listed.returncode == 0, listed.stderr
        assert json.loads(listed.stdout)["database_looks_wrong"] is True
        # every old object of the service's looks stray, the referenced ones too
        assert sorted(s["key"] for s in json.loads(listed.stdout)["strays"]) == sorted(scene.strays + scene.referenced)

        refused = run("--delete")
        assert refused.returncode == 1 and refused.stdout == ""
        assert "looks empty or wrong" in refused.stderr and "QLORA_DATABASE_URL" in refused.stderr
        assert on_disk(storage) == everything

        forced = run("--delete", "--force")
        assert forced.returncode == 0, forced.stderr
        assert json.loads(forced.stdout)["deleted"]["count"] == 9
        assert on_disk(storage) == set(scene.young + scene.foreign), "foreign files are never touched, even forced"
    finally:
        engine_for(empty_database).dispose()


def test_the_command_lists_on_a_pipe_says_how_to_delete_on_a_terminal_and_deletes_with_delete(settings, storage,
                                                                                            scene):
    listed = qlora(settings.home)
    assert listed.returncode == 0, listed.stderr
    answer = json.loads(listed.stdout)
    assert sorted(s["key"] for s in answer["strays"]) == sorted(scene.strays)
    assert {(row["team"], row["kind"], row["count"]) for row in answer["summary"]} == {
        ("team-a", "datasets", 2), ("team-a", "checkpoints", 2), ("shared", "quantized-bases", 1)}
    assert answer["total"] == {"count": 5, "bytes": sum(s["bytes"] for s in answer["strays"])}
    assert answer["deleted"] is None

    table = qlora(settings.home, "--table")
    assert table.returncode == 0 and "stray objects" in table.stdout and "team-a" in table.stdout
    assert "Nothing deleted: `qlora admin sweep-storage --older-than 24h --delete`" in " ".join(table.stdout.split())

    deleted = qlora(settings.home, "--delete", "--table")
    assert deleted.returncode == 0, deleted.stderr
    assert "Deleted 5 objects, freed" in " ".join(deleted.stdout.split())
    assert on_disk(storage) == set(scene.referenced + scene.young + scene.foreign)
    again = json.loads(qlora(settings.home).stdout)
    assert again["strays"] == [] and again["storage"]["referenced"] == 4


@pytest.mark.parametrize("skew_days", [3, -3], ids=["ahead", "behind"])
def test_ages_are_the_filesystems_whatever_the_operators_host_clock_reads(settings, storage, scene, skew_days):
    """The files' mtimes are the filesystem's clock: read on a host's clock three days ahead, the object uploaded a
    moment ago (its row about to be committed) looked three days old and went; three days behind, the two-day-old
    strays looked a day from now and stayed."""
    deleted = qlora(settings.home, "--delete", clock_skew_s=skew_days * DAY)

    assert deleted.returncode == 0, deleted.stderr
    assert sorted(json.loads(deleted.stdout)["deleted"]["keys"]) == sorted(scene.strays)
    assert on_disk(storage) == set(scene.referenced + scene.young + scene.foreign)


@pytest.mark.parametrize(("given", "seconds"), [("30m", 1800), ("24h", DAY), ("7d", 7 * DAY), ("0", 0)])
def test_ages_are_minutes_hours_or_days(given, seconds):
    assert sweeping.parse_age(given) == seconds


@pytest.mark.parametrize("given", ["24", "1w", "1.5h", "-1h", "h", ""])
def test_another_age_is_refused_naming_the_forms(given):
    with pytest.raises(ValueError, match="30m, 24h or 7d"):
        sweeping.parse_age(given)


def test_an_age_under_an_hour_needs_force(settings, storage, scene):
    refused = qlora(settings.home, "--older-than", "30m", "--delete")
    assert refused.returncode == 2 and "--force" in refused.stderr
    assert on_disk(storage) >= set(scene.strays)
    forced = qlora(settings.home, "--older-than", "0", "--force")
    assert forced.returncode == 0 and len(json.loads(forced.stdout)["strays"]) == 6  # the young one too


def test_every_column_that_holds_a_storage_key_is_one_the_sweep_checks():
    """A table that comes to hold storage keys must be one the sweep asks, or its objects would be swept."""
    holding = {f"{table.name}.{column.name}" for table in Base.metadata.tables.values() for column in table.columns
               if "storage_key" in column.name}
    checked = {f"{column.class_.__tablename__}.{column.key}" for column in repository.STORAGE_KEY_COLUMNS}
    assert holding == checked


def test_keys_made_by_the_service_are_of_its_form_and_others_are_not():
    team = "0123456789abcdef0123456789abcdef"
    for kind in sweeping.TEAM_KINDS:
        assert sweeping.key_parts(make_key(team, kind)) == (team, kind)
    assert sweeping.key_parts(make_key("shared", "quantized-bases")) == ("shared", "quantized-bases")
    for key in ("notes/readme.txt", f"{team}/models/{team}", f"shared/datasets/{team}", f"{team}/datasets/{team}/x",
                f"{team}/quantized-bases/{team}", f"x/{team}/datasets/{team}"):
        assert sweeping.key_parts(key) is None, key
