// The new-job form's preflight (POST /jobs/preflight): what the job would train on, drawn before
// submit. Each set's numbers, the steps and the GPU it would go to, the refusals and warnings, and
// one row token by token with the trained tokens highlighted: exactly what the loss sees.

import { h } from "../dom.js";
import { fmt } from "../format.js";

/** The panel for one preflight answer. */
export function preflightPanel(answer) {
  const report = answer.report;
  const placement = answer.placement || {};
  return h("div", { class: "preflight-body" },
    verdict(answer),
    report ? warnings(report) : null,
    placement.gpu_class === null ? h("div", { class: "alert alert-error", role: "alert" },
      h("p", {}, h("strong", {}, "No GPU class holds this job. "), placement.note)) : null,
    report ? h("div", { class: "preflight-grid" },
      h("div", {}, h("h3", {}, "The data, as the trainer will see it"), setsTable(report)),
      h("div", {}, h("h3", {}, "The run"), runFacts(report, placement))) : null,
    report && report.examples.length ? example(report.examples[0]) : null);
}

/** The headline: the job can learn, it would be refused, or no preflight could be made (and why). */
function verdict(answer) {
  if (answer.report === null) {
    return h("div", { class: "alert alert-info", id: "preflight-verdict" },
      h("p", {}, h("strong", {}, "No preflight for this job. "), answer.note || "The service could not make one.",
        " The job can still be submitted; the trainer checks the data when it starts."));
  }
  if (answer.can_learn === false) {
    return h("div", { class: "preflight-verdict refused", id: "preflight-verdict", role: "alert" },
      h("p", {}, h("strong", {}, "The preflight refuses this job as it stands (it cannot learn anything, or its validation set has nothing to evaluate). "),
        "POST /jobs would refuse it (422) for this reason; submitting is disabled until it is fixed."),
      h("ul", { id: "preflight-refusals" }, answer.report.refusals.map((text) => h("li", {}, text))));
  }
  const train = answer.report.train;
  return h("div", { class: "preflight-verdict ok", id: "preflight-verdict" },
    h("strong", {}, "Ready to train: "),
    `${fmt.int(train.kept_rows)} rows, ${fmt.int(train.trained_tokens)} trained tokens, ${fmt.int(answer.report.steps)} steps.`);
}

/** Warnings (the refusals are in the verdict): the job can run, but each is worth a look first. */
function warnings(report) {
  if (!report.warnings.length) return null;
  return h("div", { class: "alert alert-warn", id: "preflight-warnings" },
    h("p", {}, h("strong", {}, `${report.warnings.length} warning${report.warnings.length === 1 ? "" : "s"}: `),
      "the job can run; each is recorded as an event on it."),
    h("ul", {}, report.warnings.map((text) => h("li", {}, text))));
}

/** Train and validation side by side; a row per number, as `qlora jobs preflight` prints them. */
function setsTable(report) {
  const sets = [["Train", report.train], ["Validation", report.validation]].filter(([, s]) => s);
  const percent = (x) => `${(100 * x).toFixed(1)}%`;
  const lines = [
    ["Rows kept / read", (s) => `${fmt.int(s.kept_rows)} / ${fmt.int(s.rows)}${s.complete ? "" : ` (of ${fmt.int(s.rows_in_file)})`}`],
    ["Truncated at max length", (s) => fmt.int(s.truncated_rows), (s) => s.truncated_rows > 0],
    ["Dropped (nothing to learn)", (s) => fmt.int(s.dropped_rows), (s) => s.dropped_rows > 0],
    ["Tokens", (s) => fmt.int(s.tokens)],
    ["Trained tokens", (s) => `${fmt.int(s.trained_tokens)} (${percent(s.trained_fraction)})`],
    ["Trained tokens lost to truncation", (s) => fmt.int(s.trained_tokens_lost), (s) => s.trained_tokens_lost > 0],
    ["Rows without EOS in the labels", (s) => fmt.int(s.rows_without_eos), (s) => s.rows_without_eos > 0],
    ["Rows with special tokens in message text", (s) => fmt.int(s.rows_with_special_tokens), (s) => s.rows_with_special_tokens > 0],
    ["Rows repeating an earlier row", (s) => fmt.int(s.duplicate_rows), (s) => s.duplicate_rows > 0],
    ["Rows also in the train set", (s) => fmt.int(s.rows_in_train), (s) => s.rows_in_train > 0],
    ["Rows asking a train row's prompt", (s) => fmt.int(s.prompts_in_train), (s) => s.prompts_in_train > 0],
    ["Tokens per row (min / median / p95 / max)", (s) => (s.lengths && s.lengths.min !== undefined
      ? `${s.lengths.min} / ${s.lengths.median} / ${s.lengths.p95} / ${s.lengths.max}` : "—")],
  ];
  return h("table", { class: "table compact", id: "preflight-sets" },
    h("thead", {}, h("tr", {}, h("th", { scope: "col" }, h("span", { class: "sr-only" }, "Number")),
      sets.map(([name]) => h("th", { scope: "col", class: "num" }, name)))),
    h("tbody", {}, lines.map(([label, value, flagged]) => h("tr", {},
      h("th", { scope: "row" }, label),
      sets.map(([, s]) => h("td", { class: `num${flagged && flagged(s) ? " flagged" : ""}` }, value(s)))))));
}

