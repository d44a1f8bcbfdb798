"""The web dashboard, driven in headless Chromium against the real deployment: sign in, upload,
create a job from the form, watch the loss curve draw itself from the job's stream, download the
adapter through the S3 presigned link; and what a user sees when a dataset or a field is wrong.

Chromium is Debian's package (installed here when missing); playwright only drives it."""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import shutil
import time
import uuid
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Page, expect

from app.db import session_scope
from app.teams import admin
from tests.deployment import lane, stored_spec, upload

REPO = Path(__file__).resolve().parents[2]
TRAIN_TIMEOUT_MS = 150_000
MAX_STEPS, LOGGING_STEPS, EVAL_STEPS = 60, 5, 20


@pytest.fixture(scope="module")
def team_key(deployment) -> str:
    return deployment.team_key("team-dashboard")


@pytest.fixture(scope="module")
def team(deployment, team_key) -> httpx.Client:
    """The same team, through the API: to check what the page shows against what the API holds."""
    return deployment.client(team_key)


@pytest.fixture
def page(browser, deployment):
    context = browser.new_context(base_url=deployment.url, viewport={"width": 1360, "height": 900},
                                  accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(20_000)
    yield page
    context.close()


def sign_in(page: Page, key: str) -> None:
    page.goto("/")
    expect(page).to_have_url(re.compile(r"#/signin$"))
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("heading", name="Jobs", exact=True)).to_be_visible()


def go(page: Page, link: str) -> None:
    page.locator("#nav").get_by_role("link", name=link, exact=True).click()


def train_path_points(page: Page) -> int:
    d = page.locator("#train-loss-path").get_attribute("d") or ""
    return len(re.findall(r"[ML]", d))


def read_stream(client: httpx.Client, job_id: str, timeout: float = 30) -> tuple[httpx.Response, list[tuple[str, dict]]]:
    """The whole of a job's event stream, parsed; returns when the server ends it."""
    messages: list[tuple[str, dict]] = []
    with client.stream("GET", f"/jobs/{job_id}/stream", timeout=timeout) as response:
        if response.status_code != 200:
            response.read()
            return response, messages
        event = None
        for line in response.iter_lines():
            if line.startswith("event: "):
                event = line.removeprefix("event: ")
            elif line.startswith("data: "):
                messages.append((event, json.loads(line.removeprefix("data: "))))
    return response, messages


