"""The dashboard's files (/static, and the page at /) take a Range as every download does (app/ranges.py): a
reversed range (`bytes=100-10`) was Starlette's text/plain 400 "Range header: start must be less than end", and an
unsatisfiable one an empty text/plain 416. Now what a download ignores (reversed, malformed, another unit, several
ranges) is the whole file with 200, and what holds no byte of the file is the API's JSON 416 with its size."""

from __future__ import annotations

import pytest

from app.web.routes import STATIC_DIR

CSS = (STATIC_DIR / "app.css").read_bytes()
PAGE = (STATIC_DIR / "index.html").read_bytes()


@pytest.mark.parametrize("path", ["/static/app.css", "/static/index.html", "/"])
@pytest.mark.parametrize("asked", ["bytes=100-10", "bytes=abc", "items=0-5", "bytes=0-1,5-6", "bytes=", "bytes=--1"])
def test_a_range_a_download_ignores_gets_the_whole_file(client, path, asked):
    whole = PAGE if path != "/static/app.css" else CSS
    answer = client.get(path, headers={"Range": asked})
    assert answer.status_code == 200, answer.text[:300]
    assert answer.content == whole and "content-range" not in answer.headers
    assert answer.headers["accept-ranges"] == "bytes"


@pytest.mark.parametrize("path", ["/static/app.css", "/"])
@pytest.mark.parametrize("asked", ["bytes=999999999-", "bytes=-0", "bytes=" + "9" * 5000 + "-"])
def test_a_range_past_the_end_is_the_apis_416_with_the_size(client, path, asked):
    size = len(PAGE if path == "/" else CSS)
    answer = client.get(path, headers={"Range": asked})
    assert answer.status_code == 416, answer.text[:300]
    assert answer.headers["content-range"] == f"bytes */{size}"
    assert answer.json()["error"]["code"] == "range_not_satisfiable"
    assert f"which has {size} bytes" in answer.json()["error"]["message"]


def test_one_range_in_the_file_is_served_as_before(client):
    for asked, first, last in (("bytes=0-9", 0, 9), ("bytes=10-", 10, len(CSS) - 1), ("bytes=-5", len(CSS) - 5, len(CSS) - 1),
                               (f"bytes=5-{len(CSS) + 100}", 5, len(CSS) - 1)):
        answer = client.get("/static/app.css", headers={"Range": asked})
        assert answer.status_code == 206, (asked, answer.text[:300])
        assert answer.content == CSS[first:last + 1]
        assert answer.headers["content-range"] == f"bytes {first}-{last}/{len(CSS)}"
