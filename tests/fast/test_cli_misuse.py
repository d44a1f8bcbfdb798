"""The `qlora` client used carelessly, where no server is needed to see the answer: a key or URL that
cannot be used, an id that is no id, a credentials file that is broken or open to others, a file that
never ends, a terminal that cannot print unicode, an output file on a full disk.

Each must end with a message on stderr, exit 1 (2 for a bad argument, as typer says for any), nothing
on stdout and no traceback. The CLI runs as a user runs it: a subprocess. Where a request would be sent,
QLORA_URL names a port nothing listens on, so "cannot reach the API" there means the check came too late."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tarfile

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


def test_url_or_key_after_the_verb_says_where_it_goes(env):
    """`qlora jobs list --url URL` said only "No such option: --url", of an option the README lists."""
    refused(qlora(env, "jobs", "list", "--url", "http://127.0.0.1:1"),
            "No such option: --url: it goes before the command, `qlora jobs --url VALUE list ...`", code=2)
    refused(qlora(env, "datasets", "list", "--api-key", GOOD_KEY),
            "it goes before the command, `qlora datasets --api-key VALUE list ...` (or set QLORA_API_KEY)", code=2)
    assert "goes before" not in qlora(env, "jobs", "list", "--bogus").stderr  # any other unknown option as before


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
    # qlora()'s 60 s only turns the old hang into a failure: 15 s, less than a CLI's start takes on a loaded machine
    # at worst, could fail a refusal that came.
    refused(qlora(env, "jobs", "create", str(fifo), "--dataset", "0" * 32), "is not a regular file", code=2)
    refused(qlora(env, "datasets", "check", "/dev/zero"), "/dev/zero is not a regular file", code=2)
    refused(qlora(env, "datasets", "upload", str(fifo)), "is not a regular file", code=2)


def test_a_spec_larger_than_the_api_takes_is_refused_unread(env, tmp_path):
    spec = tmp_path / "spec.json"
    spec.write_bytes(b" " * (16 << 20) + b"{}")
    refused(qlora(env, "jobs", "preflight", str(spec), "--dataset", "0" * 32), "is larger than 16 MiB")


def test_host_memory_without_gpu_memory_is_refused_not_ignored(env, tmp_path):
    """`qlora estimate --host-memory 6` alone printed the estimate as if the option were not there."""
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"base_model": "m", "training": {"max_steps": 1}}))
    refused(qlora(env, "estimate", str(spec), "--host-memory", "6"), "give its --gpu-memory too", code=2)


def test_a_dataset_or_an_archive_given_as_the_spec_says_what_it_is(env, tmp_path):
    """`qlora jobs create demo/train.jsonl` said only "Extra data: line 2 column 1 (char 150)"; an adapter.tar
    given as the spec ended `qlora estimate` in a UnicodeDecodeError and `qlora train` in an UnboundLocalError."""
    dataset = tmp_path / "train.jsonl"
    dataset.write_text(json.dumps(ROW) + "\n" + json.dumps(ROW) + "\n")
    archive = tmp_path / "adapter.tar"
    archive.write_bytes(b"adapter/\x00\x00" + bytes(range(128, 256)))
    for_a_dataset = "it holds one JSON value per line, as a dataset (JSONL) does: a job spec is one JSON object"
    refused(qlora(env, "jobs", "create", str(dataset), "--dataset", "0" * 32), for_a_dataset)
    refused(qlora(env, "estimate", str(dataset)), for_a_dataset, code=2)
    for_an_archive = "is not a JSON text file (byte 11 is not UTF-8)"
    refused(qlora(env, "jobs", "create", str(archive), "--dataset", "0" * 32), for_an_archive)
    refused(qlora(env, "estimate", str(archive)), for_an_archive, code=2)
    refused(qlora(env, "train", str(archive), "--data", str(dataset), "--out", str(tmp_path / "run")), for_an_archive,
            code=2)


def test_a_number_too_long_to_read_in_a_spec_file_is_refused_naming_its_field(env, tmp_path):
    """A 5,000-digit training.max_steps in a spec file was "not valid JSON: Exceeds the limit (4300 digits) for
    integer string conversion ... use sys.set_int_max_str_digits()" from every command that reads one: read as
    the float it denotes, as the API reads a body, its field's own check names it and its range. `jobs create`
    says so before sending (inf is no JSON: the HTTP client crashed writing it), and so does a spec holding
    Infinity, which Python's parser takes."""
    spec = tmp_path / "spec.json"
    spec.write_text('{"base_model": "m", "training": {"max_steps": ' + "9" * 5000 + "}}")
    field = "training.max_steps: Input should be a finite number (got inf; allowed: >= 1 and <= 10000000)"
    for command in (["jobs", "create", str(spec), "--dataset", "0" * 32], ["jobs", "preflight", str(spec), "--dataset", "0" * 32]):
        done = qlora(env, *command)
        refused(done, field)
        assert "cannot reach" not in done.stderr and "set_int_max_str_digits" not in done.stderr, done.stderr
    refused(qlora(env, "estimate", str(spec)), field, code=2)
    refused(qlora(env, "train", str(spec), "--data", str(spec), "--out", str(tmp_path / "run")), field, code=2)
    spec.write_text('{"base_model": "m", "training": {"max_steps": 10, "learning_rate": Infinity}}')
    refused(qlora(env, "jobs", "create", str(spec), "--dataset", "0" * 32), "training.learning_rate: ")



