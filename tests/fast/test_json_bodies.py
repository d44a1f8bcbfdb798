"""A JSON body's bound on values (app/routing.py, MAX_JSON_VALUES) holds before the body is parsed: a body
of millions of tiny values costs the API what its bytes cost, not what millions of Python objects cost, and
the count reads strings as strings (their commas, colons and escaped quotes are no values). A number too long
for the parser is refused by its field's own check, naming the field and its range."""

from __future__ import annotations

import codecs
import json
import math
import sys
import tracemalloc

import pytest
from fastapi.testclient import TestClient
from pydantic_core import from_json

from app.routing import MAX_JSON_VALUES, NUMBER_OUT_OF_RANGE, PARSE_ON_LOOP_BYTES, checked_json
from app.teams.service import create_key
from worker.training.spec import FROM_JSON_MAX_DIGITS


def post(client: TestClient, body: bytes):
    return client.post("/jobs", content=body, headers={"Content-Type": "application/json"})


def test_millions_of_tiny_values_are_refused_before_they_are_parsed(client):
    """14 MiB of `[{}, {}, ...]` was parsed into five million dicts before its 413: 376 MiB of the API's
    memory and a second of its event loop per request (measured with 8 at once against `qlora serve`: a
    /health poll meanwhile waited 3.7 s). Refused from its bytes, it costs a few copies of them."""
    body = b"[" + b"{}," * 5_000_000 + b"{}]"
    post(client, b"{}")  # the app's own first-request allocations, outside the measure
    tracemalloc.start()
    try:
        response = post(client, body)
        _now, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert response.status_code == 413, response.text
    assert f"more than {MAX_JSON_VALUES:,} values" in response.json()["error"]["message"]
    # The request's bytes (the client's and the server's copies of them) and the scan's copy: parsed, 26 times them.
    assert peak < 6 * len(body), f"peak {peak / 2**20:.0f} MiB for a body of {len(body) / 2**20:.0f} MiB"


def values_body(values: int) -> bytes:
    """A job body (invalid as a job, answered 422) holding exactly `values` values, keys counted as the bound
    counts them: the two objects, their 4 keys, 2 strings, the prompts list, and the prompts. Each prompt
    holds commas, colons, escaped quotes and backslashes, which are no values."""
    prompts = ['a, b: "c", d:\\ ,,::' + '\\"' * (i % 4) for i in range(values - 9)]
    return json.dumps({"dataset_id": "x", "base_model": "tiny", "eval": {"prompts": prompts}}).encode()