def test_a_job_from_upload_to_download(page, deployment, worker, team, team_key, demo_data, tmp_path):
    # A wrong key is refused on the sign-in page, the team's key lets the user in.
    page.goto("/")
    page.get_by_label("API key").fill("qlk_not_a_real_key")
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("alert")).to_contain_text("not accepted")
    sign_in(page, team_key)

    # Upload the demo task and its held-out rows.
    go(page, "Datasets")
    for name in ("train", "validation"):
        page.get_by_label("JSONL file").set_input_files(demo_data[name])
        page.get_by_role("button", name="Upload").click()
        expect(page.locator("#upload-result")).to_contain_text(f"{name}.jsonl is ready")
    expect(page.locator("#upload-result")).to_contain_text("48 rows in chat format")
    expect(page.locator("#datasets-table tbody tr")).to_have_count(2)

    # The form comes pre-filled with the engine's defaults.
    go(page, "New job")
    form = page.locator("#new-job")
    expect(form.get_by_label("Rank (r)")).to_have_value("16")
    expect(form.get_by_label("Alpha")).to_have_value("32")
    expect(form.get_by_label("Dropout")).to_have_value("0.05")
    expect(form.get_by_label("Learning rate")).to_have_value("0.0002")
    expect(form.get_by_label("Batch size per device")).to_have_value("4")
    expect(form.get_by_label("Gradient accumulation steps")).to_have_value("4")
    expect(form.get_by_label("Max sequence length")).to_have_value("2048")
    expect(form.get_by_label("Warmup ratio")).to_have_value("0.03")
    expect(form.get_by_label("Quantization bits")).to_have_value("4")

    form.get_by_label("Name").fill("dashboard-demo")
    form.get_by_label("Base model").select_option("tiny")
    uploaded = {d["filename"]: d["id"] for d in team.get("/datasets").json()["data"]}
    form.get_by_label("Training dataset").select_option(uploaded["train.jsonl"])
    form.get_by_label("Validation dataset (optional)").select_option(uploaded["validation.jsonl"])
    form.get_by_label("Epochs").fill("")
    form.get_by_label("Max steps").fill(str(MAX_STEPS))
    form.get_by_label("Logging steps").fill(str(LOGGING_STEPS))
    form.get_by_label("Eval steps").fill(str(EVAL_STEPS))
    form.get_by_label("Save steps").fill("30")
    # The demo task's settings (worker/training/tiny.py demo_spec): a tiny model learns fast.
    form.get_by_label("Learning rate").fill("3e-3")
    form.get_by_label("LR scheduler").select_option("cosine")
    form.get_by_label("Batch size per device").fill("8")  # half the demo's: the curve in a minute on 2 cores
    form.get_by_label("Gradient accumulation steps").fill("1")
    form.get_by_label("Max sequence length").fill("64")
    form.get_by_label("Dropout").fill("0")
    form.get_by_label("Report prompts").fill("2")  # the eval report at the end: short, this test is about the curve
    form.get_by_label("Max new tokens").fill("8")
    form.get_by_role("button", name="Start training").click()

    # 201: the job's own page, following the job live. The creation preflights the dataset, the deployment's first,
    # which starts its preflight process (torch, transformers): past expect's 5 s on a loaded machine (failed 2 of 5).
    expect(page).to_have_url(re.compile(r"#/jobs/[0-9a-f]{32}$"), timeout=30_000)
    job_id = page.url.rsplit("/", 1)[1]
    expect(page.locator("#job-title")).to_have_text("dashboard-demo")

    # The train-loss path gains points while the job runs.
    seen_while_running: set[int] = set()
    deadline = time.monotonic() + TRAIN_TIMEOUT_MS / 1000
    while True:
        status = page.locator(".page-head .badge").inner_text().strip().lower()
        points = train_path_points(page) if page.locator("#train-loss-path").count() else 0
        if status in ("succeeded", "failed", "cancelled"):
            break
        if status == "running":
            seen_while_running.add(points)
        assert time.monotonic() < deadline, f"job still {status} after {TRAIN_TIMEOUT_MS} ms\n{deployment.log('worker-shared')}"
        time.sleep(0.25)
    assert status == "succeeded", page.locator("#view").inner_text()
    growing = sorted(n for n in seen_while_running if n > 0)
    assert len(growing) >= 2, f"the curve did not grow while the job ran: {sorted(seen_while_running)}"

    # At the end: every logged step drawn, the eval series, the job's story and its checkpoints.
    final_points = MAX_STEPS // LOGGING_STEPS
    expect(page.locator("#train-loss-path")).to_have_attribute("data-points", str(final_points))
    assert train_path_points(page) == final_points
    expect(page.locator("#eval-loss-path")).to_have_attribute("data-points", str(MAX_STEPS // EVAL_STEPS))
    expect(page.get_by_role("progressbar", name="Training progress").first).to_have_attribute("aria-valuenow", "100")
    expect(page.locator("#events li[data-type='succeeded']")).to_have_count(1)
    expect(page.locator("#checkpoints tbody tr")).not_to_have_count(0)
    summary = page.locator("#summary")
    expect(summary).to_contain_text("Merge fidelity")
    expect(summary).to_contain_text("Tokens / s")
    expect(summary).to_contain_text("Peak memory")

    # The adapter downloads through the S3 presigned link, byte for byte what the API lists.
    artifacts = {a["kind"]: a for a in team.get(f"/jobs/{job_id}/artifacts").json()}
    button = page.get_by_role("button", name=re.compile("^Download adapter"))
    expect(button).to_be_enabled()
    with page.expect_download() as download_info:
        button.click()
    download = download_info.value
    assert download.failure() is None
    assert download.suggested_filename == "dashboard-demo-adapter.tar"
    saved = Path(download.path())
    assert saved.stat().st_size == artifacts["adapter"]["bytes"]
    assert hashlib.sha256(saved.read_bytes()).hexdigest() == artifacts["adapter"]["sha256"]

    page.screenshot(path=tmp_path / "dashboard.png", full_page=True)
    results = REPO / "bench" / "results"  # gitignored
    results.mkdir(parents=True, exist_ok=True)
    shutil.copy(tmp_path / "dashboard.png", results / "dashboard.png")

    # The stream of a finished job replays it all, then ends with its final state.
    response, messages = read_stream(team, job_id)
    assert response.headers["content-type"].startswith("text/event-stream")
    metrics = [m for kind, m in messages if kind == "metric"]
    assert [m["step"] for m in metrics if m["kind"] == "train"] == list(range(LOGGING_STEPS, MAX_STEPS + 1, LOGGING_STEPS))
    assert [m["step"] for m in metrics if m["kind"] == "eval"] == list(range(EVAL_STEPS, MAX_STEPS + 1, EVAL_STEPS))
    assert messages[-1][0] == "job" and messages[-1][1]["status"] == "succeeded"

    # The jobs table shows it, finished.
    go(page, "Jobs")
    row = page.locator(f"#jobs-table tr[data-job-id='{job_id}']")
    expect(row).to_contain_text("dashboard-demo")
    expect(row.locator(".badge")).to_have_text("succeeded")
    expect(row).to_contain_text(f"{MAX_STEPS} / {MAX_STEPS}")


def test_a_page_whose_team_is_disabled_signs_out_saying_why(page, deployment):
    """The page signed out on any 401 saying the key was "revoked or mistyped": a disabled team's people
    would check their key for nothing. It says what the API says: the team is disabled, by whom it comes back."""
    name = f"leaving-{uuid.uuid4().hex[:6]}"
    key = deployment.team_key(name)
    sign_in(page, key)
    with session_scope(deployment.settings.database_url) as session:
        admin.disable_team(session, name)  # `qlora admin disable-team`
    time.sleep(deployment.settings.key_cache_s)  # what the API process read of the key before, it trusts this long
    go(page, "Datasets")
    expect(page).to_have_url(re.compile(r"#/signin$"))
    expect(page.get_by_role("status")).to_contain_text(f"team '{name}' is disabled")
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("alert")).to_contain_text(f"qlora admin enable-team {name}")


def test_an_invalid_dataset_shows_its_bad_lines(page, team, team_key, tmp_path):
    good = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})
    bad_role = json.dumps({"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]})
    content = "\n".join([good, "{not json", good, bad_role, good]).encode()
    sign_in(page, team_key)
    go(page, "Datasets")
    page.get_by_label("JSONL file").set_input_files({"name": "broken.jsonl", "mimeType": "application/jsonl",
                                                      "buffer": content})
    page.get_by_role("button", name="Upload").click()

    report = page.locator("#upload-result .validation-report")
    expect(report).to_contain_text("broken.jsonl is invalid: 2 bad lines")
    rows = report.locator("tbody tr")
    expect(rows).to_have_count(2)
    dataset = next(d for d in team.get("/datasets").json()["data"] if d["filename"] == "broken.jsonl")
    assert [e["line"] for e in dataset["errors"]] == [2, 4]
    for i, error in enumerate(dataset["errors"]):
        expect(rows.nth(i).locator("td").nth(0)).to_have_text(str(error["line"]))
        expect(rows.nth(i).locator("td").nth(1)).to_have_text(error["message"])
    # The list keeps the report for later.
    listed = page.locator(f"#datasets-table tr[data-dataset-id='{dataset['id']}']")
    expect(listed.locator(".badge")).to_have_text("invalid")
    listed.get_by_text("2 bad lines").click()
    expect(listed.locator("tr[data-line='4']")).to_contain_text(dataset["errors"][1]["message"])
    page.screenshot(path=tmp_path / "datasets.png", full_page=True)


def test_a_bad_hyperparameter_is_explained_next_to_its_field(page, team, team_key, demo_data, tmp_path):
    assert upload(team, demo_data["validation"], name="small.jsonl").status_code == 201
    jobs_before = len(team.get("/jobs").json()["data"])
    sign_in(page, team_key)
    go(page, "New job")
    form = page.locator("#new-job")
    form.get_by_label("Learning rate").fill("5")
    form.get_by_label("Warmup ratio").fill("1.5")
    form.get_by_role("button", name="Start training").click()

    for field, allowed in (("training.learning_rate", "allowed: > 0 and <= 1"),
                           ("training.warmup_ratio", "allowed: >= 0 and < 1")):
        box = page.locator(f"[data-field='{field}']")
        expect(box.locator(".field-error")).to_be_visible()
        expect(box.locator(".field-error")).to_contain_text(allowed)
        expect(box.locator("input")).to_have_attribute("aria-invalid", "true")
    expect(page.locator("#form-errors")).to_contain_text("The job was not created")
    expect(page.locator("[data-field='lora.r'] .field-error")).to_be_hidden()
    expect(page).to_have_url(re.compile(r"#/jobs/new$"))
    assert len(team.get("/jobs").json()["data"]) == jobs_before
    page.screenshot(path=tmp_path / "new-job-errors.png", full_page=True)


# Markup as a hostile tenant writes it wherever it may write text: each piece would run if it were parsed.
HOSTILE = """<img src=x onerror="window.pwned='img'"><script>window.pwned='script'</script><svg onload="window.pwned='svg'">"""


def test_a_teams_text_shows_as_written_and_runs_nothing(page, team, team_key):
    """A job's name, a file's name, a bad line echoed in its error, a row's text: the page shows them as
    text, and its policy refuses inline script besides, so nothing reaches the key it keeps."""
    page.add_init_script("window.refused = []; document.addEventListener('securitypolicyviolation', "
                         "(e) => window.refused.push(e.violatedDirective));")
    row = json.dumps({"messages": [{"role": "user", "content": HOSTILE}, {"role": "assistant", "content": HOSTILE}]})
    ready = upload(team, content=f"{row}\n".encode(), name=f"{HOSTILE}.jsonl").json()
    invalid = upload(team, content=json.dumps({HOSTILE: 1}).encode() + b"\n", name=f"bad {HOSTILE}.jsonl").json()
    assert invalid["status"] == "invalid" and HOSTILE[:60] in invalid["errors"][0]["message"]  # echoed
    created = team.post("/jobs", json={"dataset_id": ready["id"], "name": HOSTILE, "metadata": {"note": HOSTILE},
                                       "base_model": "tiny", "gpu_class": lane("nobody"), "training": {"max_steps": 5}})
    assert created.status_code == 201, created.text
    job_id = created.json()["id"]

    sign_in(page, team_key)
    expect(page.locator(f"#view a[href='#/jobs/{job_id}']")).to_have_text(HOSTILE)
    go(page, "Datasets")
    expect(page.locator(f"#datasets-table tr[data-dataset-id='{ready['id']}']")).to_contain_text(ready["filename"])
    listed = page.locator(f"#datasets-table tr[data-dataset-id='{invalid['id']}']")
    listed.get_by_text("1 bad line").click()
    expect(listed.locator("tr[data-line='1']")).to_contain_text(invalid["errors"][0]["message"])
    go(page, "New job")
    expect(page.locator("#new-job").get_by_label("Training dataset")).to_contain_text(ready["filename"])
    page.goto(f"/#/jobs/{job_id}")
    expect(page.locator("#view h1")).to_have_text(HOSTILE)
    expect(page).to_have_title(f"{HOSTILE} · qlora-service")
    for path in ("#/jobs", "#/datasets", "#/usage"):
        page.goto(f"/{path}")
        expect(page.locator("#view h1")).to_be_visible()
    assert page.evaluate("window.pwned") is None
    assert page.evaluate("window.refused") == []  # not refused either: nothing was parsed as markup
    assert team.post(f"/jobs/{job_id}/cancel").status_code == 200

def test_an_upload_or_a_job_whose_answer_was_lost_is_made_once_when_sent_again(page, team, team_key):
    """The page's POST reached the API, which made the dataset or the job, but its answer never came back (a proxy's
    504 after a minute of preflight, a dropped connection): the page said it failed, and the user sent it again. That
    made a second dataset, and a second job of hours. The page sends an Idempotency-Key that stays while the form
    does, so the API answers the second with what the first made."""
    name = f"lost-{uuid.uuid4().hex[:8]}"
    row = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})
    lost: set[str] = set()

    def lose_the_first_answer(route) -> None:
        path = route.request.url.split("?")[0]
        if route.request.method != "POST" or path in lost:
            return route.continue_()
        route.fetch()  # the API makes it...
        lost.add(path)
        route.abort("connectionreset")  # ...and the page never hears of it

    page.route(re.compile(r"/(datasets|jobs)$"), lose_the_first_answer)
    sign_in(page, team_key)
    go(page, "Datasets")
    page.get_by_label("JSONL file").set_input_files({"name": f"{name}.jsonl", "mimeType": "application/jsonl",
                                                      "buffer": f"{row}\n".encode()})
    page.get_by_role("button", name="Upload").click()
    expect(page.locator("#upload-result .alert-error")).to_be_visible()  # the page saw the upload fail
    page.get_by_role("button", name="Upload").click()
    expect(page.locator("#upload-result .alert-ok")).to_contain_text(f"{name}.jsonl is ready")
    datasets = [d for d in team.get("/datasets", params={"limit": 200}).json()["data"] if d["filename"] == f"{name}.jsonl"]
    assert len(datasets) == 1, datasets

    go(page, "New job")
    form = page.locator("#new-job")
    form.get_by_label("Name").fill(name)
    form.get_by_label("Training dataset").select_option(datasets[0]["id"])
    form.get_by_role("button", name="Start training").click()
    # The page saw the request fail (a creation runs its preflight first: seconds on a loaded machine).
    expect(page.locator("#form-errors .alert-error")).to_be_visible(timeout=60_000)
    form.get_by_role("button", name="Start training").click()
    expect(page).to_have_url(re.compile(r"#/jobs/[0-9a-f]{32}$"), timeout=60_000)
    jobs = [j for j in team.get("/jobs", params={"limit": 200}).json()["data"] if j["name"] == name]
    assert [j["id"] for j in jobs] == [page.url.rsplit("/", 1)[1]], jobs
    assert team.post(f"/jobs/{jobs[0]['id']}/cancel").status_code == 200