def test_a_key_given_twice_in_a_spec_file_is_refused_naming_it_as_the_api_refuses_it(env, tmp_path):
    """A spec file with a key twice in one object (a learning_rate edited in by appending) was read keeping the
    last by every command that reads one: `qlora train` trained at 0.9 and `jobs create` sent 0.9, where the API
    refuses such a body naming the key. Now each command refuses the file with the API's own words, and `jobs
    create`/`preflight` before sending anything (QLORA_URL names a port nothing listens on)."""
    spec = tmp_path / "spec.json"
    spec.write_text('{"base_model": "m", "training": {"max_steps": 10, "learning_rate": 1e-4, "learning_rate": 0.9}}')
    # The API's words for such a body (app/routing.py), which the same exception (RepeatedKey) writes.
    said = f"{spec}: the key 'learning_rate' appears twice in one object: JSON readers keep one of the two"
    for command in (["jobs", "create", str(spec), "--dataset", "0" * 32], ["jobs", "preflight", str(spec), "--dataset", "0" * 32]):
        done = qlora(env, *command)
        refused(done, said)
        assert "cannot reach" not in done.stderr, done.stderr
    refused(qlora(env, "estimate", str(spec)), said, code=2)
    refused(qlora(env, "train", str(spec), "--data", str(spec), "--out", str(tmp_path / "run")), said, code=2)
    assert not (tmp_path / "run").exists()

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


class StandIn:
    """A stand-in for the API on loopback, answering every request with `status` and `body` (JSON), or
    holding it unanswered (`hold`: a server that takes its time, while the user presses Ctrl-C). Records
    each request's method, path and headers; `asked` is set once one has arrived."""

    def __init__(self, body: object = None, status: int = 200, hold: bool = False, later: object = None):
        import threading

        from tests.fast.loopback import JsonHandler, Loopback

        self.body, self.status, self.hold, self.later = body, status, hold, later  # later: every answer after the first
        self.requests: list[tuple[str, str, dict]] = []
        self.bodies: list[bytes] = []  # each request's body, in the order of `requests`
        self.asked, self._released = threading.Event(), threading.Event()
        stand_in = self

        class Handler(JsonHandler):
            def answer(self) -> None:
                stand_in.bodies.append(self.rfile.read(int(self.headers.get("content-length") or 0)))
                stand_in.requests.append((self.command, self.path, dict(self.headers)))
                stand_in.asked.set()
                if stand_in.hold:
                    stand_in._released.wait(60)
                    return
                later = stand_in.later is not None and len(stand_in.requests) > 1
                self.send_json(stand_in.later if later else stand_in.body, stand_in.status)

            do_GET = do_POST = do_DELETE = answer

        self._loopback = Loopback(Handler)
        self.url = self._loopback.url

    def close(self) -> None:
        self._released.set()
        self._loopback.close()


