"""`qlora admin`: teams, keys (printed once, stored hashed, revocable) and the model registry; JSON on a
pipe (stdout is captured here: a pipe), a table with --table."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

from sqlalchemy import select

from app.config import Settings
from app.db import session_scope
from app.operations.tables import Worker
from app.teams.service import Caller, authenticate, hash_key
from app.teams.tables import ApiKey, Team
from tests.deployment import ROOT, stored_spec


def qlora(home, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QLORA_")} | {"QLORA_HOME": str(home)} | (env or {})
    return subprocess.run([sys.executable, "-m", "app.cli", *args], cwd=ROOT, env=env, capture_output=True, text=True)


def test_admin_commands_manage_teams_keys_and_models(tmp_path, tiny_model_dir):
    assert qlora(tmp_path, "migrate").returncode == 0
    team = qlora(tmp_path, "admin", "create-team", "research")
    assert team.returncode == 0 and json.loads(team.stdout)["name"] == "research"
    duplicate = qlora(tmp_path, "admin", "create-team", "research")
    assert duplicate.returncode == 1 and "already exists" in duplicate.stderr

    made = qlora(tmp_path, "admin", "create-key", "research")
    key = made.stdout.strip()  # stdout holds the key alone, for scripts
    assert made.returncode == 0 and key.startswith("qlk_") and len(key) > 40

    url = Settings(home=tmp_path).database_url
    with session_scope(url) as session:
        stored = session.scalars(select(ApiKey)).one()
        assert key not in (stored.key_hash, stored.prefix) and len(stored.key_hash) == 64  # only a hash
        assert isinstance(authenticate(session, hash_key(key)), Caller)
    listed = qlora(tmp_path, "admin", "list-keys", "research")
    assert [(k["id"], k["prefix"], k["revoked_at"]) for k in json.loads(listed.stdout)] == [(stored.id, stored.prefix, None)]
    assert key not in listed.stdout
    table = qlora(tmp_path, "admin", "list-keys", "research", "--table")
    assert "┃ id" in table.stdout and stored.prefix in table.stdout
    unknown = qlora(tmp_path, "admin", "list-keys", "nosuch")  # as create-key says, not an empty table
    assert unknown.returncode == 1 and "no team named 'nosuch'" in unknown.stderr and unknown.stdout == ""

    assert qlora(tmp_path, "admin", "revoke-key", stored.prefix).returncode == 0
    with session_scope(url) as session:
        from app.errors import Unauthorized

        try:
            authenticate(session, hash_key(key))
            raise AssertionError("a revoked key still authenticates")
        except Unauthorized:
            pass

    # Only under a model root: the service's own <home>/models by default, which the tiny model is not under.
    outside = qlora(tmp_path, "admin", "add-model", "tiny", "--path", str(tiny_model_dir))
    assert outside.returncode == 1 and "is not under a model root" in outside.stderr, outside.stderr
    assert str(tmp_path / "models") in " ".join(outside.stderr.split())
    roots = {"QLORA_MODEL_ROOTS": json.dumps([str(tiny_model_dir.parent)])}
    added = qlora(tmp_path, "admin", "add-model", "tiny", "--path", str(tiny_model_dir), env=roots)
    assert added.returncode == 0 and "warning" not in added.stderr, added.stderr
    assert json.loads(added.stdout)["name"] == "tiny" and json.loads(added.stdout)["config"]["model_type"] == "llama"
    assert [m["name"] for m in json.loads(qlora(tmp_path, "admin", "list-models").stdout)] == ["tiny"]
    no_revision = qlora(tmp_path, "admin", "add-model", "hubbed", "--hub-id", "org/model")
    assert no_revision.returncode == 1 and "needs a revision" in no_revision.stderr


def test_a_database_not_made_yet_is_said_plainly_and_migrate_makes_the_home(tmp_path):
    """Before the first `qlora serve`, QLORA_HOME does not exist: an admin command says the database cannot
    be used and what makes it (it was a page of traceback), and `qlora migrate` makes the home and the schema."""
    home = tmp_path / "not-yet"
    refused = qlora(home, "admin", "create-team", "research")
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert f"the database sqlite:///{home}/qlora.db cannot be used: unable to open database file" in refused.stderr
    assert "`qlora migrate`" in refused.stderr
    assert qlora(home, "migrate").returncode == 0 and (home / "qlora.db").is_file()
    assert oct(home.stat().st_mode & 0o777) == "0o700"
    assert qlora(home, "admin", "create-team", "research").returncode == 0


def test_a_database_a_newer_release_migrated_is_refused_saying_so(tmp_path):
    """Rolled back after an upgrade: `qlora migrate` and the embedded `qlora serve` say the database is newer than
    this release and what to do (exit 2), and leave it as it is; before, both printed a page of traceback ending in
    Alembic's "Can't locate revision identified by ..."."""
    from sqlalchemy import create_engine, text

    from tests.services import free_port

    assert qlora(tmp_path, "migrate").returncode == 0
    engine = create_engine(f"sqlite:///{tmp_path / 'qlora.db'}")
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))  # as a later release leaves it
    said = ("error: the database is at schema 9999, which this release does not know (a newer release migrated it): "
            "run that release, or restore the database")
    for args in (["migrate"], ["serve", "--port", str(free_port())]):
        refused = qlora(tmp_path, *args)
        assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
        assert said in " ".join(refused.stderr.split()), refused.stderr
    with engine.connect() as conn:
        assert conn.scalar(text("SELECT version_num FROM alembic_version")) == "9999"
    engine.dispose()

