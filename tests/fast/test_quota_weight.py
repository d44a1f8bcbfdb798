"""A team's weight has a stated range (app/config.py, MIN_WEIGHT to MAX_WEIGHT) wherever it is set: a weight of
1e-320 was taken (the range was only > 0), and every share of that team, GPU time used divided by its weight, was
inf: such teams tied however much each had used."""

from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from app.config import MAX_WEIGHT, MIN_WEIGHT
from app.quotas.service import effective
from app.scheduling.policy import TeamShare
from app.teams.service import create_key
from app.teams.tables import Team
from tests.fast.conftest import make_settings


@pytest.fixture
def admin(client, session):
    key = create_key(session, "team-a", admin=True)[1]
    session.commit()
    client.headers["Authorization"] = f"Bearer {key}"
    return client


@pytest.mark.parametrize("weight", [1e-320, 0.005, 0, 1000.5])
def test_a_weight_out_of_its_range_is_refused_naming_the_range_and_nothing_changes(admin, weight):
    answer = admin.put("/admin/teams/team-a/quota", json={"weight": weight})
    assert answer.status_code == 422, answer.text
    [detail] = answer.json()["error"]["details"]
    assert detail["field"] == "weight" and "allowed: a number from 0.01 to 1000, or null for the default" in detail["message"]
    assert admin.get("/admin/teams/team-a/quota").json()["own"]["weight"] is None


@pytest.mark.parametrize("weight", [MIN_WEIGHT, 2.5, MAX_WEIGHT])
def test_a_weight_in_its_range_is_taken(admin, weight):
    answer = admin.put("/admin/teams/team-a/quota", json={"weight": weight})
    assert answer.status_code == 200, answer.text
    assert answer.json()["quota"]["weight"] == answer.json()["own"]["weight"] == weight


def test_a_weight_stored_before_the_range_counts_as_the_least_and_shares_stay_ordered_by_use(session, settings):
    """A database that took 1e-320 before the range keeps it (`own` shows it); in force, for the scheduler and
    `quota`, it is MIN_WEIGHT, so its team's share is a number that grows with the GPU time it used."""
    team = Team(name="tiny", weight=1e-320)
    in_force = effective(settings, team).weight
    assert in_force == MIN_WEIGHT
    light, heavy = (TeamShare(name, in_force, recent_gpus=used) for name, used in (("light", 0.5), ("heavy", 3.0)))
    assert math.isfinite(heavy.share) and light.share < heavy.share


@pytest.mark.parametrize("weight", [1e-320, 0.0, 1001.0, math.inf])
def test_a_default_weight_out_of_the_range_stops_the_configuration(tmp_path, weight):
    with pytest.raises(ValidationError, match="default_weight"):
        make_settings(tmp_path, default_weight=weight)