@pytest.fixture
def stand_in():
    servers: list[StandIn] = []

    def start(*args, **kwargs) -> StandIn:
        servers.append(StandIn(*args, **kwargs))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


ZEROS = "0" * 32


@pytest.mark.parametrize("body, args, what", [
    ({"items": 5}, ("jobs", "list"), 'the field "data" is missing'),  # was KeyError: 'data'
    ({"items": 5}, ("datasets", "list", "--json"), 'the field "data" is missing'),
    ({"data": 5}, ("jobs", "list"), 'its "data" is a number, not an array'),  # was TypeError
    ([1, 2], ("jobs", "show", ZEROS, "--json"), "it is an array, not an object"),  # was TypeError: list indices must be integers
    ([1, 2], ("datasets", "show", ZEROS), "it is an array, not an object"),
    ({"id": "x"}, ("jobs", "show", ZEROS, "--table"), 'a field "progress" is missing'),  # was KeyError in the table
    ({"id": "x", "filename": "f"}, ("datasets", "show", ZEROS, "--table"), 'a field "status" is missing'),
    ({"data": [{"id": "x"}]}, ("jobs", "list", "--table"), 'a field "name" is missing'),
    ({"data": [[1]]}, ("datasets", "list", "--table"), "TypeError: list indices must be integers"),
])
def test_an_answer_of_another_shape_is_named_not_a_traceback(env, stand_in, body, args, what):
    """JSON from the server that this CLI cannot read (another server, another version of the API) ended in a
    KeyError or TypeError traceback from wherever the command first read it, list or table."""
    server = stand_in(body)
    path = "/" + "/".join(arg for arg in args[:3] if arg not in ("list", "show") and not arg.startswith("--"))
    done = qlora(env | {"QLORA_URL": server.url}, *args)
    refused(done, f"error: the answer to GET {server.url}{path} is not what this CLI expects ({what}")
    assert "is the server at QLORA_URL (or --url) the qlora-service API, of this CLI's version?" in done.stderr


def test_watch_stops_at_an_answer_of_another_shape(env, stand_in):
    """`jobs watch` took an answer of another shape, after a good first one, for the API not answering, and
    asked again for 5 minutes ("the API is not answering; retrying")."""
    job = {"id": ZEROS, "name": "j", "status": "running", "step": 1, "total_steps": 10, "attempt": 1,
           "progress": {"step": 1, "total_steps": 10, "fraction": 0.1}, "error": None}
    server = stand_in(job, later=[1, 2])  # the job, then an array for its curve
    done = qlora(env | {"QLORA_URL": server.url}, "jobs", "watch", ZEROS, "--interval", "0.2", "--json", timeout=30)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert f"error: the answer to GET {server.url}/jobs/{ZEROS}/metrics is not what this CLI expects (it is an array, " \
           "not an object)" in done.stderr, done.stderr


def test_json_and_table_together_is_a_usage_error(env):
    """`--json --table` printed the table, `--table --json` the JSON: the last flag won, silently."""
    for flags in (("--json", "--table"), ("--table", "--json")):
        refused(qlora(env, "jobs", "list", *flags), "'--json' / '--table': cannot be used together", code=2)
        refused(qlora(env, "datasets", "check", "/dev/null", *flags), "cannot be used together", code=2)
    # Once each is fine, and the same flag twice is no contradiction.
    assert "cannot be used together" not in qlora(env, "jobs", "list", "--json", "--json").stderr


INVALID_JOB = {"error": {"code": "invalid_job", "message": "invalid job: training.learning_rate: Input should be "
                         "greater than 0 (got -1; allowed: > 0 and <= 1)",
                         "details": [{"field": "training.learning_rate",
                                      "message": "Input should be greater than 0 (got -1; allowed: > 0 and <= 1)"}]}}