def test_keys_by_prefix_and_models_a_host_cannot_read(tmp_path):
    assert qlora(tmp_path, "migrate").returncode == 0
    assert qlora(tmp_path, "admin", "create-team", "research").returncode == 0
    made = [qlora(tmp_path, "admin", "create-key", "research", "--json") for _ in range(2)]
    keys = [json.loads(m.stdout) for m in made]
    assert all(k["key"].startswith(k["prefix"]) and k["team"] == "research" for k in keys)

    # Part of a prefix revokes nothing, even where it matches one key alone, and names the keys it starts.
    partial = qlora(tmp_path, "admin", "revoke-key", "qlk_")
    assert partial.returncode == 1 and "it is the start of 2 key prefixes" in partial.stderr
    assert all(k["id"] in partial.stderr for k in keys)
    one = qlora(tmp_path, "admin", "revoke-key", keys[1]["prefix"][:-1])
    assert one.returncode == 1 and "it is the start of 1 key prefix:" in one.stderr
    assert qlora(tmp_path, "admin", "revoke-key", "qlk_nothing").stderr.startswith("error: no API key with id or prefix")
    revoked = qlora(tmp_path, "admin", "revoke-key", keys[0]["prefix"])
    assert revoked.returncode == 0 and json.loads(revoked.stdout)["id"] == keys[0]["id"]
    listed = {k["id"]: k["revoked_at"] for k in json.loads(qlora(tmp_path, "admin", "list-keys", "research").stdout)}
    assert listed[keys[0]["id"]] is not None and listed[keys[1]["id"]] is None

    # Workers resolve a path on their own hosts: registered, with a warning of what this host cannot do.
    elsewhere = qlora(tmp_path, "admin", "add-model", "elsewhere", "--path", str(tmp_path / "models" / "nonexistent"))
    assert elsewhere.returncode == 0, elsewhere.stderr
    assert "warning" in elsewhere.stderr and "config.json is not readable on this host" in elsewhere.stderr
    assert "memory checked" in elsewhere.stderr and json.loads(elsewhere.stdout)["config"] is None
    removed = qlora(tmp_path, "admin", "remove-model", "elsewhere")
    assert removed.returncode == 0 and json.loads(removed.stdout) == {"name": "elsewhere", "removed": True}
    assert json.loads(qlora(tmp_path, "admin", "list-models").stdout) == []
    again = qlora(tmp_path, "admin", "remove-model", "elsewhere", "--force")  # forced, a missing model is still one
    assert again.returncode == 1 and "no registered base model 'elsewhere'" in again.stderr


def test_a_database_url_of_an_unknown_scheme_or_out_of_reach_is_said_plainly(tmp_path):
    """It was a traceback. A scheme the service does not know is refused with the setting (postgres://, as
    many hosts spell it, is read as psycopg's: tests/test_config.py); a database out of reach is named,
    its password hidden."""
    refused = qlora(tmp_path, "admin", "list-keys", "research", env={"QLORA_DATABASE_URL": "mysql://u:secret@h/x"})
    assert refused.returncode == 2 and "Traceback" not in refused.stderr and "secret" not in refused.stderr
    assert "QLORA_DATABASE_URL must be sqlite:///PATH or postgresql+psycopg://" in refused.stderr
    driver = qlora(tmp_path, "admin", "list-keys", "research",
                   env={"QLORA_DATABASE_URL": "postgresql+psycopg://u:secret@127.0.0.1:1/x"})
    assert driver.returncode == 1 and "Traceback" not in driver.stderr and "secret" not in driver.stderr
    assert "postgresql+psycopg://u:***@127.0.0.1:1/x cannot be used" in driver.stderr


