"""Issue 14 in the dashboard, driven in headless Chromium against the real deployment: the new-job
form's preflight (the numbers per set, the GPU class, one row token by token with the trained tokens
highlighted, and a refusal that disables submit), and the job page's eval report (base against tuned,
in metrics and answer by answer) of a job that really trained.

Each test leaves a full-page screenshot in bench/results/ (gitignored), to be looked at."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from playwright.sync_api import Locator, Page, expect

from tests.deployment import lane, upload, wait_for_status
from tests.service.test_dashboard import go, page, sign_in  # noqa: F401 (page: a fixture)
from worker.training.tiny import demo_spec

REPO = Path(__file__).resolve().parents[2]
# The demo task in a few small steps: enough for the tuned model to learn the answers' shape (and a
# far lower loss) where the untrained base answers noise, in about a minute on 2 cores.
REPORT_STEPS, REPORT_BATCH, REPORT_PROMPTS, REPORT_NEW_TOKENS = 24, 8, 4, 12


@pytest.fixture(scope="module")
def team_key(deployment) -> str:
    return deployment.team_key("team-dashboard-report")


@pytest.fixture(scope="module")
def team(deployment, team_key):
    return deployment.client(team_key)


@pytest.fixture(scope="module")
def datasets(team, demo_data, tmp_path_factory) -> dict[str, str]:
    """The demo task (train and held-out rows, and a few held-out rows: the report's loss reads each
    twice), and rows whose assistant turns all sit past 16 tokens, their prompts holding markup that
    must show as text."""
    folder = tmp_path_factory.mktemp("dashboard-report")
    few_heldout = folder / "few_heldout.jsonl"
    few_heldout.write_text("".join(Path(demo_data["validation"]).read_text().splitlines(keepends=True)[:12]))
    long_prompts = folder / "long_prompts.jsonl"
    long_prompts.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": "<i>look</i> " + "word " * 30 + str(i)},
        {"role": "assistant", "content": "yes"}]}) + "\n" for i in range(6)))
    ids = {}
    for name, path in (("train", demo_data["train"]), ("validation", demo_data["validation"]),
                       ("few_heldout", few_heldout), ("long_prompts", long_prompts)):
        answer = upload(team, path, name=f"{name}.jsonl")
        assert answer.status_code == 201, answer.text
        ids[name] = answer.json()["id"]
    return ids


def keep_screenshot(shown: Page | Locator, tmp_path: Path, name: str) -> Path:
    """The whole page, or one part of it, saved in tmp_path and bench/results/."""
    path = tmp_path / name
    if isinstance(shown, Page):
        shown.screenshot(path=path, full_page=True)
    else:
        shown.screenshot(path=path)
    results = REPO / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    shutil.copy(path, results / name)
    return path


def fill_demo_form(tab: Page, datasets: dict[str, str], dataset: str, max_seq_length: int) -> None:
    form = tab.locator("#new-job")
    form.get_by_label("Base model").select_option("tiny")
    form.get_by_label("Training dataset").select_option(datasets[dataset])
    form.get_by_label("Validation dataset (optional)").select_option(datasets["validation"] if dataset == "train" else "")
    form.get_by_label("Epochs").fill("")
    form.get_by_label("Max steps").fill("40")
    form.get_by_label("Batch size per device").fill("16")
    form.get_by_label("Gradient accumulation steps").fill("1")
    form.get_by_label("Max sequence length").fill(str(max_seq_length))
    # What decides by eval loss needs the validation set, which only the demo task has here.
    with_validation = dataset == "train"
    form.get_by_label("Early stopping patience").fill("2" if with_validation else "")
    form.get_by_label("Ship the checkpoint with the best eval loss").set_checked(with_validation)
    form.get_by_label("Report prompts").fill("3")


def run_preflight(tab: Page) -> dict:
    """Click the form's preflight; returns the API's answer that the page drew."""
    with tab.expect_response(lambda r: r.url.endswith("/jobs/preflight")) as answered:
        tab.get_by_role("button", name="Run preflight").click()
    assert answered.value.status == 200, answered.value.text()
    expect(tab.locator("#preflight-verdict")).to_be_visible()
    return answered.value.json()


def test_the_form_shows_the_preflight_and_a_refusal_disables_submit(page, team, team_key, datasets, tmp_path):  # noqa: F811
    jobs_before = len(team.get("/jobs").json()["data"])
    sign_in(page, team_key)
    go(page, "New job")
    fill_demo_form(page, datasets, "train", max_seq_length=64)
    answer = run_preflight(page)

    # The demo task fits: every row kept whole, 40 steps, both sets counted.
    report = answer["report"]
    assert answer["can_learn"] is True and report["train"]["rows"] == 480 and report["validation"]["rows"] == 48
    # The form's body is the job's: its health and report settings among it.
    sized = answer["placement"]["spec"]
    assert sized["training"]["early_stopping"] == 2 and sized["output"]["use_best_checkpoint"] is True
    assert sized["eval"] == {"prompts": 3, "max_new_tokens": 64, "temperature": 0.0}
    expect(page.locator("#preflight-verdict")).to_contain_text(
        f"Ready to train: 480 rows, {report['train']['trained_tokens']:,} trained tokens, 40 steps.")
    sets = page.locator("#preflight-sets")
    expect(sets.locator("thead th")).to_have_text(["Number", "Train", "Validation"])
    rows_line = sets.locator("tbody tr").filter(has_text="Rows kept / read")
    expect(rows_line.locator("td")).to_have_text(["480 / 480", "48 / 48"])
    trained_line = sets.locator("tbody tr").filter(has_text=re.compile("^Trained tokens\\d"))
    train, validation = report["train"], report["validation"]
    expect(trained_line.locator("td")).to_have_text([
        f"{train['trained_tokens']:,} ({100 * train['trained_fraction']:.1f}%)",
        f"{validation['trained_tokens']:,} ({100 * validation['trained_fraction']:.1f}%)"])
    lengths = train["lengths"]
    expect(sets.locator("tbody tr").filter(has_text="p95").locator("td").first).to_have_text(
        f"{lengths['min']} / {lengths['median']} / {lengths['p95']} / {lengths['max']}")
    expect(sets.locator("td.flagged")).to_have_count(0)  # nothing truncated, dropped or without EOS
    run = page.locator("#preflight-run")
    expect(run).to_contain_text("Steps40")
    expect(run).to_contain_text(f"GPU class{answer['placement']['gpu_class']}")
    expect(page.locator("#preflight-refusals")).to_have_count(0)

    # The first row token by token, exactly as the API marks it: the prompt dimmed, the answer and
    # its EOS highlighted, and a legend saying which is which.
    tokens = report["examples"][0]["tokens"]
    drawn = page.locator("#preflight-example .tokens .tok")
    expect(drawn).to_have_count(len(tokens))
    assert [t == "true" for t in drawn.evaluate_all("els => els.map(e => e.dataset.trained)")] == \
           [t["trained"] for t in tokens]
    expect(page.locator("#preflight-example .tokens .tok-trained")).to_have_count(sum(t["trained"] for t in tokens))
    expect(drawn.last).to_have_text("</s>")
    expect(drawn.last).to_have_class(re.compile("tok-trained"))
    expect(drawn.first).to_have_class(re.compile("tok-context"))
    expect(page.locator("#preflight-example .chart-legend")).to_contain_text("trained: in the loss")
    expect(page.locator("#preflight-example .chart-legend")).to_contain_text("context: not trained")
    # Whitespace is drawn: each newline shows its mark and breaks the line, as the chat template has them.
    newlines = sum(t["text"].count("\n") for t in tokens)
    assert newlines >= 3  # after the BOS and role tags
    expect(page.locator("#preflight-example .tokens br")).to_have_count(newlines)
    expect(page.locator("#preflight-example .tokens .ws").filter(has_text="↵")).to_have_count(newlines)
    expect(page.get_by_role("button", name="Start training")).to_be_enabled()
    shot = keep_screenshot(page, tmp_path, "preflight.png")

    # Rows cut before their EOS: warnings, in amber, and the job can still be submitted.
    fill_demo_form(page, datasets, "train", max_seq_length=22)
    answer = run_preflight(page)
    assert answer["can_learn"] is True and answer["report"]["warnings"]
    warned = page.locator("#preflight-warnings")
    expect(warned.locator("li")).to_have_text(answer["report"]["warnings"])
    expect(warned).to_have_class(re.compile("alert-warn"))
    truncated = answer["report"]["train"]["truncated_rows"]
    expect(sets.locator("tbody tr").filter(has_text="Truncated").locator("td.flagged").first).to_have_text(f"{truncated:,}")
    expect(page.get_by_role("button", name="Start training")).to_be_enabled()
    warned_shot = keep_screenshot(page.locator("#preflight"), tmp_path, "preflight-warnings.png")

    # A dataset whose assistant turns all sit past max_seq_length: refused, with the reason, and the
    # form cannot submit it.
    fill_demo_form(page, datasets, "long_prompts", max_seq_length=16)
    answer = run_preflight(page)
    assert answer["can_learn"] is False
    refusal = answer["report"]["refusals"][0]
    assert "every row is truncated at max_seq_length=16 before its first trained token" in refusal
    expect(page.locator("#preflight-refusals")).to_contain_text(refusal)
    expect(page.locator("#preflight-verdict")).to_contain_text("cannot learn anything")
    submit = page.get_by_role("button", name="Start training")
    expect(submit).to_be_disabled()
    expect(page.locator("#submit-blocked")).to_have_text(f"Cannot start: {refusal}")
    expect(sets.locator("tbody tr").filter(has_text="Dropped").locator("td.flagged")).to_have_text("6")
    # The row's own text shows as text: its markup made no element.
    expect(page.locator("#preflight-example .tokens")).to_contain_text("<i>")
    expect(page.locator("#preflight-example .tokens i")).to_have_count(0)
    expect(page.locator("#preflight-example .tokens .tok-trained")).to_have_count(0)
    refused_shot = keep_screenshot(page, tmp_path, "preflight-refused.png")

    # A change may fix it: the report says it is stale and submit is possible again, and the server
    # still refuses the unchanged job with the same reason.
    page.locator("#new-job").get_by_label("Name").fill("still-refused")
    expect(page.locator("#preflight-result .stale-note")).to_be_visible()
    expect(submit).to_be_enabled()
    submit.click()
    expect(page.locator("[data-field='dataset_id'] .field-error")).to_contain_text("every row is truncated")
    expect(page).to_have_url(re.compile(r"#/jobs/new$"))
    assert len(team.get("/jobs").json()["data"]) == jobs_before
    print(f"screenshots: {shot} {warned_shot} {refused_shot}")


def test_the_job_page_shows_the_eval_report(page, deployment, worker, team, team_key, datasets, tmp_path):  # noqa: F811
    spec = demo_spec("tiny")
    spec["training"].update(max_steps=REPORT_STEPS, per_device_batch_size=REPORT_BATCH, logging_steps=4,
                            eval_steps=REPORT_STEPS // 2, save_steps=REPORT_STEPS)
    body = {**spec, "name": "report-demo", "dataset_id": datasets["train"], "validation_dataset_id": datasets["few_heldout"],
            "output": {"merge": True}, "eval": {"prompts": REPORT_PROMPTS, "max_new_tokens": REPORT_NEW_TOKENS}}
    created = team.post("/jobs", json=body)
    assert created.status_code == 201, created.text
    job_id = created.json()["id"]
    # A job that will never run, with preflight warnings (rows cut before their EOS): cancelled, it has
    # no report and its page shows none, and its warnings stand out among its events.
    warned = team.post("/jobs", json={**body, "name": "warned", "gpu_class": lane("nobody-listens"),
                                      "training": {**spec["training"], "max_seq_length": 22}})
    assert warned.status_code == 201, warned.text
    assert team.post(f"/jobs/{warned.json()['id']}/cancel").status_code == 200

    sign_in(page, team_key)
    page.goto(f"/#/jobs/{warned.json()['id']}")
    expect(page.locator(".page-head .badge")).to_have_text("cancelled")
    warnings = [e for e in team.get(f"/jobs/{warned.json()['id']}/events").json() if e["level"] == "warning"]
    assert warnings
    expect(page.locator("#events li.level-warning")).to_have_count(len(warnings))
    expect(page.locator("#events-warnings")).to_have_text(f"{len(warnings)} warning{'s' if len(warnings) > 1 else ''}")
    expect(page.locator("#report")).to_be_hidden()
    events_shot = keep_screenshot(page.locator("section:has(#events)"), tmp_path, "job-warning-events.png")

    job = wait_for_status(team, job_id, ("succeeded", "failed"), timeout=240, deployment=deployment)
    assert job["status"] == "succeeded", job.get("error")
    report = team.get(f"/jobs/{job_id}/report").json()
    page.goto(f"/#/jobs/{job_id}")
    card = page.locator("#report")
    expect(card).to_be_visible()
    expect(card.locator(".card-head .meta")).to_have_text(
        f"{REPORT_PROMPTS} prompts sampled from the validation set · greedy, up to {REPORT_NEW_TOKENS} new tokens")
    expect(card).to_contain_text("the merged model (bfloat16), as downloaded")

    # The metrics, base against tuned, as the API holds them.
    metrics = card.locator("#report-metrics tbody")
    base, tuned = report["metrics"]["base"], report["metrics"]["tuned"]
    for key, read in (("exact_match", lambda x: f"{100 * x:.0f}%"), ("f1", lambda x: f"{x:.2f}"),
                      ("loss", lambda x: f"{x:.4f}"), ("perplexity", lambda x: f"{x:.2f}")):
        expect(metrics.locator(f"tr[data-metric='{key}'] td").nth(0)).to_have_text(read(base[key]))
        expect(metrics.locator(f"tr[data-metric='{key}'] td").nth(1)).to_have_text(read(tuned[key]))
    ratio = tuned["perplexity"] / base["perplexity"]  # two significant digits below 0.1, never "×0.00"
    expect(metrics.locator("tr[data-metric='perplexity'] td").nth(2)).to_have_text(
        f"×{ratio:.2f}" if ratio >= 0.1 else f"×{ratio:#.2g}")
    assert tuned["loss"] < base["loss"]  # a few steps of the demo task: the tuned model already fits it better
    expect(metrics.locator("tr[data-metric='loss'] td.better")).to_have_count(1)

    # Each prompt with its reference and both answers, with their scores; long text wraps, stays text.
    rows = card.locator("#report-rows tbody tr")
    expect(rows).to_have_count(REPORT_PROMPTS)
    for i, row in enumerate(report["rows"]):
        cells = rows.nth(i).locator("td")
        expect(cells.nth(0)).to_have_text(str(row["line"]))
        expect(cells.nth(1).locator(".gen-text")).to_have_text(row["prompt"])
        expect(cells.nth(2).locator(".gen-text")).to_have_text(row["reference"])
        for n, side in ((3, "base"), (4, "tuned")):
            answer = row[side]
            if answer["answer"]:
                expect(cells.nth(n).locator(".gen-text")).to_have_text(answer["answer"])
            expect(cells.nth(n).locator(".score-line")).to_contain_text(
                f"{'✓ exact' if answer['exact_match'] else '✗ not exact'} · F1 {answer['f1']:.2f}")
    white_space = card.locator("#report-rows .gen-text").first.evaluate("e => getComputedStyle(e).whiteSpace")
    assert white_space == "pre-wrap"
    card.scroll_into_view_if_needed()
    shot = keep_screenshot(page, tmp_path, "job-report.png")
    print(f"screenshots: {events_shot} {shot}")
