// One job's page: it follows the job's stream live (status, loss points, events), redraws at most
// once a frame, and offers pause or resume, cancel and the downloads. The panels are drawn in
// job-panels.js, the eval report of a finished job in job-report.js.

import { api, FINISHED } from "../api.js";
import { lossChart } from "../chart.js";
import { h, setTitle } from "../dom.js";
import { EventLog } from "../event-log.js";
import { fmt } from "../format.js";
import { PointSeries } from "../series.js";
import { followJob } from "../stream.js";
import { errorAlert, statusBadge } from "../widgets.js";
import { downloadArtifact } from "./job-download.js";
import { renderCheckpoints, renderEvents, renderProgress, renderRewards, renderSummary } from "./job-panels.js";
import { loadReport } from "./job-report.js";

// A long job's chart draws its thinned curve (GET /jobs/{id}/metrics?points=N: in each bucket of steps, each
// series' first, last, lowest and highest point), extended by the streamed points past it. What the page holds
// of a long series point by point is thinned evenly (series.js), which steps over a spike or a dip.
const THINNED_FROM = 4000; // steps: past this, or once the page thinned what it holds, the chart asks for the view
const THINNED_POINTS = 4000; // at most 2,000 a series: what the chart draws (chart.js)
const THINNED_EVERY_MS = 30000; // asked again while the job runs, and once more when it has finished

/** The chart's points of a series: the thinned view's, then the streamed ones past its last step. */
function charted(series, thinned) {
  if (!thinned) return [...series.values()];
  const last = thinned.length ? thinned[thinned.length - 1].step : -Infinity;
  return [...thinned, ...[...series.values()].filter((p) => p.step > last)];
}