def test_status_names_each_queue_its_workers_and_its_wait(tmp_path):
    """`qlora admin status` on the embedded default: the default class's queue with 0 rather than missing,
    and a queue whose job waits while its only worker went silent named on stderr with when it was last heard."""
    from datetime import timedelta

    import app.datasets.tables  # noqa: F401  (the table a job's foreign keys name)
    from app.db import utcnow
    from app.jobs.tables import Job
    from app.operations.workers import WORKER_ALIVE_S, beat
    from app.teams.service import create_team

    assert qlora(tmp_path, "migrate").returncode == 0
    empty = qlora(tmp_path, "admin", "status")
    assert empty.returncode == 0 and empty.stderr == ""
    assert json.loads(empty.stdout)["queues"] == [{"queue": "gpu-default", "gpu_class": "default", "workers_alive": 0,
                                                   "queued": 0, "oldest_wait_s": 0.0, "last_seen": None,
                                                   "stranded": False}]

    with session_scope(Settings(home=tmp_path).database_url) as session:
        team = create_team(session, "research")
        session.add(Job(team_id=team.id, status="queued", base_model="tiny", spec=stored_spec(), queue="gpu-default",
                        created_at=utcnow() - timedelta(minutes=12)))
        beat(session, "gpu-host:gpu0", "gpu-default", utcnow() - timedelta(hours=1))
    with session_scope(Settings(home=tmp_path).database_url) as session:
        session.execute(Worker.__table__.update().values(seen_at=utcnow() - timedelta(seconds=WORKER_ALIVE_S + 600)))

    stranded = qlora(tmp_path, "admin", "status")
    assert stranded.returncode == 0, stranded.stderr
    [queue] = json.loads(stranded.stdout)["queues"]
    assert (queue["workers_alive"], queue["queued"], queue["stranded"]) == (0, 1, True)
    assert queue["last_seen"]["worker"] == "gpu-host:gpu0" and 12 * 60 <= queue["oldest_wait_s"] < 13 * 60
    assert ("no worker alive for queue gpu-default while 1 job waits (the oldest for 12m); its last worker, "
            "gpu-host:gpu0, was heard from 10m ago") in stranded.stderr
    table = qlora(tmp_path, "admin", "status", "--table")
    assert "gpu-default" in table.stdout and "gpu-host:gpu0, 10m ago" in table.stdout


