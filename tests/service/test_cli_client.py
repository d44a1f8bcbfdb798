"""The `qlora datasets` / `qlora jobs` client verbs, run as a user runs them (a subprocess) against
the real deployment: a local check, a streamed upload, a job trained by the worker and watched
to its end, and a checksum-verified download from S3 through a presigned URL.

stdout is captured: a pipe, where each verb prints JSON (a script's view); --table, or a terminal
(FORCE_COLOR), gets the tables a person reads."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time

import pytest

from app.cli.api_client import ClientError, PartFile
from tests.deployment import ROOT, lane
from tests.services import free_port
from worker.training.tiny import demo_spec

# Four train points (a sparkline), two checkpoints and a merged model are what the checks below read; how
# well the job learns is not, so it trains 20 steps and makes no eval report.
MAX_STEPS = 20


ANSI = re.compile(r"\x1b\[[0-9;]*m")


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
    return json.loads(result.stdout)  # the dataset as the API recorded it


@pytest.fixture(scope="module")
def watched_job(worker, cli_env, uploaded, tmp_path_factory):
    spec = demo_spec("tiny")
    spec["training"].update({"max_steps": MAX_STEPS, "logging_steps": 5, "save_steps": 10})
    spec["output"], spec["eval"] = {"merge": True}, {"prompts": 0}
    spec_file = tmp_path_factory.mktemp("cli-spec") / "spec.json"
    spec_file.write_text(json.dumps(spec))
    created = qlora(cli_env, "jobs", "create", str(spec_file), "--dataset", uploaded["id"], "--name", "cli-demo")
    assert created.returncode == 0, created.stderr
    job = json.loads(created.stdout)
    assert job["status"] == "queued" and job["name"] == "cli-demo"
    assert f"qlora jobs watch {job['id']}" in created.stderr  # the hint, off stdout
    watch = qlora(cli_env, "jobs", "watch", job["id"], "--interval", "0.5", timeout=240)
    return job["id"], watch


def test_check_names_bad_lines_and_upload_refuses_the_file(cli_env, tmp_path, team_a):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "hi", "completion": "hello"}\n{"prompt": "", "completion": "x"}\nnot json\n')
    offline = clean_env(tmp_path / "empty-home")  # a check needs no server and no credentials
    checked = qlora(offline, "datasets", "check", str(bad))
    assert checked.returncode == 1
    assert "line 2:" in checked.stderr and '"prompt" is empty' in checked.stderr
    assert "line 3: not valid JSON" in checked.stderr
    verdict = json.loads(checked.stdout)
    assert verdict["ok"] is False and verdict["error_count"] == 2 and [e["line"] for e in verdict["errors"]] == [2, 3]

    refused = qlora(cli_env, "datasets", "upload", str(bad))
    assert refused.returncode == 1 and "line 3" in refused.stderr and "nothing uploaded" in refused.stderr
    assert refused.stdout == ""  # nothing recorded, nothing to parse
    listed = qlora(cli_env, "datasets", "list")
    assert listed.returncode == 0 and "bad.jsonl" not in [d["filename"] for d in json.loads(listed.stdout)]


def test_check_of_a_good_file_reports_what_the_server_will_record(demo_data, tmp_path, uploaded, cli_env):
    checked = qlora(clean_env(tmp_path), "datasets", "check", str(demo_data["train"]))
    assert checked.returncode == 0, checked.stderr
    shown = qlora(cli_env, "datasets", "show", uploaded["id"])
    assert shown.returncode == 0, shown.stderr
    verdict, record = json.loads(checked.stdout), json.loads(shown.stdout)
    assert verdict["ok"] is True and verdict["error_count"] == 0
    assert (verdict["format"], verdict["rows"]) == (record["format"], record["rows"]) == ("chat", 480)
    assert verdict["token_estimate"] == record["token_estimate"]

    text = qlora(clean_env(tmp_path), "datasets", "check", str(demo_data["train"]), "--table")
    assert f"ok, format chat, 480 rows, ~{record['token_estimate']:,} tokens" in text.stdout


def test_upload_then_list_and_show_see_it(uploaded, cli_env):
    assert uploaded["status"] == "ready" and uploaded["format"] == "chat" and uploaded["filename"] == "train.jsonl"
    listed = qlora(cli_env, "datasets", "list")
    assert listed.returncode == 0, listed.stderr
    assert {d["id"]: d["status"] for d in json.loads(listed.stdout)}[uploaded["id"]] == "ready"
    shown = qlora(cli_env, "datasets", "show", uploaded["id"])
    assert shown.returncode == 0 and json.loads(shown.stdout) == uploaded

    table = qlora(cli_env, "datasets", "show", uploaded["id"], "--table")  # --table forces the table on a pipe
    assert table.returncode == 0 and "480" in table.stdout and "sha256" in table.stdout and f"dataset {uploaded['id']}" in table.stdout
    table = qlora(cli_env, "datasets", "list", "--table")
    assert uploaded["id"] in table.stdout and "train.jsonl" in table.stdout and not table.stdout.lstrip().startswith("[")


def test_a_narrow_terminal_keeps_ids_and_statuses_whole(uploaded, cli_env):
    """At 80 columns the id (32 characters) leaves little room: the status stays whole, the filename folds,
    and the columns that do not fit are left out, saying so, rather than every cell cut to "fil…"."""
    terminal = cli_env | {"FORCE_COLOR": "1", "COLUMNS": "80"}  # rich takes it for a terminal of 80 columns
    listed = qlora(terminal, "datasets", "list")
    assert listed.returncode == 0, listed.stderr
    lines = ANSI.sub("", listed.stdout).splitlines()
    assert max(map(len, lines)) <= 80, listed.stdout
    row = next(line for line in lines if uploaded["id"] in line)
    assert "│ ready " in row and "train.json" in row and "…" not in listed.stdout
    assert "not shown at this width" in listed.stdout
    wide = qlora(cli_env | {"FORCE_COLOR": "1", "COLUMNS": "200"}, "datasets", "list")
    assert "not shown" not in wide.stdout and "created" in wide.stdout


def test_delete_and_cancel_answer_json_on_a_pipe(cli_env, demo_data, uploaded, tmp_path):
    spare = qlora(cli_env, "datasets", "upload", str(demo_data["validation"]))
    assert spare.returncode == 0, spare.stderr
    spare_id = json.loads(spare.stdout)["id"]
    deleted = qlora(cli_env, "datasets", "delete", spare_id)
    assert deleted.returncode == 0 and json.loads(deleted.stdout) == {"id": spare_id, "deleted": True}
    assert spare_id not in qlora(cli_env, "datasets", "list").stdout

    (tmp_path / "spec.json").write_text(json.dumps({**demo_spec("tiny"), "gpu_class": lane("nobody-listens")}))
    created = json.loads(qlora(cli_env, "jobs", "create", str(tmp_path / "spec.json"), "--dataset", uploaded["id"]).stdout)
    # Pause and resume are the same request: a queued job is where resume leads (answered as it is),
    # and cannot be paused (the API's 409, on stderr).
    resumed = qlora(cli_env, "jobs", "resume", created["id"], "--table")
    assert resumed.returncode == 0 and resumed.stdout == f"job {created['id']} queued\n", resumed.stderr
    paused = qlora(cli_env, "jobs", "pause", created["id"])
    assert paused.returncode == 1 and f"cannot pause job {created['id']}: it is queued" in paused.stderr, paused.stderr
    cancelled = qlora(cli_env, "jobs", "cancel", created["id"])
    assert cancelled.returncode == 0, cancelled.stderr
    assert json.loads(cancelled.stdout)["id"] == created["id"] and json.loads(cancelled.stdout)["status"] == "cancelled"
    text = qlora(cli_env, "jobs", "cancel", created["id"], "--table")  # again: the job as it is
    assert text.returncode == 0 and text.stdout == f"job {created['id']} cancelled\n"
    missing = qlora(cli_env, "jobs", "cancel", "0" * 32, "--json")
    assert missing.returncode == 1 and missing.stdout == "" and "error: no job" in missing.stderr  # errors: text on stderr


def test_create_prints_the_preflight_warnings(cli_env, demo_data, tmp_path):
    """A job queued with rows it drops said only "job X queued": the preflight's warnings were events that only
    `jobs watch` showed. They go to stderr as the job is created, on a pipe too (stdout keeps the job's JSON)."""
    rows = demo_data["train"].read_bytes().splitlines()[:20]
    long_row = json.dumps({"messages": [{"role": "user", "content": "Tell me a story. " * 200},
                                        {"role": "assistant", "content": "Once upon a time."}]}).encode()
    (tmp_path / "long.jsonl").write_bytes(b"\n".join([*rows, long_row]) + b"\n")
    upload = qlora(cli_env, "datasets", "upload", str(tmp_path / "long.jsonl"))
    assert upload.returncode == 0, upload.stderr
    (tmp_path / "spec.json").write_text(json.dumps({**demo_spec("tiny"), "gpu_class": lane("nobody-listens")}))
    created = qlora(cli_env, "jobs", "create", str(tmp_path / "spec.json"), "--dataset", json.loads(upload.stdout)["id"])
    assert created.returncode == 0, created.stderr
    job = json.loads(created.stdout)
    assert ("warning: 1 row has nothing to learn within max_seq_length and is dropped (line 21)"
            in created.stderr), created.stderr
    assert qlora(cli_env, "jobs", "cancel", job["id"]).returncode == 0


def test_api_errors_print_the_message_and_exit_1(cli_env, uploaded, tmp_path):
    missing = qlora(cli_env, "jobs", "show", "0" * 32)
    assert missing.returncode == 1 and f"no job '{'0' * 32}'" in missing.stderr
    spec = demo_spec("tiny")
    spec["training"]["learning_rate"] = -1
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    invalid = qlora(cli_env, "jobs", "create", str(tmp_path / "spec.json"), "--dataset", uploaded["id"])
    assert invalid.returncode == 1
    # The field at fault, once: the API's message holds it, and its one detail is not printed again under it.
    assert invalid.stderr.startswith("error: invalid job: training.learning_rate: Input should be greater than 0")
    assert invalid.stderr.count("training.learning_rate") == 1, invalid.stderr


def test_an_id_that_is_no_id_never_reaches_another_route(watched_job, cli_env, deployment, cli_key):
    """Ids went into the URL's path as typed: `datasets delete ../jobs/ID/checkpoints` was sent as DELETE
    /jobs/ID/checkpoints, deleted the job's checkpoints and printed {"deleted": true}."""
    job_id, _ = watched_job
    checkpoints = deployment.client(cli_key).get(f"/jobs/{job_id}/checkpoints").json()
    assert checkpoints
    done = qlora(cli_env, "datasets", "delete", f"../jobs/{job_id}/checkpoints")
    assert done.returncode == 1 and done.stdout == "" and "is not a dataset id" in done.stderr
    assert deployment.client(cli_key).get(f"/jobs/{job_id}/checkpoints").json() == checkpoints
    shown = qlora(cli_env, "datasets", "show", f"../jobs/{job_id}")  # was the job read as a dataset: a KeyError
    assert shown.returncode == 1 and shown.stdout == "" and "Traceback" not in shown.stderr


def test_a_server_that_is_not_the_api_is_named_as_such(cli_env, tmp_path):
    """`python -m http.server` at QLORA_URL: its 404 page was printed whole, its 200 for a file named `jobs`
    ended in a JSONDecodeError traceback."""
    (tmp_path / "jobs").write_text("not the API")
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"], cwd=tmp_path,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        env = cli_env | {"QLORA_URL": f"http://127.0.0.1:{port}"}
        deadline = time.monotonic() + 30
        while "refused" in (listed := qlora(env, "jobs", "list")).stderr and time.monotonic() < deadline:
            time.sleep(0.3)
        for done in (listed, qlora(env, "jobs", "show", "0" * 32), qlora(env, "datasets", "delete", "0" * 32)):
            assert done.returncode == 1 and done.stdout == "", done.stderr
            assert "not with the API's JSON: is QLORA_URL (or --url) the address of the qlora-service API?" in done.stderr
            assert "Traceback" not in done.stderr and "<html" not in done.stderr
    finally:
        server.terminate()
        server.wait(10)


def test_ctrl_c_during_an_upload_says_so_and_records_nothing(deployment, cli_env, cli_key, tmp_path):
    """Ctrl-C mid-upload exited 130 without a word. The server records a dataset only once it is whole."""
    from tests.service.test_resumable_downloads import BreakingProxy

    big = tmp_path / "big.jsonl"
    row = json.dumps({"text": "x" * 1000}) + "\n"
    big.write_text(row * (16_000_000 // len(row)))
    before = deployment.client(cli_key).get("/datasets", params={"limit": 200}).json()["data"]
    proxy = BreakingProxy(deployment.url)
    proxy.request_delay = 0.1  # ~650 kB/s: 25 s for the file
    try:
        upload = subprocess.Popen([sys.executable, "-m", "app.cli", "datasets", "upload", str(big), "--no-check"],
                                  cwd=ROOT, env=cli_env | {"QLORA_URL": proxy.url}, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True,
                                  preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        time.sleep(4)
        upload.send_signal(signal.SIGINT)
        stdout, stderr = upload.communicate(timeout=30)
    finally:
        proxy.close()
    assert upload.returncode == 130 and stdout == "", stderr
    assert "upload stopped; nothing was recorded" in stderr and "Traceback" not in stderr
    time.sleep(1)
    assert deployment.client(cli_key).get("/datasets", params={"limit": 200}).json()["data"] == before


def test_watch_follows_the_job_to_its_last_step_and_exits_0(watched_job, cli_env):
    job_id, watch = watched_job
    assert watch.returncode == 0, watch.stdout + watch.stderr
    records = [json.loads(line) for line in watch.stdout.splitlines()]  # on a pipe: one JSON object a line
    assert records[-1]["kind"] == "job" and records[-1]["job"]["status"] == "succeeded"
    assert records[-1]["job"]["step"] == MAX_STEPS
    # A status record for each change of the status, or of a queued job's wait (its place, what it waits for),
    # and none for a poll that changed nothing.
    shown = [(r["job"]["status"], r["job"].get("queue_position"), r["job"].get("waiting_for"))
             for r in records if r["kind"] == "status"]
    assert all(a != b for a, b in zip(shown, shown[1:], strict=False)), shown
    statuses = [status for i, (status, _, _) in enumerate(shown) if i == 0 or status != shown[i - 1][0]]
    assert statuses[-1] == "succeeded" and len(statuses) == len(set(statuses)), shown  # each status once, in order
    events = [r["event"]["type"] for r in records if r["kind"] == "event"]
    for event in ("claimed", "started", "checkpoint_saved", "adapter_saved", "succeeded"):
        assert event in events, events  # as they arrived
    train_steps = [r["point"]["step"] for r in records if r["kind"] == "metric" and r["split"] == "train"]
    assert train_steps == sorted(set(train_steps)) and train_steps[-1] == MAX_STEPS  # each point once

    again = qlora(cli_env, "jobs", "watch", job_id, "--table")  # a person's view of the job that ended
    assert again.returncode == 0 and f"job {job_id} succeeded at step {MAX_STEPS}/{MAX_STEPS}" in again.stdout
    assert re.search("[▁▂▃▄▅▆▇█]{3,}", again.stdout)  # the loss sparkline over the train points
    # Did it work, and where is what it made: the artifacts and the command that fetches them (on stderr, a hint).
    assert re.search(r"artifacts: adapter \(.+\), merged \(.+\)", again.stderr), again.stderr
    assert f"`qlora jobs download {job_id} --kind adapter`" in again.stderr, again.stderr

    listed = qlora(cli_env, "jobs", "list", "--status", "succeeded")
    assert listed.returncode == 0 and job_id in [j["id"] for j in json.loads(listed.stdout)]
    shown = qlora(cli_env, "jobs", "show", job_id)
    assert shown.returncode == 0 and json.loads(shown.stdout)["status"] == "succeeded"
    assert f"qlora jobs download {job_id}" in shown.stderr, shown.stderr  # stdout stays the API's answer
    table = qlora(cli_env, "jobs", "show", job_id, "--table")
    assert table.returncode == 0 and "succeeded" in table.stdout and f"{MAX_STEPS}/{MAX_STEPS}" in table.stdout
    assert "train loss" in table.stdout and "merge fidelity" in table.stdout


def test_download_verifies_the_checksum_and_extracts_the_adapter(watched_job, cli_env, deployment, cli_key, tmp_path):
    job_id, _ = watched_job
    got = qlora(cli_env, "jobs", "download", job_id, "--kind", "adapter", "--out", str(tmp_path))
    assert got.returncode == 0, got.stderr
    written = json.loads(got.stdout)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").stat().st_size > 0
    archive = tmp_path / f"{job_id}-adapter.tar"
    assert written["archive"] == str(archive) and written["extracted"] == [str(tmp_path / "adapter")]
    listing = {a["kind"]: a for a in deployment.client(cli_key).get(f"/jobs/{job_id}/artifacts").json()}
    assert hashlib.sha256(archive.read_bytes()).hexdigest() == listing["adapter"]["sha256"] == written["sha256"]
    assert written["bytes"] == archive.stat().st_size
    assert not list(tmp_path.glob(".*.part"))

    kept = qlora(cli_env, "jobs", "download", job_id, "--kind", "merged", "--out", str(tmp_path / "m"), "--no-extract",
                 "--table")
    assert kept.returncode == 0, kept.stderr
    assert "sha256 verified" in kept.stdout and "extracted" not in kept.stdout
    assert tarfile.is_tarfile(tmp_path / "m" / f"{job_id}-merged.tar") and not (tmp_path / "m" / "merged").exists()


def write_verified(chunks: list[bytes], dest, sha256: str, total: int):
    with PartFile(dest, sha256) as part:
        part.continue_within(total)
        for data in chunks:
            part.write(data)
        return part.finish(total)


def test_a_tampered_download_is_refused_and_deleted(tmp_path):
    original = b'{"weights": "the real ones"}' * 1000
    expected = hashlib.sha256(original).hexdigest()
    tampered = original[:-1] + b"!"
    dest = tmp_path / "job-adapter.tar"
    with pytest.raises(ClientError, match="checksum mismatch"):
        write_verified([tampered[:4096], tampered[4096:]], dest, expected, len(original))
    assert not dest.exists() and list(tmp_path.iterdir()) == []  # neither the file nor a partial one is left

    assert write_verified([original], dest, expected, len(original)).read_bytes() == original


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


def test_estimate_asks_the_registry_for_a_registered_models_config(cli_env, tmp_path):
    """`qlora estimate` on a spec that names a registered model (as jobs do), not a local directory:
    the config.json comes from the server the client commands use. It used to say 'pass --config'."""
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(demo_spec("tiny")))
    done = qlora(cli_env, "estimate", str(spec_file))
    assert done.returncode == 0, done.stderr
    estimate = json.loads(done.stdout)
    assert estimate["micro_batch"] == 16 and estimate["total"] > 0 and estimate["parts"]["LoRA adapter"] > 0

    spec_file.write_text(json.dumps(demo_spec("no-such-model")))
    unknown = qlora(cli_env, "estimate", str(spec_file))
    assert unknown.returncode == 2 and "the registry has no model 'no-such-model' (it has: " in unknown.stderr
    nowhere = qlora(clean_env(tmp_path / "home"), "estimate", str(spec_file))
    assert nowhere.returncode == 2 and "and the registry could not be asked" in nowhere.stderr
    assert "pass --config" in nowhere.stderr and "Traceback" not in nowhere.stderr
