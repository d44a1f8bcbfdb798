"""`qlora admin set-quota` and `show-quota`: straight against the database, as the other admin
commands; JSON on a pipe (the same report GET /admin/teams/{team}/quota answers), a table on a terminal."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

from tests.deployment import ROOT


def qlora(env: dict[str, str], *args: str, terminal: bool = False) -> subprocess.CompletedProcess:
    env = {**env, **({"FORCE_COLOR": "1", "COLUMNS": "160"} if terminal else {})}
    return subprocess.run([sys.executable, "-m", "app.cli", *args], cwd=ROOT, env=env, capture_output=True, text=True)


def test_set_quota_and_show_quota_on_the_embedded_default(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("QLORA_")} | {"QLORA_HOME": str(tmp_path)}
    assert qlora(env, "migrate").returncode == 0
    assert qlora(env, "admin", "create-team", "research").returncode == 0

    shown = qlora(env, "admin", "show-quota", "research")
    assert shown.returncode == 0, shown.stderr
    report = json.loads(shown.stdout)
    assert report["quota"] == {"weight": 1.0, "max_running": None, "max_queued": 1000,
                               "gpu_hours_per_month": None, "storage_gib": None}
    assert report["use"] == {"running": 0, "queued": 0, "gpu_hours_this_month": 0.0, "storage_bytes": 0}

    made = qlora(env, "admin", "set-quota", "research", "--weight", "2.5", "--max-running", "3",
                 "--max-queued", "0", "--gpu-hours-per-month", "40", "--storage-gib", "100")
    assert made.returncode == 0, made.stderr
    own = {"weight": 2.5, "max_running": 3, "max_queued": 0, "gpu_hours_per_month": 40.0, "storage_gib": 100.0}
    assert json.loads(made.stdout)["own"] == own == json.loads(made.stdout)["quota"]

    reset = qlora(env, "admin", "set-quota", "research", "--reset", "weight", "--reset", "max-queued")
    assert reset.returncode == 0, reset.stderr
    after = json.loads(qlora(env, "admin", "show-quota", "research").stdout)
    assert after["own"] == {**own, "weight": None, "max_queued": None}
    assert after["quota"] == {**own, "weight": 1.0, "max_queued": 1000}

    table = qlora(env, "admin", "show-quota", "research", terminal=True)
    assert table.returncode == 0 and "team research" in table.stdout
    lines = {line.split()[1]: line for line in table.stdout.splitlines() if line.startswith("│")}
    assert "3" in lines["max-running"] and "team" in lines["max-running"]
    assert "1000" in lines["max-queued"] and "default" in lines["max-queued"]


def test_the_table_shows_each_quota_as_the_json_holds_it(tmp_path):
    """The table wrote numbers with :g, so that --max-queued 1000000 read "1e+06" and --storage-gib 1234567
    read "1.23457e+06": another number than the one stored and in the JSON."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("QLORA_")} | {"QLORA_HOME": str(tmp_path)}
    assert qlora(env, "migrate").returncode == 0
    assert qlora(env, "admin", "create-team", "research").returncode == 0
    made = qlora(env, "admin", "set-quota", "research", "--weight", "10", "--max-queued", "1000000",
                 "--storage-gib", "1234567", "--gpu-hours-per-month", "0.5", "--max-running", "3.0")
    assert made.returncode == 0, made.stderr
    assert json.loads(made.stdout)["own"] == {"weight": 10, "max_running": 3, "max_queued": 1_000_000,
                                              "gpu_hours_per_month": 0.5, "storage_gib": 1_234_567}
    table = qlora(env, "admin", "show-quota", "research", terminal=True)
    cells = {line.split("│")[1].strip(): line.split("│")[2].strip() for line in table.stdout.splitlines()
             if line.startswith("│")}
    assert cells == {"weight": "10", "max-running": "3", "max-queued": "1000000", "gpu-hours-per-month": "0.5",
                     "storage-gib": "1234567"}


def test_set_quota_refuses_what_it_cannot_store(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("QLORA_")} | {"QLORA_HOME": str(tmp_path)}
    assert qlora(env, "migrate").returncode == 0
    assert qlora(env, "admin", "create-team", "research").returncode == 0

    for weight in ("0", "1e-320"):  # 1e-320 was taken: every share of the team inf (tests/fast/test_quota_weight.py)
        out_of_range = qlora(env, "admin", "set-quota", "research", "--weight", weight)
        assert out_of_range.returncode == 1 and "weight: Input should be greater than or equal to 0.01" in out_of_range.stderr
        assert "allowed: a number from 0.01 to 1000" in out_of_range.stderr
    too_many = qlora(env, "admin", "set-quota", "research", "--max-queued", "10000000")
    assert too_many.returncode == 1 and "max_queued" in too_many.stderr

    missing = qlora(env, "admin", "set-quota", "nobody", "--weight", "2")
    assert missing.returncode == 1 and "no team 'nobody'" in missing.stderr
    assert qlora(env, "admin", "show-quota", "nobody").returncode == 1

    nothing = qlora(env, "admin", "set-quota", "research")
    assert nothing.returncode == 2 and "nothing to change" in nothing.stderr
    unknown = qlora(env, "admin", "set-quota", "research", "--reset", "gpus")
    assert unknown.returncode == 2 and "no such quota" in unknown.stderr
    both = qlora(env, "admin", "set-quota", "research", "--weight", "2", "--reset", "weight")
    assert both.returncode == 2 and "contradict" in both.stderr

    unchanged = json.loads(qlora(env, "admin", "show-quota", "research").stdout)
    assert set(unchanged["own"].values()) == {None}


def test_a_quota_set_from_the_cli_holds_in_the_deployment(deployment):
    """The CLI writes the deployment's database; the API reads it at the next request."""
    team = f"cli-{uuid.uuid4().hex[:8]}"
    with deployment.client(deployment.team_key(team)) as member:
        made = qlora(deployment.env, "admin", "set-quota", team, "--max-queued", "4", "--storage-gib", "0.5")
        assert made.returncode == 0, made.stderr
        quota = member.get("/quota").json()
        assert quota == json.loads(made.stdout)
        assert quota["quota"]["max_queued"] == 4 and quota["own"]["storage_gib"] == 0.5

    # A count as a whole float is taken by the API as the CLI takes it (--max-running 3.0); it was refused
    # there ("Input should be a valid integer") while the CLI stored 3.
    with deployment.client(deployment.team_key(f"admin-{team}", admin=True)) as admin:
        put = admin.put(f"/admin/teams/{team}/quota", json={"max_running": 3.0, "max_queued": 10})
        assert put.status_code == 200, put.text
        assert (put.json()["own"]["max_running"], put.json()["own"]["max_queued"]) == (3, 10)
        half = admin.put(f"/admin/teams/{team}/quota", json={"max_running": 3.5})
        assert half.status_code == 422 and "max_running" in half.text
    cli = qlora(deployment.env, "admin", "set-quota", team, "--max-running", "3.0")
    assert json.loads(cli.stdout)["own"] == put.json()["own"]
