"""The `qlora` client used carelessly, where no server is needed to see the answer: a key or URL that
cannot be used, an id that is no id, a credentials file that is broken or open to others, a file that
never ends, a terminal that cannot print unicode, an output file on a full disk.

Each must end with a message on stderr, exit 1 (2 for a bad argument, as typer says for any), nothing
on stdout and no traceback. The CLI runs as a user runs it: a subprocess. Where a request would be sent,
QLORA_URL names a port nothing listens on, so "cannot reach the API" there means the check came too late."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.deployment import ROOT
from tests.services import free_port

GOOD_KEY = "qlk_" + "x" * 43
ROW = {"messages": [{"role": "user", "content": "Which sound does a cat make?"},
                    {"role": "assistant", "content": "The cat says meow."}]}


@pytest.fixture
def env(tmp_path) -> dict:
    home = tmp_path / "home"
    home.mkdir()
    return ({k: v for k, v in os.environ.items() if not k.startswith(("QLORA_", "AWS_"))}
            | {"COLUMNS": "400", "QLORA_HOME": str(home), "QLORA_URL": f"http://127.0.0.1:{free_port()}", "QLORA_API_KEY": GOOD_KEY})


def qlora(env: dict, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "app.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def refused(done: subprocess.CompletedProcess, message: str, code: int = 1) -> None:
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == code and done.stdout == "", (done.returncode, done.stdout, done.stderr)
    assert message in done.stderr, done.stderr


@pytest.mark.parametrize("key", ["qlk_with a space", "qlk_line\nbreak", "qlk_ünïcode"])
def test_a_key_no_server_would_take_is_named_not_sent(env, key):
    """A non-ASCII key made httpx fail to build the header (a traceback), one with a line break was
    reported as the server being out of reach."""
    refused(qlora(env, "jobs", "--api-key", key, "list"), "the API key from --api-key holds a space")
    assert key not in qlora(env, "jobs", "--api-key", key, "list").stderr  # never echoed


@pytest.mark.parametrize("url, problem", [
    ("http://[::1", "Invalid port"),  # httpx.InvalidURL: was a traceback
    ("localhost:8000", "must start with http:// or https://"),
    ("http://127.0.0.1:8000/?x=1", "takes no ?query"),  # was the dashboard's HTML read as JSON: a traceback
])
def test_a_url_that_cannot_be_used_is_named_with_where_it_came_from(env, url, problem):
    refused(qlora(env | {"QLORA_URL": url}, "jobs", "list"), f"the server URL from QLORA_URL, {url!r}, cannot be used")
    refused(qlora(env | {"QLORA_URL": url}, "jobs", "list"), problem)


def test_an_empty_flag_is_refused_rather_than_replaced_by_another_identity(env):
    """`--api-key "$KEY"` with KEY unset used the environment's or the credentials file's key instead."""
    refused(qlora(env, "jobs", "--api-key", "", "list"), "--api-key is empty")
    refused(qlora(env, "datasets", "--url", "", "list"), "--url is empty")


@pytest.mark.parametrize("value", ["../jobs/0123/checkpoints", "", "ünï", "a" * 5000, "?status=running"])
def test_an_id_that_is_no_id_is_refused_before_a_request(env, value):
    """Ids went into the URL's path as typed: `datasets delete ../jobs/ID/checkpoints` reached DELETE
    /jobs/ID/checkpoints, and an empty or very long id ended in a traceback."""
    refused(qlora(env, "datasets", "delete", value), "is not a dataset id")
    refused(qlora(env, "jobs", "show", value), "is not a job id")
    refused(qlora(env, "jobs", "delete-artifact", "0" * 32, "--kind", "../checkpoints"), "is not an artifact kind")


def test_a_broken_credentials_file_is_named_and_not_read_where_it_is_not_needed(env):
    path = env["QLORA_HOME"] + "/credentials.json"
    no_env = {k: v for k, v in env.items() if k not in ("QLORA_URL", "QLORA_API_KEY")}
    for content in ("[1, 2]", '{"url": 5, "api_key": ["x"]}'):  # valid JSON, not the file's shape: a traceback
        with open(path, "w") as f:
            f.write(content)
        refused(qlora(no_env, "jobs", "list"), f"{path} must hold a JSON object")
    with open(path, "w") as f:
        f.write('{"url": ')
    refused(qlora(no_env, "jobs", "list"), f"cannot read {path}")
    # With the URL and the key in the environment the file is not needed: it used to fail on it anyway.
    refused(qlora(env, "jobs", "list"), "cannot reach the API")


def test_a_credentials_file_others_can_read_is_warned_about(env):
    path = env["QLORA_HOME"] + "/credentials.json"
    with open(path, "w") as f:
        json.dump({"url": env["QLORA_URL"], "api_key": GOOD_KEY}, f)
    os.chmod(path, 0o644)
    no_env = {k: v for k, v in env.items() if k not in ("QLORA_URL", "QLORA_API_KEY")}
    done = qlora(no_env, "jobs", "list")
    assert f"others on this machine can read it: chmod 600 {path}" in done.stderr
    os.chmod(path, 0o600)
    assert "chmod 600" not in qlora(no_env, "jobs", "list").stderr


def test_a_file_argument_that_never_ends_is_refused(env, tmp_path):
    """/dev/zero as a job spec was read whole into memory (20 GB before the OOM killer), as a dataset it was
    checked forever; a FIFO waited for a writer forever."""
    fifo = tmp_path / "spec.json"
    os.mkfifo(fifo)
    refused(qlora(env, "jobs", "create", str(fifo), "--dataset", "0" * 32, timeout=15), "is not a regular file", code=2)
    refused(qlora(env, "datasets", "check", "/dev/zero", timeout=15), "/dev/zero is not a regular file", code=2)
    refused(qlora(env, "datasets", "upload", str(fifo), timeout=15), "is not a regular file", code=2)


def test_a_spec_larger_than_the_api_takes_is_refused_unread(env, tmp_path):
    spec = tmp_path / "spec.json"
    spec.write_bytes(b" " * (16 << 20) + b"{}")
    refused(qlora(env, "jobs", "preflight", str(spec), "--dataset", "0" * 32), "is larger than 16 MiB")


def test_unicode_prints_on_a_terminal_that_cannot_show_it(env, tmp_path):
    """PYTHONIOENCODING=ascii (or LC_ALL=POSIX without UTF-8 mode): a unicode name ended in a UnicodeEncodeError."""
    data = tmp_path / "lång-🦙.jsonl"
    data.write_text(json.dumps(ROW) + "\n")
    done = qlora(env | {"PYTHONIOENCODING": "ascii"}, "datasets", "check", str(data), "--table")
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert "l?ng-?.jsonl: ok, format chat, 1 rows" in done.stdout


def test_output_to_a_full_disk_says_so(env, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps(ROW) + "\n")
    with open("/dev/full", "w") as full:
        done = subprocess.run([sys.executable, "-m", "app.cli", "datasets", "check", str(data)], cwd=ROOT, env=env,
                              stdout=full, stderr=subprocess.PIPE, text=True, timeout=60)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip() == "error: cannot write the output: No space left on device"
