"""Logs take the reader's format: text for a person at a terminal, one JSON object per line for a pipe
or a file (a log collector); QLORA_LOG_FORMAT forces either. Each case runs a real process with its
stderr on a pseudo-terminal or a pipe."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.deployment import ROOT

# A process that logs as the service's do, about a job.
LOGGING = ("import logging, os; from app import logs; logs.configure('worker', os.environ.get('FMT', 'auto')); "
           "logs.job_id_var.set('0123456789abcdef0123456789abcdef'); logging.getLogger('qlora').warning('step 3 done')")


def stderr_of(fmt: str, terminal: bool) -> str:
    env = {**os.environ, "FMT": fmt, "COLUMNS": "200"}
    if not terminal:
        return subprocess.run([sys.executable, "-c", LOGGING], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=60).stderr
    leader, follower = os.openpty()
    try:
        subprocess.run([sys.executable, "-c", LOGGING], cwd=ROOT, env=env, stderr=follower, timeout=60)
        os.close(follower)
        chunks = []
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the terminal's other end is closed: all read
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks).decode()
    finally:
        os.close(leader)


@pytest.mark.parametrize("fmt, terminal, as_json", [("auto", True, False), ("auto", False, True),
                                                     ("json", True, True), ("text", False, False)])
def test_logs_are_text_on_a_terminal_and_json_elsewhere(fmt, terminal, as_json):
    lines = [line for line in stderr_of(fmt, terminal).splitlines() if line.strip()]
    assert len(lines) == 1, lines
    if as_json:
        entry = json.loads(lines[0])
        assert entry["message"] == "step 3 done" and entry["job_id"] == "0123456789abcdef0123456789abcdef"
        assert entry["process"] == "worker" and entry["level"] == "warning"
    else:
        assert not lines[0].lstrip().startswith("{")
        assert "worker qlora: step 3 done (job 0123456789abcdef0123456789abcdef)" in lines[0]
        assert ("\033[33mWARNING\033[0m" if terminal else " WARNING ") in lines[0]
