"""`qlora jobs list` and `qlora datasets list` past their first page, run as a user runs them (a subprocess), against a
stand-in for GET /jobs and GET /datasets on loopback that pages as the API does: newest first, at most `limit` (200 at
most), `next_cursor` naming the next page."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from urllib.parse import parse_qs, urlparse

import pytest

from tests.deployment import ROOT
from tests.fast.loopback import JsonHandler, Loopback

JOBS = [{"id": f"{n:032x}", "name": f"job-{n}", "status": "succeeded", "base_model": "tiny", "step": 1, "total_steps": 1,
         "created_at": "2026-12-06T18:41:11Z", "finished_at": None} for n in range(450, 0, -1)]  # newest first
DATASETS = [{"id": f"{n:032x}", "filename": f"train-{n}.jsonl", "status": "ready", "format": "chat", "rows": 10,
             "token_estimate": 1000, "created_at": "2026-12-06T18:41:11Z"} for n in range(120, 0, -1)]
LISTS = {"/jobs": JOBS, "/datasets": DATASETS}


class JobsApi:
    """GET /jobs and GET /datasets as the API pages them; the cursor here is the index of the page's first row (the
    API's is opaque)."""

    def __init__(self) -> None:
        class Handler(JsonHandler):
            def do_GET(self) -> None:
                url = urlparse(self.path)
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                start, limit = int(query.get("cursor", 0)), int(query.get("limit", 50))
                rows = LISTS.get(url.path)
                if rows is None or not 1 <= limit <= 200:
                    self.send_error(404 if rows is None else 422)
                    return
                more = start + limit < len(rows)
                self.send_json({"data": rows[start:start + limit], "next_cursor": str(start + limit) if more else None})

        self._loopback = Loopback(Handler)
        self.url = self._loopback.url

    def close(self) -> None:
        self._loopback.close()


@pytest.fixture
def api():
    server = JobsApi()
    yield server
    server.close()


def jobs_list(api: JobsApi, tmp_path, *args: str, terminal: bool = False, what: str = "jobs") -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QLORA_", "NO_COLOR", "FORCE_COLOR"))} | {
        "QLORA_HOME": str(tmp_path), "QLORA_URL": api.url, "QLORA_API_KEY": "qlk_" + "x" * 43, "COLUMNS": "400"}
    if terminal:
        env["FORCE_COLOR"] = "1"
    done = subprocess.run([sys.executable, "-m", "app.cli", what, "list", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    return done


def test_a_list_longer_than_a_page_names_the_next_page_and_reaches_every_job(api, tmp_path):
    """`qlora jobs list` showed at most 200 jobs (the API's most per page), with nothing saying more followed and no
    way to reach them: the older jobs of a busy team were out of the CLI's reach."""
    first = jobs_list(api, tmp_path, "--limit", "200")
    assert [j["id"] for j in json.loads(first.stdout)] == [j["id"] for j in JOBS[:200]]  # a pipe's array, as before
    assert "`qlora jobs list --limit 200 --cursor 200` for the next page, --all for all of them" in first.stderr

    second = jobs_list(api, tmp_path, "--limit", "200", "--cursor", "200")
    assert [j["id"] for j in json.loads(second.stdout)] == [j["id"] for j in JOBS[200:400]]
    last = jobs_list(api, tmp_path, "--limit", "200", "--cursor", "400")
    assert [j["id"] for j in json.loads(last.stdout)] == [j["id"] for j in JOBS[400:]]
    assert "--cursor" not in last.stderr  # the last page: nothing follows

    every = jobs_list(api, tmp_path, "--all", "--limit", "200")
    assert [j["id"] for j in json.loads(every.stdout)] == [j["id"] for j in JOBS]
    assert every.stderr == ""

    shown = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", jobs_list(api, tmp_path, "--status", "succeeded", terminal=True).stderr)
    assert "`qlora jobs list --status succeeded --limit 20 --cursor 20` for the next page" in shown, shown


def test_datasets_list_reaches_past_its_first_page_as_jobs_list_does(api, tmp_path):
    """`qlora datasets list` showed the first page only (--limit, 50 by default), with nothing saying more followed."""
    first = jobs_list(api, tmp_path, what="datasets")
    assert [d["id"] for d in json.loads(first.stdout)] == [d["id"] for d in DATASETS[:50]]  # a pipe's array, as before
    assert "`qlora datasets list --limit 50 --cursor 50` for the next page, --all for all of them" in first.stderr

    last = jobs_list(api, tmp_path, "--limit", "100", "--cursor", "100", what="datasets")
    assert [d["id"] for d in json.loads(last.stdout)] == [d["id"] for d in DATASETS[100:]]
    assert "--cursor" not in last.stderr

    every = jobs_list(api, tmp_path, "--all", "--limit", "50", what="datasets")
    assert [d["id"] for d in json.loads(every.stdout)] == [d["id"] for d in DATASETS]
    assert every.stderr == ""

    shown = jobs_list(api, tmp_path, "--limit", "100", terminal=True, what="datasets")
    assert DATASETS[99]["filename"] in shown.stdout and DATASETS[100]["filename"] not in shown.stdout  # the table
    # The upload's token_estimate, said to be one ("tokens" read as the count the preflight tokenizes, a third more).
    assert re.search(r"┃\s*~tokens\s*┃", re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", shown.stdout)), shown.stdout
    stderr = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", shown.stderr)
    assert "`qlora datasets list --limit 100 --cursor 100` for the next page" in stderr, stderr