def test_list_teams_and_disabling_a_team_that_leaves(tmp_path):
    """`qlora admin list-teams`, `disable-team` and `enable-team` on the embedded default: JSON on a pipe (as
    GET /admin/teams answers), a table on a terminal; a disabled team's key is refused saying so; the team
    holding the last admin keys that work is not disabled."""
    from app.errors import Unauthorized

    assert qlora(tmp_path, "migrate").returncode == 0
    for name in ("ops", "research"):
        assert qlora(tmp_path, "admin", "create-team", name).returncode == 0
    assert qlora(tmp_path, "admin", "create-key", "ops", "--admin").returncode == 0
    key = qlora(tmp_path, "admin", "create-key", "research").stdout.strip()

    listed = qlora(tmp_path, "admin", "list-teams")
    assert listed.returncode == 0, listed.stderr
    teams = {t["name"]: t for t in json.loads(listed.stdout)}
    assert [t["name"] for t in json.loads(listed.stdout)] == ["ops", "research"]
    assert {k: teams["ops"][k] for k in ("keys_live", "admin_keys_live", "queued", "running", "paused", "disabled")} == {
        "keys_live": 1, "admin_keys_live": 1, "queued": 0, "running": 0, "paused": 0, "disabled": False}
    assert (teams["research"]["gpu_hours_this_month"], teams["research"]["storage_bytes"]) == (0.0, 0)

    last_admin = qlora(tmp_path, "admin", "disable-team", "ops")
    assert last_admin.returncode == 1 and "team 'ops' holds the last admin keys that work" in last_admin.stderr
    missing = qlora(tmp_path, "admin", "disable-team", "nosuch")
    assert missing.returncode == 1 and "no team 'nosuch'" in missing.stderr

    control = qlora(tmp_path, "admin", "disable-team", "research", "--reason", "two\nlines")
    assert control.returncode == 2 and "--reason" in control.stderr and "control characters" in control.stderr
    disabled = qlora(tmp_path, "admin", "disable-team", "research", "--reason", "grant ended [Q3]")
    assert disabled.returncode == 0, disabled.stderr
    answer = json.loads(disabled.stdout)
    assert answer["disabled"] and answer["disabled_at"] and answer["pausing"] == []
    assert answer["disabled_reason"] == "grant ended [Q3]" and answer["disabled_by"].startswith("qlora admin as ")
    url = Settings(home=tmp_path).database_url
    with session_scope(url) as session:
        try:
            authenticate(session, hash_key(key))
            raise AssertionError("a disabled team's key still authenticates")
        except Unauthorized as refused:
            assert refused.code == "team_disabled" and "team 'research' is disabled" in refused.message
    # Its jobs, which its own keys no longer list: as GET /jobs answers (and GET /admin/teams/{team}/jobs).
    import app.datasets.tables  # noqa: F401  (the table a job's foreign keys name)
    from app.jobs.tables import Job

    with session_scope(url) as session:
        research = session.scalars(select(Team).where(Team.name == "research")).one()
        job = Job(team_id=research.id, status="paused", base_model="tiny", spec=stored_spec(), queue="gpu-default",
                  name="[grant] run")
        session.add(job)
        session.flush()
        job_id = job.id
    jobs = qlora(tmp_path, "admin", "list-jobs", "research")
    assert jobs.returncode == 0, jobs.stderr
    assert [(j["id"], j["status"], j["name"]) for j in json.loads(jobs.stdout)] == [(job_id, "paused", "[grant] run")]
    assert json.loads(qlora(tmp_path, "admin", "list-jobs", "research", "--status", "queued").stdout) == []
    jobs_table = qlora(tmp_path, "admin", "list-jobs", "research", "--table").stdout
    assert job_id in jobs_table and "[grant] run" in jobs_table and "paused" in jobs_table
    again = qlora(tmp_path, "admin", "disable-team", "research", "--table").stdout  # as on a terminal, one of each
    assert "disabled: 1 key of it answers 401; 0 queued jobs wait until it is enabled" in " ".join(again.split())
    nobody = qlora(tmp_path, "admin", "list-jobs", "nosuch")
    assert nobody.returncode == 1 and "no team 'nosuch'" in nobody.stderr
    # Past --limit: the older jobs were out of reach. Stderr names the next page; --all reads every page.
    with session_scope(url) as session:
        session.add_all([Job(team_id=research.id, status="cancelled", base_model="tiny", spec=stored_spec(),
                             queue="gpu-default", name=f"older {n}") for n in range(2)])
    first = qlora(tmp_path, "admin", "list-jobs", "research", "--limit", "2")
    [cursor] = re.findall(r"`qlora admin list-jobs research --limit 2 --cursor (\S+)` for the next page", first.stderr)
    rest = json.loads(qlora(tmp_path, "admin", "list-jobs", "research", "--limit", "2", "--cursor", cursor).stdout)
    every = qlora(tmp_path, "admin", "list-jobs", "research", "--all", "--limit", "2")
    assert [j["id"] for j in json.loads(first.stdout) + rest] == [j["id"] for j in json.loads(every.stdout)]
    assert len(rest) == 1 and every.stderr == ""

    table = qlora(tmp_path, "admin", "list-teams", "--table")
    row = next(line for line in table.stdout.splitlines() if "research" in line)
    assert "since " in row and "since " not in next(line for line in table.stdout.splitlines() if "ops" in line)
    assert "grant ended [Q3]" in table.stdout  # as typed: not rich markup
    # On an 80-column terminal the last column, "disabled", was cropped away without a word: the disabled team's
    # row read as blank lines. The counts give way to it now, and the caption names them.
    narrow = qlora(tmp_path, "admin", "list-teams", env={"FORCE_COLOR": "1", "COLUMNS": "80"})
    shown = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", narrow.stdout)
    cells = " ".join(line.split("│")[2].strip() for line in shown.splitlines() if line.startswith("│"))
    assert max(map(len, shown.splitlines())) <= 80 and "grant ended [Q3]" in cells, shown  # whole, if folded
    assert "┃ disabled" in shown and "not shown at this width:" in shown, shown

    enabled = qlora(tmp_path, "admin", "enable-team", "research")
    assert enabled.returncode == 0 and json.loads(enabled.stdout)["disabled"] is False
    with session_scope(url) as session:
        assert authenticate(session, hash_key(key)).team_name == "research"
    text = qlora(tmp_path, "admin", "enable-team", "research", "--table")
    assert text.stdout.startswith("team 'research' enabled")