function runFacts(report, placement) {
  const row = (label, value) => [h("dt", {}, label), h("dd", {}, value)];
  return h("div", {},
    h("dl", { class: "summary", id: "preflight-run" },
      row("Steps", fmt.int(report.steps)),
      row("Epochs", report.epochs === null || report.epochs === undefined ? "—" : String(report.epochs)),
      row("Steps per epoch", fmt.int(report.steps_per_epoch)),
      row("Micro-batch", String(report.micro_batch)),
      row("Max sequence length", fmt.int(report.max_seq_length)),
      row("Train on inputs", report.train_on_inputs ? "yes (prompts are learned too)" : "no"),
      row("GPU class", placement.gpu_class || "none holds it"),
      placement.estimated_peak_bytes ? row("Estimated peak memory", fmt.ibytes(placement.estimated_peak_bytes)) : null),
    report.steps_note ? h("p", { class: "note" }, report.steps_note) : null,
    placement.gpu_class && placement.note ? h("p", { class: "note", id: "preflight-placement-note" }, placement.note) : null);
}

/** One row token by token: trained tokens highlighted, context dimmed, whitespace drawn visibly. */
function example(shown) {
  const trained = shown.trained_in_row ?? shown.tokens.filter((t) => t.trained).length;
  const inRow = shown.tokens_in_row ?? shown.tokens.length;
  return h("div", { class: "preflight-example", id: "preflight-example" },
    h("div", { class: "card-head" },
      h("h3", {}, `Line ${shown.line}, token by token`),
      h("div", { class: "chart-legend" },
        h("span", { class: "legend-item" }, h("span", { class: "tok tok-trained legend-token" }, "abc"), "trained: in the loss"),
        h("span", { class: "legend-item" }, h("span", { class: "tok tok-context legend-token" }, "abc"), "context: not trained"),
        h("span", { class: "legend-item" }, h("span", { class: "ws" }, "·"), "space ", h("span", { class: "ws" }, "↵"), "newline"))),
    h("p", { class: "note" }, `${fmt.int(trained)} of ${fmt.int(inRow)} tokens trained`,
      shown.truncated ? `; the row is ${fmt.int(shown.length)} tokens and is truncated to ${fmt.int(inRow)}` : "",
      ". Hover a token for its id."),
    h("div", { class: "tokens", "aria-label": "The example's tokens; trained ones are marked" },
      shown.tokens.map((t) => h("span", {
        class: `tok ${t.trained ? "tok-trained" : "tok-context"}`, title: `id ${t.id} · ${t.trained ? "trained" : "context"}`,
        dataset: { trained: String(t.trained) },
      }, visibleWhitespace(t.text))),
      // The preflight sends the first 4,096 tokens of a row: two elements each, a whole long row would freeze the tab.
      inRow > shown.tokens.length ? h("p", { class: "note" }, `… and ${fmt.int(inRow - shown.tokens.length)} more tokens`) : null));
}

/** A token's text with its spaces, tabs and newlines drawn, so " the" and "the" read apart; a newline also breaks the line. */
function visibleWhitespace(text) {
  const out = [];
  for (const [i, line] of text.split("\n").entries()) {
    if (i > 0) out.push(h("span", { class: "ws" }, "↵"), h("br"));
    for (const piece of line.split(/([ \t]+)/)) {
      if (!piece) continue;
      out.push(/^[ \t]+$/.test(piece) ? h("span", { class: "ws" }, piece.replace(/ /g, "·").replace(/\t/g, "→")) : piece);
    }
  }
  return out;
}
