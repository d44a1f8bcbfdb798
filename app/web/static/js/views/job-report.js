// The job page's eval report (GET /jobs/{id}/report, made by the worker when the job ends): the
// base model against the tuned one, in numbers (exact match, F1, loss, perplexity) and answer by
// answer beside each prompt's reference. A dpo job's report (it has `rewards`) shows each pair's
// preferred and rejected answers, and the reward accuracy and margin on the validation pairs,
// first evaluation against final.

import { api } from "../api.js";
import { h } from "../dom.js";
import { fmt } from "../format.js";
import { errorAlert } from "../widgets.js";

/**
 * Fill `card` with the finished job's report. Where it has none (404 no_report), a job that
 * succeeded says why in one line (eval.prompts 0, or made before reports existed); a failed or
 * cancelled one shows nothing, since only success makes a report.
 */
export async function loadReport(card, job, ctx) {
  let report;
  try {
    report = await api(`/jobs/${job.id}/report`, { signal: ctx.signal });
  } catch (err) {
    if (ctx.signal.aborted) return;
    const missing = err.status === 404 || err.status === 409;
    card.hidden = missing && job.status !== "succeeded";
    card.replaceChildren(...reportHead(null), missing ? h("p", { class: "note", id: "no-report" }, err.message) : errorAlert(err));
    return;
  }
  const preference = report.rewards !== undefined;
  card.replaceChildren(...reportHead(report), ...(preference ? [rewardsTable(report.rewards)] : []), metricsTable(report),
    rowsTable(report, preference));
  card.hidden = false;
}

function reportHead(report) {
  let meta = "";
  if (report) {
    const g = report.generation || {};
    const from = { spec: "given in the spec", validation: "sampled from the validation set", train: "sampled from the training set" };
    meta = `${report.rows.length} prompt${report.rows.length === 1 ? "" : "s"} ${from[report.prompts_from] || `from ${report.prompts_from}`}`
      + ` · ${g.temperature ? `sampled at temperature ${g.temperature}` : "greedy"}, up to ${g.max_new_tokens} new tokens`;
  }
  return [
    h("div", { class: "card-head" }, h("h2", { id: "report-title" }, "Eval report: base against tuned"),
      h("span", { class: "meta" }, meta)),
    report && report.generation ? h("p", { class: "note report-models" },
      h("strong", {}, "Base: "), report.generation.base, ". ", h("strong", {}, "Tuned: "), report.generation.tuned, ".") : null,
  ].filter(Boolean);
}

// [label, key, how it reads, whether lower is better]
const METRICS = [
  ["Exact match", "exact_match", (x) => `${(100 * x).toFixed(0)}%`, false],
  ["Token F1", "f1", (x) => x.toFixed(2), false],
  ["Stopped by itself (EOS)", "stopped", (x) => `${(100 * x).toFixed(0)}%`, false],
  ["Loss", "loss", (x) => x.toFixed(4), true],
  ["Perplexity", "perplexity", (x) => x.toFixed(2), true],
];

function metricsTable(report) {
  const m = report.metrics;
  const shown = (value, read) => (value === null || value === undefined ? "—" : read(value));
  const rows = METRICS.filter(([, key]) => m.base[key] !== undefined || m.tuned[key] !== undefined).map(([label, key, read, lowerBetter]) => {
    const base = m.base[key];
    const tuned = m.tuned[key];
    const both = base !== null && base !== undefined && tuned !== null && tuned !== undefined;
    const better = both && tuned !== base ? (lowerBetter ? tuned < base : tuned > base) : null;
    return h("tr", { dataset: { metric: key } },
      h("th", { scope: "row" }, label),
      h("td", { class: "num" }, shown(base, read)),
      h("td", { class: `num strong${better === true ? " better" : better === false ? " worse" : ""}` }, shown(tuned, read)),
      h("td", { class: "num change" }, both ? change(base, tuned, key) : "—"));
  });
  const lossFrom = m.loss_rows ? `Loss and perplexity: per trained token over ${fmt.int(m.loss_rows)} rows (${fmt.int(m.loss_tokens)} tokens) of the ${m.loss_rows_from === "train" ? "training" : "validation"} set. ` : "";
  return h("div", { class: "report-metrics" },
    h("table", { class: "table compact", id: "report-metrics" },
      h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "Metric"), h("th", { scope: "col", class: "num" }, "Base"),
        h("th", { scope: "col", class: "num" }, "Tuned"), h("th", { scope: "col", class: "num" }, "Change"))),
      h("tbody", {}, rows)),
    h("p", { class: "note" }, lossFrom, m.scored_rows
      ? `Exact match and F1 over the ${fmt.int(m.scored_rows)} prompt${m.scored_rows === 1 ? "" : "s"} with a reference; F1 on lowercased words.`
      : "No prompt has a reference (they were given in the spec): the answers are shown, not scored."));
}

function change(base, tuned, key) {
  const d = tuned - base;
  const sign = d > 0 ? "+" : d < 0 ? "−" : "±";
  if (key === "exact_match" || key === "stopped") return `${sign}${Math.abs(100 * d).toFixed(0)} pts`;
  if (key === "perplexity") return base ? `×${ratio(tuned / base)}` : "—";
  return `${sign}${Math.abs(d).toFixed(key === "loss" ? 4 : 2)}`;
}