TWO_FIELDS = [("lora.r", "Input should be greater than or equal to 1 (got 0; allowed: >= 1 and <= 1024)"),
              ("training.max_steps", "Input should be greater than or equal to 1 (got -3; allowed: >= 1 and <= 10000000)")]
INVALID_FIELDS = {"error": {"code": "invalid_job", "message": "invalid job: " + "; ".join(f"{f}: {m}" for f, m in TWO_FIELDS),
                            "details": [{"field": f, "message": m} for f, m in TWO_FIELDS]}}


def test_a_refused_job_says_each_field_once(env, stand_in, tmp_path):
    """The API writes its details into the message too (POST /jobs's 422, as the API answers it): the one
    line of a refusal printed its one detail twice, and a refusal of several fields each twice."""
    spec = tmp_path / "spec.json"
    spec.write_text("{}")
    one = qlora(env | {"QLORA_URL": stand_in(INVALID_JOB, status=422).url}, "jobs", "create", str(spec), "--dataset", "d")
    refused(one, "error: invalid job: training.learning_rate: Input should be greater than 0")
    assert one.stderr.count("training.learning_rate") == 1 and len(one.stderr.splitlines()) == 1, one.stderr
    several = qlora(env | {"QLORA_URL": stand_in(INVALID_FIELDS, status=422).url}, "jobs", "create", str(spec),
                    "--dataset", "d")
    refused(several, "error: invalid job:\n")
    for field, message in TWO_FIELDS:
        assert several.stderr.count(field) == 1 and f"\n  {field}: {message}\n" in several.stderr, several.stderr


def interrupted(env: dict, server: StandIn, *args: str) -> subprocess.CompletedProcess:
    """The command, sent Ctrl-C (SIGINT) once its request reached the server, which holds it unanswered."""
    import signal

    command = subprocess.Popen([sys.executable, "-m", "app.cli", *args], cwd=ROOT, env=env | {"QLORA_URL": server.url},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert server.asked.wait(30), command.kill() or command.communicate()
    command.send_signal(signal.SIGINT)
    stdout, stderr = command.communicate(timeout=30)
    return subprocess.CompletedProcess(command.args, command.returncode, stdout, stderr)


@pytest.mark.parametrize("args", [("jobs", "list"), ("jobs", "show", "0" * 32), ("datasets", "list"),
                                  ("datasets", "show", "0" * 32), ("jobs", "report", "0" * 32)])
def test_ctrl_c_while_reading_says_so(env, stand_in, args):
    """Ctrl-C exited 130 without a word."""
    done = interrupted(env, stand_in(hold=True), *args)
    refused(done, "interrupted; nothing was changed", code=130)
    assert len(done.stderr.splitlines()) == 1


def test_ctrl_c_during_a_creation_says_how_to_check_and_how_to_send_it_again_safely(env, stand_in, tmp_path):
    """Ctrl-C while POST /jobs was unanswered exited 130 without a word: the job may or may not exist, and
    the same command again sends a new Idempotency-Key, so it may make a second one."""
    spec = tmp_path / "spec.json"
    spec.write_text("{}")
    server = stand_in(hold=True)
    done = interrupted(env, server, "jobs", "create", str(spec), "--dataset", "d")
    refused(done, "interrupted; the job may or may not have been created (`qlora jobs list` shows it if it was)", code=130)
    [(method, path, headers)] = server.requests
    assert (method, path) == ("POST", "/jobs")
    assert f"add --idempotency-key {headers['Idempotency-Key']} " in done.stderr  # the key that request carried

    again = stand_in({"id": "j", "status": "queued"}, status=201)
    sent = qlora(env | {"QLORA_URL": again.url}, "jobs", "create", str(spec), "--dataset", "d",
                 "--idempotency-key", headers["Idempotency-Key"])
    assert sent.returncode == 0, sent.stderr
    assert again.requests[0][2]["Idempotency-Key"] == headers["Idempotency-Key"]
    refused(qlora(env, "jobs", "create", str(spec), "--dataset", "d", "--idempotency-key", "a key"),
            "1 to 255 visible ASCII characters", code=2)


def test_ctrl_c_after_an_upload_went_whole_does_not_say_nothing_was_recorded(env, stand_in, tmp_path):
    """Ctrl-C while the server held the whole file (storing it, committing) said "nothing was recorded",
    which the server may well have done by then."""
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps(ROW) + "\n")
    server = stand_in(hold=True)  # reads the whole body, then answers nothing
    done = interrupted(env, server, "datasets", "upload", str(data))
    refused(done, "upload stopped after the whole file was sent; the server may have recorded it "
                  "(`qlora datasets list` shows it)", code=130)
    assert "nothing was recorded" not in done.stderr
    # The same command again sent a new Idempotency-Key, and recorded a second copy where the first was made:
    # it says the key that request carried, and --idempotency-key sends it again.
    [(method, path, headers)] = server.requests
    assert (method, path) == ("POST", "/datasets")
    assert f"add --idempotency-key {headers['Idempotency-Key']} " in done.stderr
    again = stand_in({"id": "d", "status": "ready", "filename": "data.jsonl", "format": "chat", "rows": 1,
                      "bytes": 1, "token_estimate": 1, "error_count": 0, "errors": []}, status=201)
    sent = qlora(env | {"QLORA_URL": again.url}, "datasets", "upload", str(data), "--json",
                 "--idempotency-key", headers["Idempotency-Key"])
    assert sent.returncode == 0, sent.stderr
    assert again.requests[0][2]["Idempotency-Key"] == headers["Idempotency-Key"]
    refused(qlora(env, "datasets", "upload", str(data), "--idempotency-key", "a key"),
            "1 to 255 visible ASCII characters", code=2)