def test_a_list_asks_again_only_while_its_tab_is_seen(page, team_key):
    """The jobs list asked for /jobs?limit=100 every 3 s in every open tab, seen or not: a team's forgotten tabs
    each pulled its list for as long as they stayed open. Out of sight it asks for nothing now (the page's clock
    run two minutes on), and once seen again it refreshes at once."""
    listed: list[str] = []
    page.on("request", lambda request: listed.append(request.url) if "/jobs?limit=100" in request.url else None)
    page.clock.install()
    sign_in(page, team_key)
    seen = "(hidden) => { Object.defineProperty(document, 'hidden', {configurable: true, get: () => hidden});" \
           " document.dispatchEvent(new Event('visibilitychange')); }"
    with page.expect_response(lambda response: "/jobs?limit=100" in response.url):
        page.clock.run_for(3_000)  # seen: again 3 s after the answer before
    page.evaluate(seen, True)
    asked = len(listed)
    page.clock.run_for(120_000)
    assert len(listed) == asked, listed[asked:]
    with page.expect_request(lambda request: "/jobs?limit=100" in request.url):
        page.evaluate(seen, False)
        page.clock.run_for(1)


def test_a_job_is_paused_and_resumed_from_its_page(page, deployment, team, team_key, demo_data):
    """The service pauses a job whose attempts keep ending on a full disk or an outage (its team resumes it
    once that is mended); the page offered cancel alone, so only the API or the CLI could resume it. The job
    is put in each state directly (no worker here); the requests are the API's own."""
    from datetime import timedelta

    from sqlalchemy import update

    from app.db import session_scope, utcnow
    from app.jobs.tables import Job

    dataset = upload(team, demo_data["validation"], name="pause.jsonl").json()
    job_id = team.post("/jobs", json={"dataset_id": dataset["id"], "base_model": "tiny", "gpu_class": lane("nobody"),
                                      "training": {"max_steps": 5}}).json()["id"]

    def put(**values) -> None:
        with session_scope(deployment.settings.database_url) as session:
            session.execute(update(Job).where(Job.id == job_id).values(**values))

    # Running, with a heartbeat the reaper will not find stale while the test runs.
    put(status="running", attempt=1, worker="w-test", claimed_at=utcnow(), heartbeat_at=utcnow() + timedelta(hours=1))
    sign_in(page, team_key)
    # Every stream the key may hold is open (other tabs, say): the stream answers 429. The page said "This job
    # cannot be shown" for good; it says why it is not live and tries again, and follows the job once one closes.
    with contextlib.ExitStack() as held:
        for _ in range(deployment.settings.max_streams_per_key):
            assert held.enter_context(team.stream("GET", f"/jobs/{job_id}/stream")).status_code == 200
        page.goto(f"/#/jobs/{job_id}")
        expect(page.locator("#view")).to_contain_text("live streams open")  # why it is not live
    button = page.locator("#pause-resume-job")
    expect(button).to_have_text("Pause job")  # live, once a stream is free, by itself
    expect(page.locator("#stream-notice")).to_be_hidden()
    button.click()
    expect(button).to_have_text("Pausing…")
    expect(button).to_be_disabled()
    assert team.get(f"/jobs/{job_id}").json()["status"] == "pausing"

    put(status="paused", worker=None)  # as its worker records it, once the checkpoint is saved
    page.reload()
    expect(button).to_have_text("Resume job")
    button.click()
    expect(page.locator(".title-line .badge")).to_have_text("queued")
    expect(button).to_have_text("Pause job")
    expect(button).to_be_disabled()  # a queued job has nothing to pause
    assert team.get(f"/jobs/{job_id}").json()["status"] == "queued"
    assert team.post(f"/jobs/{job_id}/cancel").status_code == 200