export function viewJob(main, ctx, jobId) {
  setTitle("Job");
  // The loss points by step and the newest events, each bounded for a page left open on a long job
  // (series.js, event-log.js).
  const state = { job: null, train: new PointSeries(), eval: new PointSeries(), events: new EventLog(), artifacts: [], checkpoints: [],
    thinned: null };

  const header = h("div", { class: "page-head" }, h("h1", {}, "Loading job…"));
  const progressCard = h("section", { class: "card", "aria-label": "Progress" });
  const errorBox = h("div");
  // Why the page is not live just now (the stream refused for a while, or out of reach): it retries by itself.
  const noticeBox = h("div", { class: "alert alert-warn", id: "stream-notice", role: "status", hidden: true });
  const chartBox = h("div", { id: "loss-chart" });
  const summaryBox = h("div");
  const eventsBox = h("ol", { class: "events", id: "events", "aria-label": "Job events, newest first" });
  const eventsMeta = h("span", { class: "meta warn", id: "events-warnings" });
  const reportCard = h("section", { class: "card", id: "report", "aria-labelledby": "report-title", hidden: true });
  const checkpointsBox = h("div", { class: "table-wrap" });
  const rewardsBox = h("div", { class: "table-wrap" });
  const rewardsCard = h("section", { class: "card flush", id: "rewards-card", "aria-labelledby": "rewards-title", hidden: true },
    h("div", { class: "card-head" }, h("h2", { id: "rewards-title" }, "Rewards"),
      h("span", { class: "meta" }, "dpo: how often the preferred answer scores higher, and by how much")), rewardsBox);
  main.append(
    h("a", { class: "back", href: "#/jobs" }, "← All jobs"),
    header, noticeBox, errorBox, progressCard,
    h("div", { class: "grid" },
      h("section", { class: "card", "aria-labelledby": "chart-title" },
        h("div", { class: "card-head" }, h("h2", { id: "chart-title" }, "Loss"),
          h("div", { class: "chart-legend", "aria-hidden": "true" },
            h("span", { class: "legend-item" }, h("span", { class: "legend-swatch legend-train" }), "train"),
            h("span", { class: "legend-item" }, h("span", { class: "legend-swatch legend-eval" }), "eval"))),
        chartBox),
      h("section", { class: "card", "aria-labelledby": "summary-title" },
        h("div", { class: "card-head" }, h("h2", { id: "summary-title" }, "Summary")), summaryBox)),
    rewardsCard,
    reportCard,
    h("div", { class: "grid grid-even" },
      h("section", { class: "card", "aria-labelledby": "events-title" },
        h("div", { class: "card-head" }, h("h2", { id: "events-title" }, "Events"), eventsMeta), eventsBox),
      h("section", { class: "card flush", "aria-labelledby": "checkpoints-title" },
        h("div", { class: "card-head" }, h("h2", { id: "checkpoints-title" }, "Checkpoints"),
          h("span", { class: "meta" }, "complete ones in storage")), checkpointsBox)));

  let drawQueued = false;
  function redraw() {
    if (drawQueued) return;
    drawQueued = true;
    requestAnimationFrame(() => {
      drawQueued = false;
      if (ctx.signal.aborted || !state.job) return;
      renderJobHeader(header, state, ctx);
      renderProgress(progressCard, state);
      errorBox.replaceChildren(...(state.job.error ? [h("div", { class: "alert alert-error", role: "alert" },
        h("p", {}, h("strong", {}, `This job ${state.job.status === "failed" ? "failed" : "reported an error"}.`)),
        h("pre", {}, state.job.error))] : []));
      chartBox.replaceChildren(lossChart(charted(state.train, state.thinned?.train), charted(state.eval, state.thinned?.eval),
        state.job.progress.total_steps));
      chartBox.dataset.thinned = state.thinned ? String(state.thinned.bucket_steps) : "";
      renderSummary(summaryBox, state);
      renderRewards(rewardsCard, rewardsBox, state);
      renderEvents(eventsBox, state);
      // Warnings (preflight's, the health watch's) are easy to miss in a long list: count them in the header.
      const warnings = state.events.warnings;
      eventsMeta.textContent = warnings ? `${warnings} warning${warnings === 1 ? "" : "s"}` : "";
    });
  }

  async function loadCheckpoints() {
    try {
      state.checkpoints = await api(`/jobs/${jobId}/checkpoints`, { signal: ctx.signal });
      renderCheckpoints(checkpointsBox, state.checkpoints);
    } catch (err) {
      if (!ctx.signal.aborted) checkpointsBox.replaceChildren(errorAlert(err));
    }
  }
  async function loadArtifacts() {
    try {
      state.artifacts = await api(`/jobs/${jobId}/artifacts`, { signal: ctx.signal });
      redraw();
    } catch (err) { /* the download buttons stay disabled */ }
  }

  // Where a queued job stands (GET /jobs/{id}'s queue_position and waiting_for; the stream's job
  // messages do not carry them): read when the job is seen queued, and every few seconds while it is.
  async function loadStanding() {
    if (!state.job || state.job.status !== "queued") { state.standing = null; return; }
    try {
      const fresh = await api(`/jobs/${jobId}`, { signal: ctx.signal });
      state.standing = fresh.status === "queued" && fresh.queue_position
        ? { position: fresh.queue_position, waitingFor: fresh.waiting_for, detail: fresh.waiting_detail } : null;
      redraw();
    } catch { /* the stream still shows the job */ }
  }
  ctx.every(5000, loadStanding); // asks only while the job is queued and the tab is seen

  // The thinned curve of a long job: asked when the job or the held series shows it is long, then again while it runs.
  let thinnedAsked = false;
  let thinnedFinal = false; // read once the job had finished: it will not change
  async function loadThinned() {
    if (thinnedFinal) return;
    // The stream sends a job's history before the job itself: no job yet is not known to be finished.
    const finished = Boolean(state.job && FINISHED.includes(state.job.status));
    try {
      const view = await api(`/jobs/${jobId}/metrics?points=${THINNED_POINTS}`, { signal: ctx.signal });
      state.thinned = view.thinned ? view : null;
      thinnedFinal = finished;
      redraw();
      return state.thinned;
    } catch (err) {
      return false; // the chart draws the streamed points meanwhile; asked again later
    }
  }
  function askThinnedIfLong() {
    if (thinnedAsked || !(state.train.bucket > 1 || (state.job && state.job.step > THINNED_FROM))) return;
    thinnedAsked = true;
    loadThinned();
    ctx.every(THINNED_EVERY_MS, loadThinned);
  }

  function onMessage(type, payload) {
    if (type === "job") {
      const before = state.job && state.job.status;
      state.job = payload;
      if (payload.status === "queued" && before !== "queued") loadStanding();
      if (payload.status !== "queued") state.standing = null;
      setTitle(payload.name || "Job");
      askThinnedIfLong();
      if (thinnedAsked && payload.status !== before && FINISHED.includes(payload.status)) loadThinned(); // its last points
      if (payload.status !== before && FINISHED.includes(payload.status)) {
        loadArtifacts();
        loadCheckpoints();
        loadReport(reportCard, payload, ctx);
      }
    } else if (type === "metric") {
      (payload.kind === "eval" ? state.eval : state.train).set(payload.step, payload);
      askThinnedIfLong();
    } else if (type === "event") {
      state.events.add(payload);
      if (payload.type === "checkpoint_saved") loadCheckpoints();
    }
    redraw();
  }

  function onFatal(err) {
    header.replaceChildren(h("h1", {}, err.status === 404 ? "Job not found" : "This job cannot be shown"));
    errorBox.replaceChildren(errorAlert(err));
  }

  function onNotice(text) {
    noticeBox.hidden = !text;
    noticeBox.textContent = text || "";
  }

  // A job already long when the page opens: its thinned curve first, then the stream past that curve's end
  // (`next`), not its whole history (~100 MB for 500,000 points, on every reconnect). From the lower of the
  // two series' ends, less one step: an evaluation is recorded after its step's train point, so the view may
  // lack the one at its last step (with no evaluation yet, after_eval_step is 0 and after_step is the lower,
  // and a stream past it alone skipped the first evaluation landing there); points sent again replace the
  // ones held.
  async function followFromThinnedIfLong() {
    let afterStep = null;
    try {
      const job = await api(`/jobs/${jobId}`, { signal: ctx.signal });
      if (job.step > THINNED_FROM) {
        thinnedAsked = true;
        const view = await loadThinned();
        ctx.every(THINNED_EVERY_MS, loadThinned);
        const next = view && view.next;
        if (next && next.after_step !== null) {
          afterStep = Math.max(0, Math.min(next.after_step, next.after_eval_step || next.after_step) - 1);
        }
      }
    } catch { /* the stream from the start says what is wrong, or shows the job */ }
    if (!ctx.signal.aborted) followJob(jobId, ctx, onMessage, onFatal, onNotice, afterStep);
  }

  loadCheckpoints();
  followFromThinnedIfLong();
}

