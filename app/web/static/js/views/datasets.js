// Datasets: upload a JSONL file (every line is checked on upload), see what the team has, and
// for an invalid file the bad lines with their numbers.

import { api, idempotencyKeys } from "../api.js";
import { h, setTitle } from "../dom.js";
import { fmt } from "../format.js";
import { liveList, REFRESH_MS } from "../live-list.js";
import { errorAlert, statusBadge } from "../widgets.js";

export function viewDatasets(main, ctx) {
  setTitle("Datasets");
  const result = h("div", { id: "upload-result", role: "status" });
  const fileInput = h("input", { type: "file", id: "dataset-file", name: "file", accept: ".jsonl,.json,.txt,application/jsonl,application/x-ndjson", "aria-describedby": "dataset-file-hint" });
  const button = h("button", { type: "submit", class: "btn btn-primary", id: "upload-button" }, "Upload");
  const form = h("form", { class: "upload-row", novalidate: true },
    h("div", { class: "field" },
      h("label", { for: "dataset-file" }, "JSONL file"),
      fileInput,
      h("p", { class: "hint", id: "dataset-file-hint" }, "One JSON object per line: chat (messages), prompt / completion, alpaca or text. Every line is checked.")),
    button);
  const list = h("div", { class: "table-wrap" }, h("p", { class: "empty" }, "Loading datasets…"));
  main.append(
    h("div", { class: "page-head" }, h("div", {}, h("h1", {}, "Datasets"), h("p", { class: "subtitle" }, "What your team has uploaded, newest first."))),
    h("section", { class: "card", "aria-labelledby": "upload-title" },
      h("div", { class: "card-head" }, h("h2", { id: "upload-title" }, "Upload a dataset")), form, result),
    h("section", { class: "card flush", "aria-label": "Datasets" }, list));

  // Datasets change only on upload, so the list refreshes less often than the jobs table.
  const refresh = liveList(ctx, list, "/datasets?limit=100", datasetsTable, REFRESH_MS * 3);

  const keyFor = idempotencyKeys(); // the same file sent again is stored once
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    result.replaceChildren();
    const file = fileInput.files[0];
    if (!file) {
      result.append(h("div", { class: "alert alert-error", role: "alert" }, "Choose a JSONL file first."));
      return;
    }
    const data = new FormData();
    data.append("file", file, file.name);
    button.disabled = true;
    button.textContent = "Uploading…";
    try {
      const headers = { "Idempotency-Key": keyFor(JSON.stringify([file.name, file.size, file.lastModified])) };
      const dataset = await api("/datasets", { method: "POST", body: data, headers, signal: ctx.signal });
      result.append(dataset.status === "ready"
        ? h("div", { class: "alert alert-ok" },
          h("p", {}, h("strong", {}, dataset.filename), ` is ready: ${fmt.int(dataset.rows)} rows in ${dataset.format} format, about ${fmt.int(dataset.token_estimate)} tokens. `,
            h("a", { href: "#/jobs/new" }, "Train on it")))
        : validationReport(dataset));
      form.reset();
      refresh();
    } catch (err) {
      if (!ctx.signal.aborted) result.append(errorAlert(err));
    } finally {
      button.disabled = false;
      button.textContent = "Upload";
    }
  });
}

/** The bad lines of an invalid dataset, with their numbers: what to fix before uploading again. */
function validationReport(dataset) {
  const shown = dataset.errors.length;
  return h("div", { class: "alert alert-error validation-report", role: "alert" },
    h("p", {}, h("strong", {}, dataset.filename), ` is invalid: ${dataset.error_count} bad line${dataset.error_count === 1 ? "" : "s"}` +
      (dataset.error_count > shown ? ` (the first ${shown} below)` : "") + ". Fix them and upload the file again."),
    badLinesTable(dataset.errors));
}

function badLinesTable(errors) {
  return h("table", { class: "table report-table" },
    h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "Line"), h("th", { scope: "col" }, "Problem"))),
    h("tbody", {}, errors.map((e) => h("tr", { dataset: { line: String(e.line) } }, h("td", {}, String(e.line)), h("td", {}, e.message)))));
}

function datasetsTable(datasets) {
  if (!datasets.length) return h("p", { class: "empty" }, "No datasets yet: upload one above.");
  return h("table", { class: "table", id: "datasets-table" },
    h("caption", { class: "sr-only" }, "Datasets, newest first"),
    h("thead", {}, h("tr", {},
      h("th", { scope: "col" }, "File"), h("th", { scope: "col" }, "Status"), h("th", { scope: "col" }, "Format"),
      h("th", { scope: "col", class: "num" }, "Rows"), h("th", { scope: "col", class: "num" }, "Tokens (est.)"),
      h("th", { scope: "col", class: "num" }, "Size"), h("th", { scope: "col" }, "Uploaded"))),
    h("tbody", {}, datasets.map((d) => h("tr", { dataset: { datasetId: d.id } },
      h("td", {}, h("strong", {}, d.filename), h("span", { class: "sub" }, d.id.slice(0, 12)),
        d.status === "invalid" ? h("details", { class: "report" },
          h("summary", {}, `${d.error_count} bad line${d.error_count === 1 ? "" : "s"}`), badLinesTable(d.errors)) : null),
      h("td", {}, statusBadge(d.status)),
      h("td", {}, d.format || "—"),
      h("td", { class: "num" }, fmt.int(d.rows)),
      h("td", { class: "num" }, fmt.int(d.token_estimate)),
      h("td", { class: "num" }, fmt.bytes(d.bytes)),
      h("td", { class: "when" }, fmt.date(d.created_at))))));
}
