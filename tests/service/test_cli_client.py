"""The `qlora datasets` / `qlora jobs` client verbs, run as a user runs them (a subprocess) against
the real deployment: a local check, a streamed upload, a job trained by the worker and watched
to its end, and a checksum-verified download from S3 through a presigned URL."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tarfile

import pytest

from app.cli.api_client import ClientError, write_verified
from tests.deployment import ROOT
from worker.training.tiny import demo_spec

MAX_STEPS = 40


def qlora(env: dict, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "app.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def clean_env(home) -> dict:
    """No QLORA_* and no AWS_* settings: the client needs only a URL and a key (a presigned
    download link carries its own signature), and an empty QLORA_HOME keeps a developer's
    ~/.qlora/credentials.json out of the test."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("QLORA_", "AWS_"))} | {"QLORA_HOME": str(home)}


@pytest.fixture(scope="module")
def cli_key(deployment):
    return deployment.team_key("cli-team")


@pytest.fixture(scope="module")
def cli_env(deployment, cli_key, tmp_path_factory):
    return clean_env(tmp_path_factory.mktemp("cli-home")) | {"QLORA_URL": deployment.url, "QLORA_API_KEY": cli_key}


@pytest.fixture(scope="module")
def uploaded(cli_env, demo_data):
    result = qlora(cli_env, "datasets", "upload", str(demo_data["train"]))
    assert result.returncode == 0, result.stderr
    return {"id": re.search(r"dataset ([0-9a-f]{32})", result.stdout).group(1), "output": result.stdout}


@pytest.fixture(scope="module")
def watched_job(worker, cli_env, uploaded, tmp_path_factory):
    spec = demo_spec("tiny")
    spec["training"].update({"max_steps": MAX_STEPS, "logging_steps": 5, "save_steps": 20})
    spec["output"] = {"merge": True}
    spec_file = tmp_path_factory.mktemp("cli-spec") / "spec.json"
    spec_file.write_text(json.dumps(spec))
    created = qlora(cli_env, "jobs", "create", str(spec_file), "--dataset", uploaded["id"], "--name", "cli-demo")
    assert created.returncode == 0, created.stderr
    job_id = re.search(r"job ([0-9a-f]{32}) queued", created.stdout).group(1)
    watch = qlora(cli_env, "jobs", "watch", job_id, "--interval", "0.5", timeout=240)
    return job_id, watch


def test_check_names_bad_lines_and_upload_refuses_the_file(cli_env, tmp_path, team_a):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "hi", "completion": "hello"}\n{"prompt": "", "completion": "x"}\nnot json\n')
    offline = clean_env(tmp_path / "empty-home")  # a check needs no server and no credentials
    checked = qlora(offline, "datasets", "check", str(bad))
    assert checked.returncode == 1
    assert "line 2:" in checked.stderr and '"prompt" is empty' in checked.stderr
    assert "line 3: not valid JSON" in checked.stderr

    refused = qlora(cli_env, "datasets", "upload", str(bad))
    assert refused.returncode == 1 and "line 3" in refused.stderr and "nothing uploaded" in refused.stderr
    listed = qlora(cli_env, "datasets", "list")
    assert listed.returncode == 0 and "bad.jsonl" not in listed.stdout


def test_check_of_a_good_file_reports_what_the_server_will_record(demo_data, tmp_path, uploaded, cli_env):
    checked = qlora(clean_env(tmp_path), "datasets", "check", str(demo_data["train"]))
    assert checked.returncode == 0, checked.stderr
    shown = qlora(cli_env, "datasets", "show", uploaded["id"])
    assert shown.returncode == 0, shown.stderr
    rows, tokens = re.search(r"rows\s+│\s+([\d,]+).*?token estimate\s+│\s+([\d,]+)", shown.stdout, re.S).groups()
    assert "format chat" in checked.stdout and f"{rows} rows" in checked.stdout and f"~{tokens} tokens" in checked.stdout
    assert rows == "480"


def test_upload_then_list_and_show_see_it(uploaded, cli_env):
    assert "ready" in uploaded["output"] and "chat" in uploaded["output"]
    listed = qlora(cli_env, "datasets", "list")
    assert listed.returncode == 0 and uploaded["id"] in listed.stdout and "train.jsonl" in listed.stdout
    shown = qlora(cli_env, "datasets", "show", uploaded["id"])
    assert shown.returncode == 0 and "480" in shown.stdout and "sha256" in shown.stdout


