"""The dashboard's Usage page in headless Chromium: this month's GPU-hours against the team's budget,
its jobs running and queued against their limits, its storage, and the month by day and by job, all
as GET /quota and GET /usage answer them."""

from __future__ import annotations

import calendar
import re
from datetime import UTC, datetime, timedelta

import pytest
from playwright.sync_api import expect

from app.db import session_scope
from app.teams import repository as teams
from tests.deployment import upload
from tests.service.test_dashboard import go, page, sign_in  # noqa: F401 (page: a fixture)
from tests.service.test_usage import add_job

TEAM = "usage-dashboard"


@pytest.fixture(scope="module")
def usage_team(deployment, demo_data):
    """A team with a quota of its own, an hour of GPU time that ended a few minutes ago, a job running
    for half an hour, one queued, and a dataset."""
    key = deployment.team_key(TEAM)
    with session_scope(deployment.settings.database_url) as session:
        team = teams.team_by_name(session, TEAM)
        assert team is not None
        team.gpu_hours_per_month, team.max_running, team.max_queued, team.storage_gib = 10.0, 2, 5, 1.0
    now = datetime.now(UTC)
    jobs = {
        "done": add_job(deployment, TEAM, "finished-run", "succeeded",
                        [(now - timedelta(minutes=65), now - timedelta(minutes=5), 12_000)]),
        "running": add_job(deployment, TEAM, "long-run", "running", [(now - timedelta(minutes=30), None, 0)],
                           job_tokens=3_000),
        "queued": add_job(deployment, TEAM, "waiting-run", "queued", []),
    }
    client = deployment.client(key)
    assert upload(client, demo_data["validation"]).status_code == 201
    return {"key": key, "client": client, "jobs": jobs}


def test_the_usage_page_shows_use_against_the_quota(page, usage_team):  # noqa: F811
    sign_in(page, usage_team["key"])
    go(page, "Usage")
    expect(page).to_have_url(re.compile(r"#/usage$"))
    expect(page.get_by_role("heading", name="Usage", exact=True)).to_be_visible()

    quota = usage_team["client"].get("/quota").json()
    usage = usage_team["client"].get("/usage").json()
    team = usage["teams"][0]
    expect(page.locator("#quota-card .meta")).to_contain_text(f"team {TEAM}")
    expect(page.locator("#meter-gpu-hours")).to_contain_text(re.compile(r"\d+\.\d\d h of 10 h"))
    assert float(page.get_by_role("meter", name="GPU-hours this month").get_attribute("aria-valuenow")) > 0.4
    expect(page.locator("#meter-running")).to_contain_text("1 of 2")
    expect(page.locator("#meter-queued")).to_contain_text("1 of 5")
    stored = quota["use"]["storage_bytes"]
    assert stored == team["storage_bytes"] > 0
    expect(page.locator("#meter-storage")).to_contain_text(f"{stored / 1024:.1f} KiB of 1.0 GiB")

    # One bar per day of the month; today's holds the GPU time.
    as_of = datetime.fromisoformat(usage["as_of"])
    bars = page.locator("#usage-by-day rect.day-bar")
    expect(bars).to_have_count(calendar.monthrange(as_of.year, as_of.month)[1])
    today = page.locator(f"#usage-by-day rect.day-bar[data-date='{as_of.date().isoformat()}']")
    assert float(today.get_attribute("height")) > 0
    expect(today.locator("title")).to_contain_text("GPU-hours")

    # The month's jobs with the most GPU time first: the finished hour, then the running half hour.
    rows = page.locator("#usage-jobs-table tbody tr")
    expect(rows).to_have_count(2)
    expect(rows.nth(0)).to_have_attribute("data-job-id", usage_team["jobs"]["done"])
    expect(rows.nth(0)).to_contain_text("finished-run")
    expect(rows.nth(0)).to_contain_text("12,000")
    expect(rows.nth(1)).to_contain_text("long-run")
    expect(rows.nth(1).locator(".badge")).to_have_text("running")
    page.screenshot(path="/tmp/usage.png", full_page=True)

    # A queued job's page says where it stands in its class, as GET /jobs/{id} does.
    queued = usage_team["client"].get(f"/jobs/{usage_team['jobs']['queued']}").json()
    page.goto(page.url.split("#")[0] + f"#/jobs/{queued['id']}")
    # Its team's running job has logged no training step yet, so it counts for the rest of its time limit, more than
    # the team's 10 GPU-hours (docs/scheduling.md, The budget and the jobs running): the budget holds it, and says so.
    assert queued["waiting_for"] == "gpu_hours_per_month", queued
    waiting = "your team's monthly GPU-hours budget"
    detail = f": {queued['waiting_detail']}" if queued["waiting_detail"] else ""
    expect(page.locator("#progress-meta")).to_have_text(
        f"queued · position {queued['queue_position']} · waiting for {waiting}{detail}")
