"""`qlora jobs list` past its first page, run as a user runs it (a subprocess), against a stand-in for GET /jobs on
loopback that pages as the API does: newest first, at most `limit` (200 at most), `next_cursor` naming the next page."""

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


class JobsApi:
    """GET /jobs as the API pages it; the cursor here is the index of the page's first job (the API's is opaque)."""

    def __init__(self) -> None:
        class Handler(JsonHandler):
            def do_GET(self) -> None:
                url = urlparse(self.path)
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                start, limit = int(query.get("cursor", 0)), int(query.get("limit", 50))
                if url.path != "/jobs" or not 1 <= limit <= 200:
                    self.send_error(422 if url.path == "/jobs" else 404)
                    return
                more = start + limit < len(JOBS)
                self.send_json({"data": JOBS[start:start + limit], "next_cursor": str(start + limit) if more else None})

        self._loopback = Loopback(Handler)
        self.url = self._loopback.url

    def close(self) -> None:
        self._loopback.close()


@pytest.fixture
def api():
    server = JobsApi()
    yield server
    server.close()


def jobs_list(api: JobsApi, tmp_path, *args: str, terminal: bool = False) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QLORA_", "NO_COLOR", "FORCE_COLOR"))} | {
        "QLORA_HOME": str(tmp_path), "QLORA_URL": api.url, "QLORA_API_KEY": "qlk_" + "x" * 43, "COLUMNS": "400"}
    if terminal:
        env["FORCE_COLOR"] = "1"
    done = subprocess.run([sys.executable, "-m", "app.cli", "jobs", "list", *args], cwd=ROOT, env=env,
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
