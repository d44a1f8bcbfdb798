// The job page's panels, each redrawn whole from the page's state: progress, summary, events and
// checkpoints.

import { h } from "../dom.js";
import { fmt } from "../format.js";
import { progressBar } from "../widgets.js";

export function renderProgress(card, state) {
  const job = state.job;
  const pct = job.progress.fraction === null ? null : Math.round(job.progress.fraction * 100);
  const lastTrain = [...state.train.values()].sort((a, b) => a.step - b.step).at(-1);
  card.replaceChildren(
    h("div", { class: "card-head" }, h("h2", {}, "Progress"),
      h("span", { class: "meta", id: "progress-meta" }, progressSaid(job, pct, state))),
    progressBar(job, true),
    h("dl", { class: "stats" },
      stat("Started", fmt.date(job.started_at)),
      stat(job.finished_at ? "Took" : "Running for", job.started_at ? fmt.duration(job.started_at, job.finished_at) : "—"),
      stat("Trained tokens", fmt.int(job.trained_tokens)),
      stat("Latest train loss", fmt.loss(lastTrain && lastTrain.train_loss)),
      ...(lastTrain && lastTrain.reward_accuracy != null
        ? [stat("Reward accuracy", fmt.percent(lastTrain.reward_accuracy)), stat("Reward margin", fmt.loss(lastTrain.reward_margin))] : []),
      stat("Attempt", String(job.attempt)),
      stat("Queue", job.queue)));
}

// "step 0 of 160 (planned)" from the job's creation on: the preflight's count (GET /jobs/{id}'s progress.planned)
// until the trainer's first step; a queued job says where it waits, and how many steps it plans.
function progressSaid(job, pct, state) {
  const { step, total_steps: total, planned } = job.progress;
  if (job.status === "queued") return `${waiting(state)}${total ? ` · ${total} steps planned` : ""}`;
  if (!total) return job.phase ? job.phase : "waiting for a worker";
  // While a worker holds the job, the phase it is in (GET /jobs/{id}'s phase): past its last step it still saves,
  // merges, reports and uploads, and "step 160 of 160 · 100%" alone read as done.
  const phase = job.phase ? ` · ${job.phase}` : "";
  return `step ${step} of ${total}${planned ? " (planned)" : ""}${pct !== null ? ` · ${pct}%` : ""}${phase}`;
}

const WAITING_FOR = {
  gpu: "a free GPU of its class",
  cpu: "the CPU worker of its class to be free",
  no_worker: "a worker of its class to be up",
  max_running: "your team's max_running quota",
  gpu_hours_per_month: "your team's monthly GPU-hours budget",
  team_disabled: "an admin to enable your team again",
};

function waiting(state) {
  const standing = state.job.status === "queued" && state.standing;
  if (!standing) return "waiting for a worker";
  const said = `queued · position ${standing.position} · waiting for ${WAITING_FOR[standing.waitingFor] || standing.waitingFor}`;
  return standing.detail ? `${said}: ${standing.detail}` : said; // no_worker: since when, and what starts one
}

function stat(label, value) { return h("div", { class: "stat" }, h("dt", {}, label), h("dd", {}, value)); }

export function renderSummary(box, state) {
  const job = state.job;
  const s = job.summary;
  const rows = [];
  const section = (name) => rows.push(h("div", { class: "section" }, name));
  const row = (label, value) => rows.push(h("dt", {}, label), h("dd", {}, value));
  if (!s) {
    const last = [...state.train.values()].sort((a, b) => a.step - b.step).at(-1);
    const lastEval = [...state.eval.values()].sort((a, b) => a.step - b.step).at(-1);
    section("So far");
    row("Train loss", fmt.loss(last && last.train_loss));
    row("Eval loss", fmt.loss(lastEval && lastEval.eval_loss));
    row("Tokens / s", last && last.tokens_per_second ? fmt.int(last.tokens_per_second) : "—");
    row("Peak memory", fmt.bytes(last && last.peak_memory_bytes));
    rows.push(h("p", { class: "hint", style: "grid-column: 1 / -1" }, "The full summary appears when the job finishes."));
  } else {
    section("Loss");
    row("Train loss, first → final", `${fmt.loss(s.train_loss_first)} → ${fmt.loss(s.train_loss_final)}`);
    row("Eval loss, final", fmt.loss(s.eval_loss_final));
    // Which weights went out (as `qlora jobs show` says): the best evaluation's with output.use_best_checkpoint.
    const best = s.best_eval;
    if (best && best.step !== null) {
      row("Best eval loss", `${fmt.loss(best.eval_loss)} at step ${fmt.int(best.step)}; ${best.final_adapter_is_best
        ? "the adapter shipped" : "not shipped: the adapter is the last step's (output.use_best_checkpoint ships the best)"}`);
    }
    if (s.perplexity_final) row("Perplexity", Number(s.perplexity_final).toFixed(2));
    if (s.merge_fidelity) {
      section("Merge fidelity");
      row("Max |logit diff|", fmt.small(s.merge_fidelity.max_abs_logit_diff));
      row("Mean |logit diff|", fmt.small(s.merge_fidelity.mean_abs_logit_diff));
      row("Eval loss diff", fmt.small(s.merge_fidelity.eval_loss_diff));
      // Too large to build in memory: written layer by layer from the 4-bit base (the merging_streamed event says why).
      if (s.merge_fidelity.merge === "streaming") row("Built", "layer by layer from the quantized base");
    }
    if (s.merge_skipped) {  // output.merge asked for it and the host could not hold it: why, and what to do
      section("Merged model");
      row("Not built", s.merge_skipped);
    }
    section("Run");
    row("Tokens / s", fmt.int(s.tokens_per_second));
    row("Peak memory", fmt.bytes(s.peak_memory_bytes));
    row("Tokens seen", fmt.int(s.tokens_seen));
    if (s.steps) {
      const stopped = best && best.early_stopped_at !== null && best.early_stopped_at !== undefined
        ? `, stopped early at step ${fmt.int(best.early_stopped_at)}: the eval loss stopped improving (training.early_stopping)` : "";
      row("Steps", `${fmt.int(s.steps.completed)} of ${fmt.int(s.steps.planned)}${stopped}`);
    }
    if (s.parameters) row("Trainable parameters", `${fmt.int(s.parameters.trainable)} (${(100 * s.parameters.trainable / s.parameters.total).toFixed(2)}%)`);
    if (s.device) row("Device", `${s.device}${s.compute_dtype ? `, ${s.compute_dtype}` : ""}`);
  }
  box.replaceChildren(h("dl", { class: "summary", id: "summary" }, rows));
}

