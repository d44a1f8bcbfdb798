"""Property-based: every operation in the OpenAPI schema, driven by generated requests (valid by the
schema, and deliberately invalid) with a valid key, a team's and an admin's. No answer may be a 5xx,
and every answer must be one the schema documents, in the shape it documents.

Runs against its own deployment (its own database and teams, no worker), so that what it creates,
registers or deletes touches no other test. A failure prints the request as a curl command.
"""

from __future__ import annotations

from collections import Counter

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error, response_schema_conformance, status_code_conformance

from tests.deployment import start_deployment, stop_deployment, upload

# Enough to reach each operation's shapes (missing fields, wrong types, huge numbers, odd strings)
# while a run stays within a minute or so on two cores.
EXAMPLES_PER_OPERATION = 40

# These answer with a stream or a file, whose body the schema does not describe as JSON.
NOT_JSON = {"GET /jobs/{job_id}/stream", "GET /jobs/{job_id}/download/{kind}"}

GOOD_ROWS = b'{"text": "hello there"}\n' * 8

# What careless scripts and attackers send where an id, a cursor or a number goes, beyond what the
# schema's types suggest: NUL (Postgres refuses it), digits int() rejects or that overflow a column,
# a timestamp without a zone, a path escape, a bidi override, an empty string, a huge value.
HOSTILE_VALUES = ["a\x00b", "²", "9" * 5000, "-1", "2024-01-01T00:00:00", "../../etc/passwd", "\u202e\u0000",
                  "", " ", "x" * 20000, "1e400", "NaN"]
# JSON bodies nested past any parser's recursion limit, and integers past any column's.
HOSTILE_JSON = [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]], 10**400, -(2**63) - 1, {"": None}]


@pytest.fixture(scope="module")
def fuzz_deployment(backing_services, tmp_path_factory, tiny_model_dir):
    d = start_deployment(tmp_path_factory.mktemp("fuzz"), backing_services, tiny_model_dir)
    yield d
    stop_deployment(d)


@pytest.mark.parametrize("admin", [False, True], ids=["team-key", "admin-key"])
def test_no_operation_answers_5xx_or_off_schema(fuzz_deployment, admin, capsys):
    d = fuzz_deployment
    key = d.team_key("fuzz-admin" if admin else "fuzz-team", admin=admin)
    headers = {"Authorization": f"Bearer {key}"}
    # A real dataset, so that some generated jobs get past "no such dataset" into admission.
    with d.client(key) as client:
        dataset_id = upload(client, content=GOOD_ROWS).json()["id"]
    schema = schemathesis.openapi.from_url(d.url + "/openapi.json")
    requests: Counter[str] = Counter()
    statuses: Counter[int] = Counter()

    def with_real_ids(case):
        if isinstance(case.body, dict) and "dataset_id" in case.body:
            case.body["dataset_id"] = dataset_id
        return case

    def hostile(operation, generated):
        """Cases the schema generated, with one parameter or one body field swapped for a hostile value."""
        slots = [(p.location.value, p.name) for p in operation.iter_parameters()
                 if p.location.value in ("path", "query")]

        def swap(case, slot, value):
            where, name = slot
            if where == "path":
                case.path_parameters = {**(case.path_parameters or {}), name: value}
            elif where == "query":
                case.query = {**(case.query or {}), name: value}
            elif isinstance(case.body, dict):
                case.body = {**case.body, name: value}
            return case

        body_slots = st.sampled_from(["dataset_id", "training", "name", "metadata", "base_model", "after"]).map(
            lambda name: ("body", name))
        slot = st.sampled_from(slots) | body_slots if slots else body_slots
        value = st.sampled_from(HOSTILE_VALUES) | st.sampled_from(HOSTILE_JSON)
        return st.tuples(generated, slot, value).map(lambda drawn: swap(*drawn))

    def exercise(operation) -> None:
        label = f"{operation.method.upper()} {operation.path}"
        checks = [not_a_server_error, status_code_conformance]
        if label not in NOT_JSON:
            checks.append(response_schema_conformance)
        generated = operation.as_strategy(GenerationMode.POSITIVE) | operation.as_strategy(GenerationMode.NEGATIVE)

        @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None, derandomize=True,
                  phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
        @given(case=st.one_of(generated, generated.map(with_real_ids), hostile(operation, generated)))
        def call(case):
            response = case.call(base_url=d.url, headers=headers, timeout=30)
            requests[label] += 1
            statuses[response.status_code] += 1
            case.validate_response(response, checks=checks)

        call()

    for result in schema.get_all_operations():
        exercise(result.ok())

    with capsys.disabled():
        print(f"\n{'admin' if admin else 'team'} key: {sum(requests.values())} requests over {len(requests)} operations; "
              f"statuses {dict(sorted(statuses.items()))}")
    assert len(requests) >= 30, sorted(requests)  # every route was reached, not just a few
    assert not any(status >= 500 for status in statuses)