def test_an_upload_that_breaks_off_leaves_the_bar_where_it_was(env, tmp_path):
    """A dropped connection mid-upload moved the bar back to 0 with a negative speed ("-245,754,566 bytes/s"):
    the client took the bytes sent back off the bar before deciding not to send the file again."""
    import re
    import socket
    import struct
    import threading

    data = tmp_path / "big.jsonl"
    # 16 MB: more than loopback's socket buffers hold, so the upload is still sending when the link drops (a
    # file that fits in them counts as sent whole, and is sent again).
    data.write_text((json.dumps(ROW) + "\n") * 135_000)
    listener = socket.create_server(("127.0.0.1", 0))

    def cut_off() -> None:  # read 2.5 MiB of each upload (the first two 1 MiB chunks whole), then reset the connection
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:  # closed: the test is over
                return
            got = 0
            while got < 5 << 19 and (chunk := connection.recv(65536)):
                got += len(chunk)
            connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            connection.close()

    threading.Thread(target=cut_off, daemon=True).start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    try:  # FORCE_COLOR: rich draws the bar as on a terminal
        done = qlora(env | {"QLORA_URL": url, "FORCE_COLOR": "1"}, "datasets", "upload", str(data), "--no-check", "--json")
    finally:
        listener.close()
    assert done.returncode == 1 and done.stdout == "" and "Traceback" not in done.stderr, done.stderr
    frames = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", done.stderr)
    assert not re.search(r"-[\d,.]+ \S*/s", frames), frames  # no negative speed
    last = re.findall(r"([\d.]+)/([\d.]+) MB", frames)[-1]  # the frame drawn as the bar stopped
    assert float(last[0]) > 0, frames  # the bar stays where the upload stopped
    # It was reached: "cannot reach the API ...: Server disconnected without sending a response.; is the server running"
    assert f"error: the connection to the API at {url} broke off" in done.stderr and ".;" not in done.stderr