export function renderEvents(list, state) {
  const events = state.events.newestFirst(); // the newest 200 (event-log.js)
  list.dataset.held = String(state.events.size); // what the page holds, for a look from outside (the tests)
  if (!events.length) {
    list.replaceChildren(h("li", { class: "empty" }, "No events yet."));
    return;
  }
  const older = state.events.older;
  list.replaceChildren(...events.map((e) => h("li", { class: `level-${e.level}`, dataset: { type: e.type } },
    h("time", { datetime: e.created_at }, fmt.time(e.created_at)),
    h("div", {},
      h("span", { class: "event-type" }, e.type),
      e.step !== null ? h("span", { class: "event-step" }, `step ${e.step}`) : null,
      e.message ? h("div", { class: "event-message" }, e.message) : null))),
    older > 0 ? h("li", { class: "empty", id: "older-events" },
      `and ${fmt.int(older)} older events: GET /jobs/${state.job.id}/events has them all`) : null);
}

export function renderCheckpoints(box, checkpoints) {
  if (!checkpoints.length) {
    box.replaceChildren(h("p", { class: "empty" }, "No checkpoint yet: one is saved every save_steps."));
    return;
  }
  box.replaceChildren(h("table", { class: "table", id: "checkpoints" },
    h("thead", {}, h("tr", {},
      h("th", { scope: "col", class: "num" }, "Step"), h("th", { scope: "col", class: "num" }, "Train loss"),
      h("th", { scope: "col", class: "num" }, "Eval loss"), h("th", { scope: "col", class: "num" }, "Size"),
      h("th", { scope: "col" }, "Saved"))),
    h("tbody", {}, checkpoints.map((c) => h("tr", {},
      h("td", { class: "num" }, String(c.step)), h("td", { class: "num" }, fmt.loss(c.train_loss)),
      h("td", { class: "num" }, fmt.loss(c.eval_loss)), h("td", { class: "num" }, fmt.bytes(c.bytes)),
      h("td", {}, fmt.time(c.created_at)))))));
}

/** A dpo job's rewards, newest point first (train and eval): what DPO users watch beside the loss. Hidden for sft. */
export function renderRewards(card, box, state) {
  const rewarded = (points, kind) => [...points.values()].filter((p) => p.reward_accuracy != null).map((p) => ({ ...p, kind }));
  const points = [...rewarded(state.train, "train"), ...rewarded(state.eval, "eval")]
    .sort((a, b) => b.step - a.step || (a.kind === "eval" ? -1 : 1)).slice(0, REWARD_ROWS);
  card.hidden = !points.length;
  if (!points.length) return;
  box.replaceChildren(h("table", { class: "table", id: "rewards" },
    h("thead", {}, h("tr", {},
      h("th", { scope: "col", class: "num" }, "Step"), h("th", { scope: "col" }, "Set"),
      h("th", { scope: "col", class: "num" }, "Reward accuracy"), h("th", { scope: "col", class: "num" }, "Margin"),
      h("th", { scope: "col", class: "num" }, "Chosen"), h("th", { scope: "col", class: "num" }, "Rejected"),
      h("th", { scope: "col", class: "num" }, "DPO loss"))),
    h("tbody", {}, points.map((p) => h("tr", { dataset: { kind: p.kind } },
      h("td", { class: "num" }, String(p.step)), h("td", {}, p.kind),
      h("td", { class: "num" }, fmt.percent(p.reward_accuracy)), h("td", { class: "num" }, fmt.loss(p.reward_margin)),
      h("td", { class: "num" }, fmt.loss(p.reward_chosen)), h("td", { class: "num" }, fmt.loss(p.reward_rejected)),
      h("td", { class: "num" }, fmt.loss(p.kind === "eval" ? p.eval_loss : p.train_loss)))))));
}

const REWARD_ROWS = 12; // the newest points; the whole series is GET /jobs/{id}/metrics