function renderJobHeader(header, state, ctx) {
  const job = state.job;
  const active = !FINISHED.includes(job.status);
  const cancel = h("button", { type: "button", class: "btn btn-danger", id: "cancel-job", disabled: !active || job.status === "cancelling" },
    job.status === "cancelling" ? "Cancelling…" : "Cancel job");
  cancel.addEventListener("click", async () => {
    if (!window.confirm("Cancel this job? A running job stops after its current step.")) return;
    cancel.disabled = true;
    try {
      state.job = await api(`/jobs/${job.id}/cancel`, { method: "POST", signal: ctx.signal });
    } catch (err) {
      if (!ctx.signal.aborted) header.append(errorAlert(err));
    }
  });
  // Pause a running job (a checkpoint, then its GPU freed); resume a paused one: paused by its team, or by the
  // service after its attempts kept ending on a full disk or an outage (its events say which).
  const resumable = job.status === "paused";
  const pause = h("button", { type: "button", class: "btn", id: "pause-resume-job",
    disabled: !(resumable || job.status === "running") },
    resumable ? "Resume job" : job.status === "pausing" ? "Pausing…" : "Pause job");
  pause.addEventListener("click", async () => {
    pause.disabled = true;
    try {
      state.job = await api(`/jobs/${job.id}/${resumable ? "resume" : "pause"}`, { method: "POST", signal: ctx.signal });
    } catch (err) {
      if (!ctx.signal.aborted) header.append(errorAlert(err));
    }
  });
  const downloads = ["adapter", "merged"].map((kind) => {
    const artifact = state.artifacts.find((a) => a.kind === kind);
    const button = h("button", {
      type: "button", class: "btn", id: `download-${kind}`, disabled: !artifact,
      title: artifact ? `sha256 ${artifact.sha256}` : `No ${kind} yet`,
    }, `Download ${kind}`, artifact ? h("span", { class: "progress-text" }, fmt.bytes(artifact.bytes)) : null);
    button.addEventListener("click", () => downloadArtifact(job.id, kind, button, header));
    return button;
  });
  const spec = job.spec || {};
  const training = spec.training || {};
  header.replaceChildren(
    h("div", {},
      h("div", { class: "title-line" }, h("h1", { id: "job-title" }, job.name || "Untitled job"), statusBadge(job.status)),
      h("p", { class: "subtitle" },
        h("span", { class: "mono" }, job.id), " · ", job.base_model, " · ",
        h("span", { id: "job-method" }, methodText(spec.method)), " · ",
        ...(job.initial_job_id ? ["from ", h("a", { id: "initial-job", class: "mono", href: `#/jobs/${job.initial_job_id}` }, job.initial_job_id), " · "] : []),
        training.max_steps ? `${training.max_steps} steps` : `${training.epochs} epoch${training.epochs === 1 ? "" : "s"}`, " · created ", fmt.date(job.created_at))),
    h("div", { class: "actions" }, ...downloads, pause, cancel));
}

/** "sft", or "dpo (beta 0.1, sigmoid)". */
function methodText(method) {
  if (!method || method.type !== "dpo") return "sft";
  return `dpo (beta ${method.beta}, ${method.loss})`;
}