@pytest.mark.parametrize("args, problem", [
    (["--name", "w" * 201], "--name: 1 to 200 characters"),  # past the workers table's column: every beat failed
    (["--name", "gpu-host\x1b[2J"], "--name: 1 to 200 characters without control characters"),
    (["--name", ""], "--name: 1 to 200 characters"),  # was replaced by host:cpu without a word
    (["--gpu-class", 'a100"\nqlora_jobs{status="x"} 1'], "--gpu-class: lowercase letters, digits"),
    (["--gpu-class", "g" * 101], "--gpu-class: lowercase letters, digits"),
])
def test_a_worker_name_or_gpu_class_no_record_can_hold_is_refused_before_it_starts(env, args, problem):
    """`qlora worker` took any --name and --gpu-class: a name past 200 characters (or a queue past 100) failed
    every beat into the workers table, so the worker never showed as alive in /metrics or `qlora admin status`
    while it took jobs, and its claims failed; control characters went into the operators' views as typed."""
    refused(qlora(env, "worker", *args, timeout=120), problem, code=2)


def test_a_gpu_class_the_settings_serve_is_taken_as_configured():
    """An operator's own class names (QLORA_GPU_CLASSES='{"A100": 80}': admission places jobs there) stay
    servable; only a class the settings do not serve must be named as a job's gpu_class."""
    from app.operations.workers import worker_problems

    assert worker_problems("gpu-host-1:gpu0", "A100", ["A100", "l4"]) == []
    assert worker_problems("gpu-host-1:gpu0", "l4", ["A100", "l4"]) == []
    assert worker_problems("gpu-host-1:gpu0", "a100-80gb", ["l4"]) == []  # unserved, well named: only a warning
    [problem] = worker_problems("gpu-host-1:gpu0", "A100", ["l4"])
    assert problem.startswith("--gpu-class: lowercase letters")


def test_a_download_that_never_started_leaves_no_empty_progress_bar(env):
    """A download refused before its first byte (no such job, the API out of reach) printed an empty
    "downloading adapter ━━━ 0/? bytes" bar above its error, as if something had begun."""
    done = qlora(env, "jobs", "download", "a" * 32, "--kind", "adapter")
    refused(done, "cannot reach the API")
    assert "downloading" not in done.stderr and "bytes" not in done.stderr, done.stderr


@pytest.mark.parametrize("args", [("jobs", "show", "ftjob-" + ZEROS), ("jobs", "cancel", "ftjob-" + ZEROS),
                                  ("jobs", "download", "ftjob-" + ZEROS), ("datasets", "show", "file-" + ZEROS)])
def test_an_id_as_the_openai_sdk_printed_it_names_the_same_object(env, stand_in, args):
    """A job made with the openai SDK is `ftjob-<id>` there, and its weights are downloaded with `qlora jobs
    download`: given that id, the CLI asked for /jobs/ftjob-<id> and said "no job 'ftjob-…'", naming no fix."""
    server = stand_in({"error": {"code": "not_found", "message": "no such thing"}}, status=404)
    qlora(env | {"QLORA_URL": server.url}, *args, "--json")
    method, path, _ = server.requests[0]
    assert path.startswith(f"/{args[0]}/{ZEROS}"), path


def test_a_download_by_the_openai_sdk_id_is_named_by_the_job_id(env, tmp_path):
    """The archive of `qlora jobs download ftjob-<id>` was ftjob-<id>-adapter.tar (its part file too): the same
    download by the plain id, or a retry by it, started over beside it."""
    from tests.fast.loopback import JsonHandler, Loopback

    archive = tmp_path / "archive.tar"
    with tarfile.open(archive, "w") as tar:
        tar.addfile(tarfile.TarInfo("adapter/"))
    data = archive.read_bytes()
    digest = hashlib.sha256(data).hexdigest()

    class Handler(JsonHandler):
        def do_GET(self):
            if self.path.endswith("/artifacts"):
                self.send_json([{"kind": "adapter", "bytes": len(data), "sha256": digest}])
                return
            self.send_response(200)
            self.send_header("content-length", str(len(data)))
            self.send_header("etag", f'"{digest}"')
            self.end_headers()
            self.wfile.write(data)

    server = Loopback(Handler)
    try:
        done = qlora(env | {"QLORA_URL": server.url}, "jobs", "download", "ftjob-" + ZEROS, "--out", str(tmp_path / "run"))
    finally:
        server.close()
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["job_id"] == ZEROS and answer["archive"] == str(tmp_path / "run" / f"{ZEROS}-adapter.tar")


