"""A query parameter given twice (`?limit=10&limit=20`) is refused naming it, on every API route, from one place
(app/routing.py, CheckedJSONRoute): FastAPI took the last, so a script that appended a parameter to a URL that
already had it got another page size, cursor or filter than the one its own code read first."""

from __future__ import annotations

import importlib
import pkgutil
import re
from typing import Annotated

from fastapi import APIRouter, FastAPI, Query
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

import app
from app.errors import AppError
from app.routing import CheckedJSONRoute, single_query_parameters


def test_a_parameter_given_twice_is_refused_naming_it_and_the_values(client):
    answer = client.get("/jobs?limit=10&limit=20")
    assert answer.status_code == 422, answer.text
    assert answer.json()["error"] == {
        "code": "invalid", "message": "limit: given 2 times in the query string ('10', '20'); give it once",
        "details": [{"field": "limit", "message": "given 2 times; give it once"}]}
    openai = client.get("/v1/fine_tuning/jobs?after=a&after=b")  # in OpenAI's shape there, as its other errors
    assert openai.status_code == 400, openai.text
    assert (openai.json()["error"]["param"], openai.json()["error"]["type"]) == ("after", "invalid_request_error")
    same = client.get("/datasets?limit=5&limit=5")  # the same value twice too: one rule, as for a JSON key
    assert same.status_code == 422 and same.json()["error"]["details"][0]["field"] == "limit", same.text


def test_every_route_refuses_each_of_its_parameters_given_twice(client):
    """Each route's own parameters, and those of its dependencies, whatever the route (a poll, an admin's, a
    download's, /v1's), before the route reads anything: its path's ids need not even exist."""
    checked = 0
    for route in api_routes():
        path = re.sub(r"\{[^}]+\}", "x", route.path)
        methods = sorted(route.methods - {"HEAD"})  # a HEAD route's answer has no body to read: its GET twin's has
        for name in single_query_parameters(route.dependant) if methods else ():
            method = methods[0]
            answer = client.request(method, path, params=[(name, "1"), (name, "2")])
            assert answer.status_code in (400, 422), (method, route.path, name, answer.text[:300])
            error = answer.json()["error"]
            assert error.get("param", (error.get("details") or [{}])[0].get("field")) == name, (route.path, error)
            checked += 1
    assert checked >= 20  # limit, cursor, after, status, from, to, all_teams, force, points... on ~15 routes


def api_routes() -> list[APIRoute]:
    """Every route of the API's routers (app/*/routes.py)."""
    routes = []
    for module in pkgutil.walk_packages(app.__path__, "app."):
        if module.name.endswith(".routes"):
            router = getattr(importlib.import_module(module.name), "router", None)
            if isinstance(router, APIRouter):
                routes += [route for route in router.routes if isinstance(route, APIRoute)]
    return routes


def test_other_parameters_keep_their_own_rules():
    """Parameters no route declares are not counted (the SDK's `metadata[k]=v` filter has its own rule), and a
    parameter declared as a list takes each value: no route of the API has one yet; one added would work."""
    router = APIRouter(route_class=CheckedJSONRoute)

    @router.get("/tagged")
    def tagged(tags: Annotated[list[str] | None, Query()] = None, limit: int = 1):
        return {"tags": tags, "limit": limit}

    toy = FastAPI()
    toy.include_router(router)
    toy.add_exception_handler(AppError, lambda request, exc: JSONResponse(exc.body(), exc.status))
    with TestClient(toy) as client:
        assert client.get("/tagged?tags=a&tags=b&other=1&other=2&limit=3").json() == {"tags": ["a", "b"], "limit": 3}
        assert client.get("/tagged?limit=1&limit=2").status_code == 422


def test_the_openai_metadata_filter_is_read_as_before(client):
    answer = client.get("/v1/fine_tuning/jobs?metadata[team]=nlp&metadata[team]=nlp&limit=5")
    assert answer.status_code == 200, answer.text
    differing = client.get("/v1/fine_tuning/jobs?metadata[team]=nlp&metadata[team]=cv")
    assert differing.status_code == 400 and differing.json()["error"]["param"] == "metadata", differing.text