def test_api_errors_print_the_message_and_exit_1(cli_env, uploaded, tmp_path):
    missing = qlora(cli_env, "jobs", "show", "0" * 32)
    assert missing.returncode == 1 and f"no job '{'0' * 32}'" in missing.stderr
    spec = demo_spec("tiny")
    spec["training"]["learning_rate"] = -1
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    invalid = qlora(cli_env, "jobs", "create", str(tmp_path / "spec.json"), "--dataset", uploaded["id"])
    assert invalid.returncode == 1
    assert "\n  training.learning_rate:" in invalid.stderr  # the per-field details, one per line


def test_watch_follows_the_job_to_its_last_step_and_exits_0(watched_job, cli_env):
    job_id, watch = watched_job
    assert watch.returncode == 0, watch.stdout + watch.stderr
    assert f"job {job_id} succeeded at step {MAX_STEPS}/{MAX_STEPS}" in watch.stdout
    for event in ("claimed", "started", "checkpoint_saved", "adapter_saved", "succeeded"):
        assert event in watch.stdout, watch.stdout  # events printed as they arrived
    assert re.search("[▁▂▃▄▅▆▇█]{3,}", watch.stdout)  # the loss sparkline over the train points

    listed = qlora(cli_env, "jobs", "list", "--status", "succeeded")
    assert listed.returncode == 0 and job_id in listed.stdout
    shown = qlora(cli_env, "jobs", "show", job_id)
    assert shown.returncode == 0 and "succeeded" in shown.stdout and f"{MAX_STEPS}/{MAX_STEPS}" in shown.stdout
    assert "train loss" in shown.stdout and "merge fidelity" in shown.stdout


def test_download_verifies_the_checksum_and_extracts_the_adapter(watched_job, cli_env, deployment, cli_key, tmp_path):
    job_id, _ = watched_job
    got = qlora(cli_env, "jobs", "download", job_id, "--kind", "adapter", "--out", str(tmp_path))
    assert got.returncode == 0, got.stderr
    assert "sha256 verified" in got.stdout
    assert (tmp_path / "adapter" / "adapter_model.safetensors").stat().st_size > 0
    archive = tmp_path / f"{job_id}-adapter.tar"
    listing = {a["kind"]: a for a in deployment.client(cli_key).get(f"/jobs/{job_id}/artifacts").json()}
    assert hashlib.sha256(archive.read_bytes()).hexdigest() == listing["adapter"]["sha256"]
    assert not list(tmp_path.glob(".*.part"))

    kept = qlora(cli_env, "jobs", "download", job_id, "--kind", "merged", "--out", str(tmp_path / "m"), "--no-extract")
    assert kept.returncode == 0, kept.stderr
    assert tarfile.is_tarfile(tmp_path / "m" / f"{job_id}-merged.tar") and not (tmp_path / "m" / "merged").exists()


def test_a_tampered_download_is_refused_and_deleted(tmp_path):
    original = b'{"weights": "the real ones"}' * 1000
    expected = hashlib.sha256(original).hexdigest()
    tampered = original[:-1] + b"!"
    dest = tmp_path / "job-adapter.tar"
    with pytest.raises(ClientError, match="checksum mismatch"):
        write_verified([tampered[:4096], tampered[4096:]], dest, expected)
    assert not dest.exists() and list(tmp_path.iterdir()) == []  # neither the file nor a partial one is left

    assert write_verified([original], dest, expected).read_bytes() == original


def test_the_credentials_file_is_used_without_env_or_flags(deployment, cli_key, uploaded, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "credentials.json").write_text(json.dumps({"url": deployment.url, "api_key": cli_key}))
    listed = qlora(clean_env(home), "datasets", "list")
    assert listed.returncode == 0, listed.stderr
    assert uploaded["id"] in listed.stdout

    # A flag beats the environment, which beats the file.
    env = clean_env(home) | {"QLORA_URL": "http://127.0.0.1:9", "QLORA_API_KEY": "qlk_wrong"}
    assert qlora(env, "datasets", "list").returncode == 1
    flagged = qlora(env, "datasets", "--url", deployment.url, "--api-key", cli_key, "list")
    assert flagged.returncode == 0 and uploaded["id"] in flagged.stdout

    nowhere = qlora(clean_env(tmp_path / "no-home"), "jobs", "list")
    assert nowhere.returncode == 1 and "QLORA_API_KEY" in nowhere.stderr and "credentials.json" in nowhere.stderr