def test_list_and_prune_the_quantized_base_cache(tmp_path):
    """An operator sees each cached quantized base (model, versions, size, created, last used) and prunes those
    unused for --older-than (or QLORA_QUANTIZED_CACHE_KEEP_DAYS), row and object."""
    from datetime import timedelta

    from sqlalchemy import update

    from app.db import utcnow
    from app.jobs import repository
    from app.jobs.tables import QuantizedBase
    from app.storage.base import make_key, storage_from_settings

    assert qlora(tmp_path, "migrate").returncode == 0
    settings = Settings(home=tmp_path)
    storage = storage_from_settings(settings)
    entries = {}
    for model, transformers, unused_days in (("llama-65b", "4.44.0", 45), ("llama-8b", "4.46.1", 3)):
        with storage.writer(make_key("shared", "quantized-bases")) as writer:
            writer.write(b"4-bit weights of " + model.encode())
            stored = writer.commit()
        identity = {"model": model, "path": f"/models/{model}", "hub_id": None, "revision": None, "weights": [],
                    "quantization": {"bits": 4, "quant_type": "nf4", "double_quant": True}, "gpu_class": "gpu-a100",
                    "transformers": transformers, "bitsandbytes": "0.44.1"}
        with session_scope(settings.database_url) as session:
            repository.add_quantized_base(session, model.ljust(64, "0"), stored.key, stored.size, stored.sha256, identity)
            session.flush()
            session.execute(update(QuantizedBase).where(QuantizedBase.storage_key == stored.key)
                            .values(created_at=utcnow() - timedelta(days=unused_days + 10),
                                    last_used_at=utcnow() - timedelta(days=unused_days)))
        entries[model] = stored

    listed = qlora(tmp_path, "admin", "list-quantized-bases")
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)  # least recently used first
    assert [(r["model"], r["transformers"], r["bitsandbytes"], r["quantization"], r["bytes"]) for r in rows] == [
        ("llama-65b", "4.44.0", "0.44.1", "4-bit nf4", entries["llama-65b"].size),
        ("llama-8b", "4.46.1", "0.44.1", "4-bit nf4", entries["llama-8b"].size)]
    assert all(r["created_at"] < r["last_used_at"] < r["prune_after"] for r in rows)
    table = qlora(tmp_path, "admin", "list-quantized-bases", "--table", env={"COLUMNS": "200"})
    assert "last used" in table.stdout and "llama-65b" in table.stdout and "4.46.1" in table.stdout
    assert "2 quantized bases, 51 bytes in storage" in table.stdout

    for refused in (("--older-than", "0"), ("--older-than", "soon")):
        bad = qlora(tmp_path, "admin", "prune-quantized-bases", *refused)
        assert bad.returncode == 2 and "--older-than" in bad.stderr
    keep_for_ever = qlora(tmp_path, "admin", "prune-quantized-bases", env={"QLORA_QUANTIZED_CACHE_KEEP_DAYS": "0"})
    assert keep_for_ever.returncode == 2 and "QLORA_QUANTIZED_CACHE_KEEP_DAYS is 0" in keep_for_ever.stderr
    assert storage.exists(entries["llama-65b"].key)

    nothing = qlora(tmp_path, "admin", "prune-quantized-bases", "--older-than", "60")
    assert nothing.returncode == 0 and json.loads(nothing.stdout)["count"] == 0
    pruned = qlora(tmp_path, "admin", "prune-quantized-bases", "--table")  # the default: 30 days
    assert pruned.returncode == 0, pruned.stderr
    assert "Pruned 1 quantized base unused since" in pruned.stdout and "llama-65b" in pruned.stdout
    assert not storage.exists(entries["llama-65b"].key) and storage.exists(entries["llama-8b"].key)
    assert [r["model"] for r in json.loads(qlora(tmp_path, "admin", "list-quantized-bases").stdout)] == ["llama-8b"]

    by_hours = qlora(tmp_path, "admin", "prune-quantized-bases", "--older-than", "48h")
    assert by_hours.returncode == 0
    report = json.loads(by_hours.stdout)
    assert (report["count"], report["bytes"], [e["model"] for e in report["pruned"]]) == (1, entries["llama-8b"].size, ["llama-8b"])
    assert not storage.exists(entries["llama-8b"].key) and report["left_in_storage"] == []