def test_the_stream_is_team_scoped_and_ends_with_the_final_state(deployment, team, team_b, demo_data):
    dataset = upload(team, demo_data["validation"], name="stream.jsonl").json()
    created = team.post("/jobs", json={"dataset_id": dataset["id"], "base_model": "tiny", "gpu_class": lane("nobody"),
                                       "training": {"max_steps": 5}})
    assert created.status_code == 201, created.text
    job_id = created.json()["id"]

    # Another team's job answers 404, like a missing one, before anything is streamed.
    for client, path in ((team_b, f"/jobs/{job_id}/stream"), (team, "/jobs/0123456789abcdef0123456789abcdef/stream")):
        response = client.get(path)
        assert response.status_code == 404 and response.json()["error"]["code"] == "not_found", response.text

    assert team.post(f"/jobs/{job_id}/cancel").json()["status"] == "cancelled"  # queued: cancelled at once
    started = time.monotonic()
    response, messages = read_stream(team, job_id)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    # A finished job's stream ends on its own: one that did not would stay open for ever (a keepalive every
    # STREAM_KEEPALIVE_S), so any bound tells them apart; a generous one, not a loaded machine's speed.
    assert time.monotonic() - started < 60
    assert [m["type"] for kind, m in messages if kind == "event"][0] == "created"
    assert "cancelled" in [m["type"] for kind, m in messages if kind == "event"]
    assert [kind for kind, _ in messages].count("job") == 1
    assert messages[-1] == ("job", team.get(f"/jobs/{job_id}").json())