// Two decimals, or two significant digits below 0.1: a perplexity from 3,000 down to 2 read "×0.00".
function ratio(r) {
  return r >= 0.1 ? r.toFixed(2) : r.toPrecision(2);
}

// [label, key, how it reads, how its change reads]
const REWARDS = [
  ["Reward accuracy", "accuracy", (x) => `${(100 * x).toFixed(0)}%`, (d) => `${d >= 0 ? "+" : "−"}${Math.abs(100 * d).toFixed(0)} pts`],
  ["Reward margin", "margin", (x) => x.toFixed(4), signed],
  ["Reward of the chosen answers", "chosen", (x) => x.toFixed(4), signed],
  ["Reward of the rejected answers", "rejected", (x) => x.toFixed(4), signed],
  ["DPO loss", "loss", (x) => x.toFixed(4), signed],
];

function signed(d) {
  return `${d > 0 ? "+" : d < 0 ? "−" : "±"}${Math.abs(d).toFixed(4)}`;
}

/** A dpo report's answer to "did it learn the preference?": the rewards on the validation pairs. */
function rewardsTable(rewards) {
  if (rewards === null) {
    return h("p", { class: "note", id: "report-rewards" }, "No reward accuracy or margin: the job had no validation set to measure them on.");
  }
  const { first, final } = rewards;
  const shown = (value, read) => (value === null || value === undefined ? "—" : read(value));
  const against = rewards.reference === "initial_adapter" ? "a frozen copy of the starting adapter" : "the base model";
  return h("div", { class: "report-metrics" },
    h("table", { class: "table compact", id: "report-rewards" },
      h("caption", {}, `Rewards on ${fmt.int(rewards.pairs)} validation pair${rewards.pairs === 1 ? "" : "s"}`),
      h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "Metric"),
        h("th", { scope: "col", class: "num" }, `First eval (step ${first.step})`),
        h("th", { scope: "col", class: "num" }, `Final (step ${final.step})`), h("th", { scope: "col", class: "num" }, "Change"))),
      h("tbody", {}, REWARDS.map(([label, key, read, change]) => {
        const a = first[key];
        const b = final[key];
        const both = a !== null && a !== undefined && b !== null && b !== undefined;
        return h("tr", { dataset: { reward: key } }, h("th", { scope: "row" }, label),
          h("td", { class: "num" }, shown(a, read)), h("td", { class: "num strong" }, shown(b, read)),
          h("td", { class: "num change" }, both ? change(b - a) : "—"));
      }))),
    h("p", { class: "note" }, `A reward is beta × how much likelier the tuned model finds an answer than the reference (${against}). `
      + "Accuracy: the share of pairs whose chosen answer gains more than the rejected one; margin: the mean lead. "
      + "Both are 0 at step 0, where the model is its reference; accuracy near 100% with a margin that grows says the preference was learned."));
}

function rowsTable(report, preference) {
  if (!report.rows.length) return h("p", { class: "empty" }, "The report has no prompts.");
  const given = () => h("span", { class: "faint" }, "— (a given prompt)");
  return h("div", { class: "table-wrap" }, h("table", { class: `table answers${preference ? " preference" : ""}`, id: "report-rows" },
    h("caption", { class: "sr-only" }, preference
      ? "Each prompt with its chosen and rejected answers and the base and tuned models' answers"
      : "Each prompt with its reference and the base and tuned models' answers"),
    h("thead", {}, h("tr", {},
      h("th", { scope: "col", class: "num" }, "Line"), h("th", { scope: "col" }, "Prompt"),
      h("th", { scope: "col" }, preference ? "Chosen" : "Reference"), preference ? h("th", { scope: "col" }, "Rejected") : null,
      h("th", { scope: "col" }, "Base"), h("th", { scope: "col" }, "Tuned"))),
    h("tbody", {}, report.rows.map((row, i) => h("tr", { dataset: { row: String(i) } },
      h("td", { class: "num" }, row.line === null || row.line === undefined ? String(i + 1) : String(row.line)),
      h("td", { class: "prompt" }, text(row.prompt),
        row.prompt_truncated ? h("span", { class: "score-line" }, "its start was cut at max_seq_length") : null),
      h("td", { class: "reference" }, row.reference === null ? given() : text(row.reference)),
      preference ? h("td", { class: "reference rejected" }, row.rejected === null || row.rejected === undefined
        ? given() : text(row.rejected)) : null,
      answerCell(row, "base", report), answerCell(row, "tuned", report))))));
}

function answerCell(row, side, report) {
  const a = row[side];
  const scored = a.exact_match !== null && a.exact_match !== undefined;  // null: no reference to score against
  return h("td", { class: `answer ${side}${scored ? (a.exact_match ? " match" : " miss") : ""}`, dataset: { side } },
    text(a.answer, "(empty answer)"),
    h("span", { class: "score-line" },
      scored ? [h("span", { class: a.exact_match ? "em-yes" : "em-no" }, a.exact_match ? "✓ exact" : "✗ not exact"), ` · F1 ${a.f1.toFixed(2)}`] : null,
      a.stopped ? null : `${scored ? " · " : ""}no EOS within ${report.generation ? report.generation.max_new_tokens : "max_new_tokens"} tokens`));
}

/** Data text, wrapped and kept as text (never markup); its line breaks kept. */
function text(value, empty = "(empty)") {
  return value ? h("div", { class: "gen-text" }, value) : h("div", { class: "gen-text faint" }, empty);
}
