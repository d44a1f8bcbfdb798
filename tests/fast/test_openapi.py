"""The API's OpenAPI document as client generators read it: one operationId per operation, the same in every run."""

from __future__ import annotations

from collections import Counter


def test_every_operation_has_an_operation_id_of_its_own(client):
    """/health and /ready, GET and HEAD in one route, gave both methods one operationId (a generator refuses the
    schema, or makes one function of two), named after whichever method a set listed first in that run."""
    schema = client.get("/openapi.json").json()
    ids = Counter(operation["operationId"] for path in schema["paths"].values() for operation in path.values())
    assert [name for name, count in ids.items() if count > 1] == []
    for path in ("/health", "/ready"):
        assert set(schema["paths"][path]) == {"get", "head"}
        assert client.head(path).status_code == 200 and client.get(path).json()["status"] == "ok"