def test_the_dashboard_may_not_be_framed_by_another_site_nor_run_another_sites_script(deployment):
    """It acts with the key it keeps (cancel, delete): a page that framed it could steer a user's clicks,
    and a script from elsewhere could read the key."""
    # The page is also its file under /static, and is the same dashboard there.
    for path in ("/", "/static/index.html"):
        response = deployment.client(None).get(path)
        assert response.status_code == 200 and "<main id=\"view\"" in response.text, path
        assert response.headers["x-frame-options"] == "DENY", path
        policy = dict(part.strip().split(" ", 1) for part in response.headers["content-security-policy"].split(";"))
        assert policy["frame-ancestors"] == "'none'" and policy["script-src"] == "'self'"
        assert policy["default-src"] == "'none'" and policy["connect-src"] == "'self'"
        # HEAD, as an uptime probe asks: the same headers, no body (the page answered it 405).
        head = deployment.client(None).head(path)
        assert head.status_code == 200 and head.content == b"" and head.headers["x-frame-options"] == "DENY", path


def test_every_answer_says_how_to_treat_it(deployment, team):
    """Not sniffed into another type, no Referer onward; a team's data not kept in a browser's cache past
    a sign-out (where a route sets no caching of its own); the dashboard's modules revalidated."""
    for response in (team.get("/models"), team.get("/quota"), deployment.client(None).get("/static/js/main.js"),
                     deployment.client(None).get("/health")):
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["referrer-policy"] == "no-referrer"
    assert team.get("/models").headers["cache-control"] == "no-store"
    assert team.get("/jobs").headers["cache-control"] == "private, no-cache"  # polled with its ETag: its own
    assert deployment.client(None).get("/static/js/main.js").headers["cache-control"] == "no-cache"
    assert "cache-control" not in deployment.client(None).get("/health").headers