def test_the_bound_counts_values_not_the_separators_in_strings(client):
    at_limit = values_body(MAX_JSON_VALUES)
    assert at_limit.count(b",") + at_limit.count(b":") > 5 * MAX_JSON_VALUES  # most of them inside strings
    answered = post(client, at_limit)
    assert answered.status_code == 422 and answered.json()["error"]["code"] == "invalid_job", answered.text[:300]
    over = post(client, values_body(MAX_JSON_VALUES + 1))
    assert over.status_code == 413, over.text[:300]
    # Empty containers have no separator to count before parsing: the count of the parsed value still has them.
    empties = json.dumps({"training": [[]] * (MAX_JSON_VALUES // 2) + [{}] * (MAX_JSON_VALUES // 2)}).encode()
    assert post(client, empties).status_code == 413


def test_a_large_body_parsed_off_the_event_loop_is_refused_as_a_small_one(client):
    """Past PARSE_ON_LOOP_BYTES a body is parsed on a thread of its own (app/routing.py), so that a team's
    16 MiB bodies do not hold every other request; its refusals stay what they are on the loop: the key
    given twice named, half a surrogate pair refused, a valid body read whole (a job
    refused for what its spec lacks)."""
    pad = "x" * (PARSE_ON_LOOP_BYTES + 1)
    for padding in ("", pad):
        repeated = b'{"pad": "' + padding.encode() + b'", "dataset_id": "x", "base_model": "tiny", "dataset_id": "y"}'
        answer = post(client, repeated)
        assert answer.status_code == 422 and "the key 'dataset_id' appears twice" in answer.text, answer.text[:300]
        surrogate = b'{"pad": "' + padding.encode() + b'", "metadata": {"k": "\\udc80"}}'
        answer = post(client, surrogate)
        assert answer.status_code == 422 and answer.json()["error"]["details"][0]["field"] == "body", answer.text[:300]
        valid = json.dumps({"dataset_id": "x", "base_model": "tiny", "metadata": {"note": padding}}).encode()
        answer = post(client, valid)
        assert answer.status_code == 422 and answer.json()["error"]["code"] == "invalid_job", answer.text[:300]
        assert answer.json()["error"]["details"][0]["field"] == "training", answer.text[:300]


def test_a_body_saved_with_a_byte_order_mark_is_read_as_without_it(client):
    """Windows editors save a UTF-8 byte order mark before a file's text, and `curl -d @spec.json` sends it: the
    answer was "not valid JSON: expected value at line 1 column 1". RFC 8259 lets a parser read past it; it is
    now answered as the same body without it (here a job of a model that is not registered)."""
    body = json.dumps({"dataset_id": "no-such-dataset", "base_model": "tiny", "training": {"max_steps": 1}}).encode()
    plain, marked = post(client, body), post(client, codecs.BOM_UTF8 + body)
    assert (marked.status_code, marked.json()) == (plain.status_code, plain.json())
    assert marked.status_code in (404, 422) and marked.json()["error"]["code"] != "invalid"  # read as JSON: a job refused


LONG = "9" * 5000  # an integer part past the digits from_json reads (worker/training/spec.py, FROM_JSON_MAX_DIGITS)


def long_numbers(template: str) -> str:
    return template.replace("<LONG>", LONG).replace("<ZEROS>", "0" * 5000)


def test_a_number_too_long_to_read_is_refused_naming_its_field_and_range(client, session):
    """A 5,000-digit number was "body: not valid JSON: number out of range at line 1 column 4369", naming no field:
    it is read as the float it denotes (past every float's range), so each field's own check refuses it, with the
    range it allows, on every route with a JSON body."""
    spec = long_numbers('{"dataset_id": "x", "base_model": "tiny", "training": {"max_steps": <LONG>}}')
    for path in ("/jobs", "/jobs/preflight"):
        answer = client.post(path, content=spec, headers={"Content-Type": "application/json"})
        assert answer.status_code == 422, answer.text[:300]
        assert answer.json()["error"]["details"] == [
            {"field": "training.max_steps", "message": "Input should be a finite number (got inf; allowed: >= 1 and <= 10000000)"}]
    openai = long_numbers('{"model": "tiny", "training_file": "file-x", "hyperparameters": {"learning_rate_multiplier": -<LONG>}}')
    answer = client.post("/v1/fine_tuning/jobs", content=openai, headers={"Content-Type": "application/json"})
    assert answer.status_code == 400, answer.text[:300]
    error = answer.json()["error"]
    assert error["param"] == "hyperparameters.learning_rate_multiplier" and "a number in (0, 10], got -inf" in error["message"]

    admin_key = create_key(session, "team-a", admin=True)[1]  # the quota's route takes an admin key
    session.commit()
    answer = client.put("/admin/teams/team-a/quota", content=long_numbers('{"max_queued": <LONG>}'),
                        headers={"Content-Type": "application/json", "Authorization": f"Bearer {admin_key}"})
    assert answer.status_code == 422, answer.text[:300]
    [detail] = answer.json()["error"]["details"]
    assert detail["field"] == "max_queued" and "a whole number from 0 to 1,000,000" in detail["message"]


def test_a_long_number_is_read_as_the_value_it_denotes_and_digits_in_a_string_stay_a_string():
    """Only numbers from_json cannot read are rewritten, to the float they denote: one whose exponent brings it
    back into range is that number, a long number's digits inside a string are no number, and the body's other
    refusals (a key given twice, half a surrogate pair) still hold."""
    value = checked_json(long_numbers('{"big": <LONG>, "near_one": 1<ZEROS>e-5000, "minus": -<LONG>.5e3, "text": "<LONG>", '
                                      '"short": 1.<LONG>}').encode())
    assert value == {"big": math.inf, "near_one": 1.0, "minus": -math.inf, "text": LONG, "short": 2.0}
    with pytest.raises(json.JSONDecodeError, match="the key 'a' appears twice"):
        checked_json(long_numbers('{"a": <LONG>, "a": 1}').encode())
    with pytest.raises(json.JSONDecodeError, match="surrogate"):
        checked_json(long_numbers('{"a": <LONG>, "b": "\\udc80"}').encode())


def test_the_digits_from_json_reads_are_those_the_rewrite_assumes():
    """If pydantic-core reads more or fewer digits than FROM_JSON_MAX_DIGITS, this says so before a long number
    is again a body error naming no field."""
    assert from_json("9" * FROM_JSON_MAX_DIGITS) == int("9" * FROM_JSON_MAX_DIGITS)
    with pytest.raises(ValueError, match=NUMBER_OUT_OF_RANGE):
        from_json("9" * (FROM_JSON_MAX_DIGITS + 1))
    # A spec file is read by Python's parser (load_spec_json), whose int() stops at the same count by default.
    assert sys.int_info.default_max_str_digits == FROM_JSON_MAX_DIGITS
