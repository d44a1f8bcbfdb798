"""GET /usage and `qlora usage` against the real deployment: attempts written straight into the ledger
(job_attempts) with known claim and end times, one over midnight, one after a pause, one still
running, for two teams; then what each team sees by job and by day, a window that cuts attempts,
isolation between teams, the admin's view of all, bad windows, and storage after an upload."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import pytest

from app.db import session_scope
from app.jobs.tables import Job, JobAttempt
from app.teams import repository as teams
from tests.deployment import ROOT, stored_spec, upload

T = datetime(2025, 3, 1, tzinfo=UTC)  # a month long past: nothing else of these teams falls in it
HOUR = 3600.0


def at(day: int, hour: float) -> datetime:
    return T + timedelta(days=day - 1, hours=hour)


def add_job(deployment, team: str, name: str, status: str, attempts: list[tuple[datetime, datetime | None, int]],
            job_tokens: int = 0, tokens_at_claim: int = 0) -> str:
    """A job and its attempts (claimed, ended or None while running, tokens of an ended one), as the
    claim and the end of each attempt write them."""
    with session_scope(deployment.settings.database_url) as session:
        team_row = teams.team_by_name(session, team)
        assert team_row is not None
        job = Job(team_id=team_row.id, name=name, status=status, spec=stored_spec(), base_model="tiny", queue="nobody",
                  attempt=len(attempts), trained_tokens=job_tokens)
        session.add(job)
        session.flush()
        for number, (claimed, ended, tokens) in enumerate(attempts, start=1):
            session.add(JobAttempt(job_id=job.id, team_id=team_row.id, attempt=number, queue="nobody", worker="w",
                                   claimed_at=claimed, ended_at=ended, outcome=None if ended is None else "paused",
                                   trained_tokens=tokens, tokens_at_claim=tokens_at_claim if ended is None else 0))
        return job.id


@pytest.fixture(scope="module")
def keys(deployment):
    return {"a": deployment.team_key("usage-a"), "b": deployment.team_key("usage-b"),
            "admin": deployment.team_key("usage-ops", admin=True)}


@pytest.fixture(scope="module")
def clients(deployment, keys):
    return {name: deployment.client(key) for name, key in keys.items()}


@pytest.fixture(scope="module")
def ledger(deployment, keys):
    """Team A: a job that ran 22:00-02:00 over midnight, paused 8 hours, ran 10:00-11:00 and succeeded;
    a half-hour failed job the next day; a job running for the last two hours. Team B: one 3-hour job."""
    now = datetime.now(UTC)
    running_claim = now - timedelta(hours=2)
    return {
        "now": now,
        "running_claim": running_claim,
        "midnight": add_job(deployment, "usage-a", "a-midnight", "succeeded",
                            [(at(1, 22), at(2, 2), 4000), (at(2, 10), at(2, 11), 1000)]),
        "short": add_job(deployment, "usage-a", "a-short", "failed", [(at(3, 0.5), at(3, 1), 300)]),
        "running": add_job(deployment, "usage-a", "a-running", "running", [(running_claim, None, 0)],
                           job_tokens=9000, tokens_at_claim=1000),
        "b": add_job(deployment, "usage-b", "b-job", "succeeded", [(at(2, 12), at(2, 15), 700)]),
    }


def get_usage(client, **params) -> dict:
    response = client.get("/usage", params=params)
    assert response.status_code == 200, response.text
    return response.json()


def only_team(report: dict) -> dict:
    assert len(report["teams"]) == 1, report
    return report["teams"][0]


def test_by_job_and_by_day_with_midnight_split_and_pause_excluded(clients, ledger):
    report = get_usage(clients["a"], **{"from": "2025-03-01", "to": "2025-03-04"})
    assert report["from"] == "2025-03-01T00:00:00Z" and report["to"] == "2025-03-04T00:00:00Z"
    team = only_team(report)
    assert team["team"] == "usage-a"
    assert team["gpu_seconds"] == pytest.approx(5.5 * HOUR) and team["gpu_hours"] == pytest.approx(5.5)
    assert team["trained_tokens"] == 5300
    assert team["jobs"] == 2 and not team["by_job_truncated"]
    # Most GPU time first; the 8 paused hours between the two attempts do not count.
    assert [(j["job_id"], j["name"], j["status"], j["gpu_seconds"], j["trained_tokens"], j["attempts"])
            for j in team["by_job"]] == [(ledger["midnight"], "a-midnight", "succeeded", 5 * HOUR, 5000, 2),
                                         (ledger["short"], "a-short", "failed", 0.5 * HOUR, 300, 1)]
    # 22:00-02:00 is two hours on each side of midnight; its tokens count the day it ended.
    assert team["by_day"] == [
        {"date": "2025-03-01", "gpu_seconds": 2 * HOUR, "trained_tokens": 0},
        {"date": "2025-03-02", "gpu_seconds": 3 * HOUR, "trained_tokens": 5000},
        {"date": "2025-03-03", "gpu_seconds": 0.5 * HOUR, "trained_tokens": 300},
    ]


def test_the_window_cuts_attempts_at_its_edges(clients, ledger):
    # [01:00, 10:30) on March 2nd, given as 03:00 at UTC+2: the last hour of the first attempt and the
    # first half hour of the second. Tokens go with where an attempt ended: the first's in, the second's out.
    team = only_team(get_usage(clients["a"], **{"from": "2025-03-02T03:00:00+02:00", "to": "2025-03-02T10:30:00Z"}))
    assert team["gpu_seconds"] == pytest.approx(1.5 * HOUR)
    assert [(j["job_id"], j["gpu_seconds"], j["trained_tokens"], j["attempts"]) for j in team["by_job"]] == [
        (ledger["midnight"], 1.5 * HOUR, 4000, 2)]
    assert team["by_day"] == [{"date": "2025-03-02", "gpu_seconds": 1.5 * HOUR, "trained_tokens": 4000}]
    # A window in the pause holds nothing.
    paused = only_team(get_usage(clients["a"], **{"from": "2025-03-02T03:00:00Z", "to": "2025-03-02T09:00:00Z"}))
    assert paused["gpu_seconds"] == 0 and paused["by_job"] == [] and paused["by_day"] == []


def test_a_running_attempt_counts_up_to_now(clients, ledger):
    since = ledger["running_claim"] - timedelta(hours=1)
    report = get_usage(clients["a"], **{"from": since.isoformat()})  # to: now
    as_of = datetime.fromisoformat(report["as_of"])
    assert report["to"] == report["as_of"]
    team = only_team(report)
    expected = (as_of - ledger["running_claim"]).total_seconds()
    assert 2 * HOUR <= expected < 2 * HOUR + 120
    running = next(j for j in team["by_job"] if j["job_id"] == ledger["running"])
    assert running["status"] == "running" and running["attempts"] == 1
    assert running["gpu_seconds"] == pytest.approx(expected, abs=0.01)
    assert running["trained_tokens"] == 8000  # the job's 9000 less the 1000 it had when this attempt was claimed
    assert sum(d["gpu_seconds"] for d in team["by_day"]) == pytest.approx(expected, abs=0.01)
    assert team["by_day"][-1]["date"] == as_of.date().isoformat() and team["by_day"][-1]["trained_tokens"] == 8000
    if ledger["running_claim"].date() != as_of.date():  # the two hours crossed midnight: split there
        assert [d["date"] for d in team["by_day"]] == [ledger["running_claim"].date().isoformat(), as_of.date().isoformat()]

    # A window wholly in the future: a running attempt held no GPU there, and is not listed with 0.
    ahead = get_usage(clients["a"], **{"from": (as_of + timedelta(days=30)).isoformat(),
                                       "to": (as_of + timedelta(days=31)).isoformat()})
    assert ledger["running"] not in [j["job_id"] for j in only_team(ahead)["by_job"]]

    # By default: this month (UTC) up to now.
    default = get_usage(clients["a"])
    assert default["from"] == as_of.replace(day=1, hour=0, minute=0, second=0, microsecond=0).isoformat().replace("+00:00", "Z")
    assert default["to"] == default["as_of"]
    if ledger["running_claim"] >= datetime.fromisoformat(default["from"]):
        assert ledger["running"] in [j["job_id"] for j in only_team(default)["by_job"]]


def test_each_team_sees_its_own_and_all_teams_needs_an_admin_key(clients, ledger):
    window = {"from": "2025-03-01", "to": "2025-03-04"}
    b = only_team(get_usage(clients["b"], **window))
    assert b["team"] == "usage-b"
    assert [(j["job_id"], j["gpu_seconds"], j["trained_tokens"]) for j in b["by_job"]] == [(ledger["b"], 3 * HOUR, 700)]
    assert b["by_day"] == [{"date": "2025-03-02", "gpu_seconds": 3 * HOUR, "trained_tokens": 700}]
    a_jobs = [j["job_id"] for j in only_team(get_usage(clients["a"], **window))["by_job"]]
    assert ledger["b"] not in a_jobs and ledger["midnight"] not in [j["job_id"] for j in b["by_job"]]

    for team in ("a", "b"):
        refused = clients[team].get("/usage", params={**window, "all_teams": "true"})
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "forbidden"
        assert "admin key" in refused.json()["error"]["message"]

    # An admin key answers for its own team, and with all_teams for every team, most GPU time first.
    assert only_team(get_usage(clients["admin"], **window))["team"] == "usage-ops"
    every = {t["team"]: t for t in get_usage(clients["admin"], **window, all_teams="true")["teams"]}
    assert {"usage-a", "usage-b", "usage-ops"} <= every.keys()
    assert every["usage-a"]["gpu_seconds"] == pytest.approx(5.5 * HOUR)
    assert every["usage-b"]["gpu_seconds"] == pytest.approx(3 * HOUR)
    assert every["usage-ops"]["gpu_seconds"] == 0 and every["usage-ops"]["by_job"] == []
    hours = [t["gpu_seconds"] for t in get_usage(clients["admin"], **window, all_teams="true")["teams"]]
    assert hours == sorted(hours, reverse=True)


@pytest.mark.parametrize("params, field, words", [
    ({"from": "yesterday"}, "from", "not an ISO 8601 date"),
    ({"to": "2025-13-01"}, "to", "not an ISO 8601 date"),
    ({"from": "2025-03-05", "to": "2025-03-01"}, "to", "must be before to"),
    ({"from": "2025-03-01", "to": "2025-03-01"}, "to", "must be before to"),
    ({"to": "2020-01-01"}, "to", "must be before to"),  # from: the start of this month, after it
    ({"from": "2024-01-01", "to": "2025-03-01"}, "from", "at most 366 days"),
    ({"from": "2000-01-01"}, "from", "at most 366 days"),  # to: now
])
def test_a_bad_window_is_422_naming_the_field(clients, params, field, words):
    response = clients["a"].get("/usage", params=params)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid" and words in error["message"]
    assert [d["field"] for d in error["details"]] == [field]


def test_a_leap_year_is_one_window(clients):
    assert clients["a"].get("/usage", params={"from": "2024-01-01", "to": "2025-01-01"}).status_code == 200


def test_storage_counts_an_uploaded_dataset(deployment, clients, demo_data):
    a = deployment.client(deployment.team_key("usage-storage"))
    assert only_team(get_usage(a))["storage_bytes"] == 0
    dataset = upload(a, demo_data["validation"]).json()
    assert only_team(get_usage(a))["storage_bytes"] == dataset["bytes"] == demo_data["validation"].stat().st_size
    assert only_team(get_usage(clients["b"]))["storage_bytes"] == 0  # not another team's


def test_the_openapi_schema_documents_the_answer(deployment):
    schema = deployment.client(None).get("/openapi.json").json()
    operation = schema["paths"]["/usage"]["get"]
    assert {"from", "to", "all_teams"} <= {p["name"] for p in operation["parameters"]}
    assert operation["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/UsageReport")
    team = schema["components"]["schemas"]["TeamUsage"]["properties"]
    assert {"gpu_seconds", "gpu_hours", "trained_tokens", "storage_bytes", "by_job", "by_day"} <= team.keys()


# ---------------------------------------------------------------- qlora usage


def qlora(deployment, key: str, *args: str, tmp_path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in deployment.env.items() if not k.startswith("QLORA_")}
    env |= {"QLORA_HOME": str(tmp_path), "QLORA_URL": deployment.url, "QLORA_API_KEY": key}
    return subprocess.run([sys.executable, "-m", "app.cli", "usage", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)


def test_qlora_usage_prints_the_team_by_day_and_by_job_or_json_on_a_pipe(deployment, keys, ledger, tmp_path):
    shown = qlora(deployment, keys["a"], "--from", "2025-03-01", "--to", "2025-03-04", "--table", tmp_path=tmp_path)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert any("usage-a" in line and "5.50" in line and "5,300" in line for line in lines), shown.stdout
    for day, hours, tokens in (("2025-03-01", "2.00", "0"), ("2025-03-02", "3.00", "5,000"), ("2025-03-03", "0.50", "300")):
        assert any(day in line and hours in line and tokens in line for line in lines), shown.stdout
    midnight = next(line for line in lines if ledger["midnight"] in line)
    assert "a-midnight" in midnight and "succeeded" in midnight and "5.00" in midnight and "5,000" in midnight
    assert ledger["b"] not in shown.stdout

    # A pipe gets the API's answer as JSON (--json asks for it on a terminal too).
    as_json = qlora(deployment, keys["a"], "--from", "2025-03-01", "--to", "2025-03-04", tmp_path=tmp_path)
    assert as_json.returncode == 0, as_json.stderr
    answer = json.loads(as_json.stdout)
    assert only_team(answer)["gpu_seconds"] == pytest.approx(5.5 * HOUR)
    assert [j["job_id"] for j in only_team(answer)["by_job"]] == [ledger["midnight"], ledger["short"]]


def test_qlora_usage_all_teams_and_its_errors(deployment, keys, ledger, tmp_path):
    everyone = qlora(deployment, keys["admin"], "--from", "2025-03-01", "--to", "2025-03-04", "--all-teams", "--table",
                     tmp_path=tmp_path)
    assert everyone.returncode == 0, everyone.stderr
    rows = {line.split("│")[1].strip(): line for line in everyone.stdout.splitlines() if line.count("│") > 2}
    assert "5.50" in rows["usage-a"] and "3.00" in rows["usage-b"]
    assert "by job" not in everyone.stdout  # one row per team, no team's jobs

    refused = qlora(deployment, keys["a"], "--all-teams", tmp_path=tmp_path)
    assert refused.returncode == 1 and "admin key" in refused.stderr
    bad = qlora(deployment, keys["a"], "--from", "last week", tmp_path=tmp_path)
    assert bad.returncode == 1 and "from: 'last week' is not an ISO 8601 date" in bad.stderr
    assert "\n  from: " in bad.stderr  # the field, on its own line