def test_a_job_from_openai_sdk_files_and_jobs_is_created_on_them(env, stand_in, tmp_path):
    """`--dataset file-<id>` (an upload made with the openai SDK) was sent as it was: "no dataset 'file-…'"."""
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"base_model": "tiny", "training": {"max_steps": 1}}))
    server = stand_in({"error": {"code": "not_found", "message": "no such thing"}}, status=404)
    qlora(env | {"QLORA_URL": server.url}, "jobs", "create", str(spec), "--dataset", "file-" + ZEROS,
          "--validation", "file-" + "1" * 32, "--initial-job", "ftjob-" + "2" * 32)
    sent = json.loads(server.bodies[0])
    assert (sent["dataset_id"], sent["validation_dataset_id"], sent["initial_job_id"]) == (ZEROS, "1" * 32, "2" * 32)


@pytest.mark.parametrize("status, why", [
    ("cancelled", "has no 'adapter' artifact: it was cancelled, and artifacts are made only when a job succeeds"),
    ("failed", "has no 'adapter' artifact: it failed, and artifacts are made only when a job succeeds"),
    ("running", f"has no 'adapter' artifact yet: it is running, and its artifacts are stored when it succeeds "
                f"(`qlora jobs watch {ZEROS}` follows it)"),
])
def test_a_download_of_a_job_without_artifacts_says_whether_to_wait(env, stand_in, status, why):
    """`qlora jobs download` of a cancelled or failed job said "(it has: none yet)": wait, for a job that never
    will have one."""
    server = stand_in([], later={"id": ZEROS, "status": status})  # GET .../artifacts, then GET /jobs/{id}
    refused(qlora(env | {"QLORA_URL": server.url}, "jobs", "download", ZEROS), why)


def test_help_wraps_sentences_where_the_terminal_ends_not_where_the_source_did(env):
    """typer keeps a docstring's line breaks: `qlora --help` broke "Exits 1 when --gpu-memory is given" / "and the job
    does not fit it." onto two lines of a 400-column terminal, and `jobs watch --help` its NDJSON shapes mid-sentence."""
    top = qlora(env, "--help")
    assert top.returncode == 0 and "Exits 1 when --gpu-memory is given and the job does not fit it." in top.stdout, top.stdout
    watch = qlora(env, "jobs", "watch", "--help")
    assert '{"kind": "status", "job"} when the status changes, or a queued job\'s queue_position or waiting_for, ' \
        '{"kind": "metric", "split": "train" or "eval", "point"}' \
        in watch.stdout, watch.stdout
    assert "\n\n" in watch.stdout.split("Usage:")[1]  # paragraphs stay apart


def test_a_pipe_gets_no_progress_bar_and_an_error_no_blank_line_above_it(env, stand_in, tmp_path):
    """On a pipe, rich printed a transfer's bar once as it stopped: `jobs download` of a failed job put an empty line
    (the bar, still hidden) above its error, and `datasets upload` left its finished bar in stderr."""
    failed = stand_in([], later={"id": ZEROS, "status": "failed"})  # GET .../artifacts, then GET /jobs/{id}
    done = qlora(env | {"QLORA_URL": failed.url}, "jobs", "download", ZEROS, "--out", str(tmp_path))
    refused(done, "has no 'adapter' artifact: it failed")
    assert done.stderr.startswith("error: ") and "" not in done.stderr.splitlines(), repr(done.stderr)

    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps(ROW) + "\n")
    recorded = {"id": ZEROS, "status": "ready", "error_count": 0, "errors": []}
    uploaded = qlora(env | {"QLORA_URL": stand_in(recorded).url}, "datasets", "upload", str(data))
    assert uploaded.returncode == 0 and json.loads(uploaded.stdout)["id"] == ZEROS, uploaded.stderr
    assert uploaded.stderr == "", repr(uploaded.stderr)
