"""What makes a request sent again with its Idempotency-Key "the same request" (app/idempotency/service.py): its
JSON value, not how its client wrote it. `"max_steps": 4` retried as `4.0` (or `4e0`) is the same job; a client's
own JSON writer decides which it sends (Python's writes 4.0 for a float, JavaScript's never does)."""

from __future__ import annotations

import pytest

from app.idempotency.service import requested


def digest(body) -> str:
    keyed = requested("key-1", "POST /jobs", body)
    assert keyed is not None
    return keyed.request_sha256


def job(**training) -> dict:
    return {"dataset_id": "d", "base_model": "tiny", "training": {"max_steps": 4, "learning_rate": 1e-4, **training},
            "metadata": {"run": "7"}}


@pytest.mark.parametrize("written", [4.0, 4e0, 400e-2], ids=["4.0", "4e0", "400e-2"])
def test_a_whole_number_written_either_way_is_the_same_request(written):
    assert digest(job(max_steps=written)) == digest(job())


@pytest.mark.parametrize("other", [job(max_steps=4.5), job(max_steps="4"), job(max_steps=5), job(seed=None),
                                   {**job(), "metadata": {"run": 7}}, job(learning_rate=2e-4),
                                   job(max_steps=True)])
def test_any_other_difference_is_another_request(other):
    assert digest(other) != digest(job())


def test_the_same_values_in_another_order_or_list_shape_are_the_same_request():
    assert digest({"b": [1.0, {"y": 2.0, "x": 0.5}], "a": -0.0}) == digest({"a": 0, "b": [1, {"x": 0.5, "y": 2}]})
    assert digest({"b": [1, 2]}) != digest({"b": [2, 1]})  # a list's order is its value