def test_the_api_docs_run_only_the_pinned_files_they_were_checked_against(deployment):
    """/docs and /redoc share the dashboard's origin, where its key is kept: their CDN scripts are one
    release each, with the hash the browser checks (a changed file does not run)."""
    from app.web.routes import PINNED

    pages = {path: deployment.client(None).get(path).text for path in ("/docs", "/redoc")}
    for url, digest in PINNED.items():
        page = next(html for html in pages.values() if url in html)
        assert f'"{url}" integrity="{digest}" crossorigin="anonymous"' in page
    external = [u for html in pages.values() for u in re.findall(r'(?:src|href)="(https://cdn[^"]+)"', html)]
    assert sorted(external) == sorted(PINNED)  # every script and stylesheet from the CDN is pinned


def test_a_job_with_a_long_curve_and_many_events_draws_them_in_bounded_time(page, deployment, team, team_key):
    """130,000 logged steps (Math.max(...points) threw past ~125,000, and the page stopped drawing) and
    1,000 events: the page keeps at most 4,000 of the points and draws the thinned curve (GET
    /jobs/{id}/metrics?points=N), which keeps a one-step spike that an even sample stepped over; the events
    list shows the newest 200, the only ones the page holds."""
    from sqlalchemy import insert

    from app.db import session_scope
    from app.jobs.tables import Job, JobEvent, JobMetric
    from app.teams import repository as teams

    with session_scope(deployment.settings.database_url) as session:
        team_id = teams.team_by_name(session, "team-dashboard").id
        job = Job(team_id=team_id, status="succeeded", base_model="tiny", queue="gpu-nobody", spec=stored_spec(), name="long",
                  step=130_000)
        session.add(job)
        session.flush()
        session.execute(insert(JobMetric), [{"job_id": job.id, "kind": "train", "step": step,
                                             "train_loss": 9.5 if step == 77_777 else 2 + 1 / step}
                                            for step in range(1, 130_001)])
        session.execute(insert(JobEvent), [{"job_id": job.id, "attempt": 1, "type": "checkpoint_saved", "level": "info",
                                            "step": n, "message": f"checkpoint {n}"} for n in range(1, 1001)])
        job_id = job.id
    sign_in(page, team_key)
    streams: list[str] = []
    page.on("request", lambda request: streams.append(request.url) if "/stream" in request.url else None)
    page.goto(f"/#/jobs/{job_id}")
    expect(page.locator("#chart-svg-desc")).to_contain_text("at step 130000.", timeout=120_000)  # every point drawn
    expect(page.locator("#chart-svg-desc")).to_contain_text(" at step 1 to ")
    # The page holds a bounded series (it held all 130,000 for as long as it stayed open), and draws the thinned
    # curve: at most 2,000 points, the spike at step 77,777 among them (the y axis reaches it).
    expect(page.locator("#loss-chart")).to_have_attribute("data-thinned", str((130_000 - 1) // (4_000 // 8) + 1),
                                                          timeout=60_000)
    assert int(page.locator("#train-loss-path").get_attribute("data-points") or 0) <= 2000
    assert 500 <= train_path_points(page) <= 2000
    assert max(float(tick) for tick in page.locator(".tick-label[text-anchor='end']").all_text_contents()) >= 9.5
    expect(page.locator("#older-events")).to_contain_text("and 800 older events")
    assert page.locator("#events li").count() == 201
    assert page.locator("#events").get_attribute("data-held") == "200"  # it held all 1,000 events it was sent
    # The page knew the job was long, drew the thinned view, and opened its stream past that view's end: it was not
    # sent the 130,000 points again (~25 MB here; ~100 MB for 500,000 points, on every reconnect). From a step before
    # the view's end: an evaluation at its last step, recorded after that step's train point, may still come.
    assert streams and all(url.endswith(f"/jobs/{job_id}/stream?after_step=129999") for url in streams), streams


def test_the_job_pages_events_stay_bounded_and_count_the_older_ones_and_their_warnings(page):
    """The job page's events (event-log.js), fed as the stream feeds them, in the browser: the page held every event
    it was sent for as long as it stayed open (a job that saves every step has as many as steps, and each
    reconnect replays them all). It keeps the newest 200, the ones the list shows, and counts the older ones and
    their warnings, once each however often they are replayed; an event sent again replaces the one kept."""
    page.goto("/")
    seen = page.evaluate("""async () => {
        const { EventLog } = await import("/static/js/event-log.js");
        const feed = (log, last) => { let most = 0;
            for (let id = 1; id <= last; id++) {
                log.add({ id, level: id % 10 === 0 ? "warning" : "info", type: "checkpoint_saved", step: id });
                most = Math.max(most, log.size);
            }
            return most; };
        const short = new EventLog();
        feed(short, 150);
        short.add({ id: 150, level: "info", type: "succeeded", step: 150 });  // sent again, changed: no longer a warning
        const long = new EventLog();
        const most = Math.max(feed(long, 5000), feed(long, 5000));  // a reconnect replays them all
        const ids = long.newestFirst().map((e) => e.id);
        return { short: short.size, shortOlder: short.older, shortWarnings: short.warnings,
                 shortNewest: short.newestFirst()[0].type, most, newest: ids[0], oldest: ids[ids.length - 1],
                 kept: ids.length, older: long.older, warnings: long.warnings };
    }""")
    assert (seen["short"], seen["shortOlder"], seen["shortWarnings"], seen["shortNewest"]) == (150, 0, 14, "succeeded")
    assert seen["most"] == seen["kept"] == 200 and (seen["newest"], seen["oldest"]) == (5000, 4801)
    assert seen["older"] == 4800 and seen["warnings"] == 500  # counted once, though sent twice


def test_the_job_pages_series_stays_bounded_and_keeps_a_short_jobs_points_as_they_are(page):
    """The job page's loss series (series.js), fed as the stream feeds it, in the browser: a short job's points
    are all kept (its chart is what it was); a job logging 200,000 steps, replayed whole by a reconnect, never
    holds more than 4,000, keeping its first point, its newest 1,000 as they are and the older ones evenly by
    step. The page kept every point it was sent for as long as it stayed open."""
    page.goto("/")
    seen = page.evaluate("""async () => {
        const { PointSeries } = await import("/static/js/series.js");
        const feed = (series, last) => { let most = 0;
            for (let step = 1; step <= last; step++) { series.set(step, { step }); most = Math.max(most, series.size); }
            return most; };
        const short = new PointSeries();
        feed(short, 4000);
        const long = new PointSeries();
        const most = Math.max(feed(long, 200000), feed(long, 200000));
        const steps = [...long.values()].map((p) => p.step).sort((a, b) => a - b);
        const older = steps.slice(0, -1000);
        const gaps = older.slice(1).map((step, i) => step - older[i]);
        return { short: short.size, most, first: steps[0], tail: steps.slice(-1000),
                 widest: Math.max(...gaps), thinned: older.length };
    }""")
    assert seen["short"] == 4000
    assert seen["most"] <= 4000 and seen["first"] == 1 and seen["tail"] == list(range(199_001, 200_001))
    assert seen["thinned"] >= 1000 and seen["widest"] <= 200_000 / 500  # the older ones spread over the whole run


def test_the_job_page_says_the_planned_steps_the_wait_and_the_phase(page, deployment, team, team_key, demo_data):
    """The job page showed "waiting for a worker" for a queued job whose preflight had counted its steps, "waiting for a
    free GPU of its class" behind a worker with no GPU, and "step 160 of 160 · 100%" through the save, the merge, the
    report and the uploads. It says the plan, the wait for what the machine has, and the phase, as GET /jobs/{id} does;
    the job is moved by the worker's own calls (no worker here)."""
    from app.db import utcnow
    from app.jobs import runs
    from app.operations import workers
    from worker.training.protocol import Progress, phase_event

    database_url = deployment.settings.database_url
    queue, started = deployment.settings.queue_for(lane("cpu-only")), utcnow()
    with session_scope(database_url) as session:  # the class's worker, on a machine with no GPU
        workers.beat(session, "dashboard-laptop:cpu", queue, started, device="cpu")
    try:
        dataset = upload(team, demo_data["train"], name="phases.jsonl").json()
        job_id = team.post("/jobs", json={"dataset_id": dataset["id"], "base_model": "tiny", "gpu_class": lane("cpu-only"),
                                          "training": {"max_steps": 160}}).json()["id"]
        sign_in(page, team_key)
        page.goto(f"/#/jobs/{job_id}")
        meta = page.locator("#progress-meta")
        expect(meta).to_contain_text("waiting for the CPU worker of its class to be free")
        expect(meta).to_contain_text("· 160 steps planned")
        with session_scope(database_url) as session:  # as the worker claims it, then relays the training process
            claimed = runs.claim(session, job_id, "dashboard-laptop:cpu")
            assert claimed is not None
        expect(meta).to_have_text("step 0 of 160 (planned) · 0% · preparing")
        with session_scope(database_url) as session:
            runs.report(session, job_id, claimed.attempt, [phase_event("merging", "merging", step=160)],
                        Progress(step=160, total_steps=160, tokens_seen=1000))
        expect(meta).to_have_text("step 160 of 160 · 100% · merging")
        with session_scope(database_url) as session:
            assert runs.finish(session, job_id, claimed.attempt, "succeeded", summary={})
        expect(meta).to_have_text("step 160 of 160 · 100%")
    finally:
        with session_scope(database_url) as session:
            workers.forget(session, "dashboard-laptop:cpu", started)
