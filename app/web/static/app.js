// qlora-service dashboard: plain JavaScript, no build step, no library, nothing from the internet.
// It is a client of the API like curl: every request carries the API key as a Bearer token.
"use strict";

const KEY_STORAGE = "qlora.apiKey";
const REFRESH_MS = 3000; // the jobs table and the datasets list refresh this often
const RECONNECT_MS = 2000; // a job stream cut before the job finished is reopened after this
const FINISHED = ["succeeded", "failed", "cancelled"];
const SUGGESTED_EPOCHS = 3; // the engine needs one of epochs / max_steps and has no default for either

// ------------------------------------------------------------------ DOM helpers

/** h("a", {href: "#"}, "text", child): an element; text is always inserted as text, never as HTML. */
function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  setAttrs(el, attrs);
  el.append(...children.flat().filter((c) => c !== null && c !== undefined && c !== false).map((c) => (c instanceof Node ? c : String(c))));
  return el;
}

function setAttrs(el, attrs) {
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on") && typeof value === "function") el.addEventListener(name.slice(2), value);
    else if (name === "dataset") Object.assign(el.dataset, value);
    else el.setAttribute(name, value === true ? "" : value);
  }
}

const SVG_NS = "http://www.w3.org/2000/svg";
function svg(tag, attrs = {}, ...children) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [name, value] of Object.entries(attrs)) if (value !== null && value !== undefined) el.setAttribute(name, value);
  el.append(...children.flat().filter((c) => c !== null && c !== undefined));
  return el;
}

// ------------------------------------------------------------------ formatting

const fmt = {
  date(iso) {
    if (!iso) return "—";
    const d = new Date(iso);
    return d.toLocaleString(undefined, { year: "numeric", month: "short", day: "numeric", hour: "2-digit", minute: "2-digit" });
  },
  time(iso) {
    return iso ? new Date(iso).toLocaleTimeString(undefined, { hour: "2-digit", minute: "2-digit", second: "2-digit" }) : "";
  },
  bytes(n) {
    if (n === null || n === undefined) return "—";
    const units = ["B", "KB", "MB", "GB", "TB"];
    let i = 0;
    while (n >= 1000 && i < units.length - 1) { n /= 1000; i++; }
    return `${n >= 100 || i === 0 ? Math.round(n) : n.toFixed(1)} ${units[i]}`;
  },
  int(n) { return n === null || n === undefined ? "—" : Math.round(n).toLocaleString(); },
  loss(x) { return x === null || x === undefined ? "—" : Number(x).toFixed(4); },
  small(x) { return x === null || x === undefined ? "—" : Number(x).toPrecision(3); },
  seconds(s) {
    if (s === null || s === undefined) return "—";
    if (s < 90) return `${s.toFixed(1)} s`;
    if (s < 5400) return `${(s / 60).toFixed(1)} min`;
    return `${(s / 3600).toFixed(1)} h`;
  },
  duration(from, to) {
    if (!from) return "—";
    return fmt.seconds(((to ? new Date(to) : new Date()) - new Date(from)) / 1000);
  },
};

// ------------------------------------------------------------------ the API

class ApiError extends Error {
  constructor(status, body) {
    const error = (body && body.error) || {};
    super(error.message || `the server answered ${status}`);
    this.status = status;
    this.code = error.code;
    this.details = error.details || [];
  }
}

function apiKey() { return localStorage.getItem(KEY_STORAGE); }
function authHeaders(extra = {}) { return { Authorization: `Bearer ${apiKey()}`, ...extra }; }

let signInNotice = null;
function signOut(notice) {
  localStorage.removeItem(KEY_STORAGE);
  signInNotice = notice || null;
  if (location.hash !== "#/signin") location.hash = "#/signin";
  else route();
}

/** Call the API with the key. A 401 anywhere means the key is gone or revoked: back to sign-in. */
async function api(path, { method = "GET", json, body, signal } = {}) {
  const headers = authHeaders();
  if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  }
  const response = await fetch(path, { method, headers, body, signal });
  if (response.status === 401) {
    signOut("Your API key was not accepted (revoked or mistyped). Sign in again.");
    throw new ApiError(401, await response.json().catch(() => null));
  }
  if (response.status === 204) return null;
  const data = await response.json().catch(() => null);
  if (!response.ok) throw new ApiError(response.status, data);
  return data;
}

/**
 * Read a Server-Sent Events body. EventSource cannot send an Authorization header, so the stream is
 * fetched like any request and its `event:` / `data:` lines are parsed here (comments are skipped).
 */
async function* readServerSentEvents(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let event = "message";
  let data = [];
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value;
      let newline;
      while ((newline = buffer.indexOf("\n")) >= 0) {
        let line = buffer.slice(0, newline);
        buffer = buffer.slice(newline + 1);
        if (line.endsWith("\r")) line = line.slice(0, -1);
        if (line === "") {
          if (data.length) yield { event, data: data.join("\n") };
          event = "message";
          data = [];
          continue;
        }
        if (line.startsWith(":")) continue; // a keepalive comment
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        let text = colon < 0 ? "" : line.slice(colon + 1);
        if (text.startsWith(" ")) text = text.slice(1);
        if (field === "event") event = text;
        else if (field === "data") data.push(text);
      }
    }
  } finally {
    reader.releaseLock();
  }
}

/**
 * Follow a job's stream until the job has finished. Every (re)connection replays the job from the
 * start, and the page keys what it holds by step and event id, so a reconnect never doubles a point.
 */
async function followJob(jobId, ctx, onMessage, onFatal) {
  while (!ctx.signal.aborted) {
    let finished = false;
    try {
      const response = await fetch(`/jobs/${jobId}/stream`, {
        headers: authHeaders({ Accept: "text/event-stream" }), signal: ctx.signal, cache: "no-store",
      });
      if (response.status === 401) return signOut("Your API key was not accepted. Sign in again.");
      if (!response.ok) return onFatal(new ApiError(response.status, await response.json().catch(() => null)));
      for await (const message of readServerSentEvents(response.body)) {
        const payload = JSON.parse(message.data);
        onMessage(message.event, payload);
        if (message.event === "job" && FINISHED.includes(payload.status)) finished = true;
      }
    } catch (err) {
      if (ctx.signal.aborted) return;
    }
    if (finished) return;
    await ctx.sleep(RECONNECT_MS);
  }
}

// ------------------------------------------------------------------ router

const ROUTES = [
  [/^#\/signin$/, viewSignIn, null],
  [/^#\/jobs$/, viewJobs, "jobs"],
  [/^#\/jobs\/new$/, viewNewJob, "new"],
  [/^#\/jobs\/([0-9a-zA-Z_-]+)$/, viewJob, "jobs"],
  [/^#\/datasets$/, viewDatasets, "datasets"],
];

let currentView = null;

/** What a view gets: an abort signal for its fetches, and timers that stop when the view is left. */
function viewContext() {
  const controller = new AbortController();
  const signal = controller.signal;
  return {
    signal,
    leave: () => controller.abort(),
    every(ms, fn) {
      const timer = setInterval(() => { if (!signal.aborted) fn(); }, ms);
      signal.addEventListener("abort", () => clearInterval(timer));
    },
    sleep(ms) {
      return new Promise((resolve) => {
        const timer = setTimeout(resolve, ms);
        signal.addEventListener("abort", () => { clearTimeout(timer); resolve(); });
      });
    },
  };
}

function route() {
  if (currentView) currentView.leave();
  currentView = null;
  const hash = location.hash || "#/jobs";
  if (!apiKey() && hash !== "#/signin") {
    location.replace("#/signin");
    return;
  }
  if (apiKey() && hash === "#/signin" && !signInNotice) {
    location.replace("#/jobs");
    return;
  }
  const found = ROUTES.map(([pattern, view, nav]) => [hash.match(pattern), view, nav]).find(([m]) => m);
  const main = document.getElementById("view");
  main.replaceChildren();
  renderChrome(found ? found[2] : null);
  if (!found) {
    main.append(h("div", { class: "card empty" }, h("h1", {}, "Page not found"), h("p", {}, h("a", { href: "#/jobs" }, "Go to your jobs"))));
    return;
  }
  const [match, view] = found;
  currentView = viewContext();
  view(main, currentView, ...match.slice(1));
}

function renderChrome(active) {
  const signedIn = Boolean(apiKey());
  document.getElementById("nav").hidden = !signedIn;
  document.getElementById("account").hidden = !signedIn;
  document.getElementById("key-hint").textContent = signedIn ? `${apiKey().slice(0, 8)}…` : "";
  for (const link of document.querySelectorAll("#nav a")) {
    if (link.dataset.nav === active) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
}

function setTitle(text) { document.title = text ? `${text} · qlora-service` : "qlora-service"; }

function errorAlert(err) {
  return h("div", { class: "alert alert-error", role: "alert" }, h("p", {}, err.message || String(err)));
}

function statusBadge(status) { return h("span", { class: `badge badge-${status}` }, status); }

function progressBar(job, large = false) {
  const { step, total_steps: total, fraction } = job.progress;
  const percent = FINISHED.includes(job.status) && job.status === "succeeded" ? 100 : Math.round((fraction || 0) * 100);
  const fillClass = job.status === "succeeded" ? "done" : job.status === "failed" ? "failed" : "";
  return h("div", { class: `progress${large ? " progress-large" : ""}` },
    h("div", {
      class: "progress-track", role: "progressbar", "aria-label": "Training progress",
      "aria-valuemin": "0", "aria-valuemax": "100", "aria-valuenow": String(percent),
    }, h("div", { class: `progress-fill ${fillClass}`, style: `width: ${percent}%` })),
    h("span", { class: "progress-text" }, total ? `${step} / ${total}` : step ? `step ${step}` : "—"));
}

// ------------------------------------------------------------------ sign in

function viewSignIn(main) {
  setTitle("Sign in");
  const notice = signInNotice;
  signInNotice = null;
  const input = h("input", { type: "password", id: "api-key", name: "api-key", autocomplete: "off", spellcheck: "false", required: true, "aria-describedby": "api-key-hint" });
  const message = h("div", { role: "status" });
  if (notice) message.append(h("div", { class: "alert alert-info" }, notice));
  const button = h("button", { type: "submit", class: "btn btn-primary" }, "Sign in");
  const form = h("form", { novalidate: true },
    h("div", { class: "field" },
      h("label", { for: "api-key" }, "API key"),
      input,
      h("p", { class: "hint", id: "api-key-hint" }, "Kept in this browser only. An admin makes one with ", h("code", {}, "qlora admin create-key TEAM"), ".")),
    button);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const key = input.value.trim();
    message.replaceChildren();
    if (!key) {
      message.append(h("div", { class: "alert alert-error" }, "Paste your API key first."));
      return;
    }
    button.disabled = true;
    try {
      // A cheap authenticated call tells whether the key works before it is kept.
      const response = await fetch("/models", { headers: { Authorization: `Bearer ${key}` } });
      if (response.status === 401) {
        message.append(h("div", { class: "alert alert-error", role: "alert" }, "This key was not accepted: check it, or ask an admin for a new one."));
        return;
      }
      if (!response.ok) throw new ApiError(response.status, await response.json().catch(() => null));
      localStorage.setItem(KEY_STORAGE, key);
      location.hash = "#/jobs";
    } catch (err) {
      message.append(errorAlert(err));
    } finally {
      button.disabled = false;
    }
  });
  main.append(h("section", { class: "signin card", "aria-labelledby": "signin-title" },
    h("h1", { id: "signin-title" }, "Sign in"),
    h("p", { class: "lead" }, "Fine-tune open models with QLoRA: upload a dataset, start a job, watch its loss curve and download the adapter."),
    message, form));
  input.focus();
}

// ------------------------------------------------------------------ jobs

function viewJobs(main, ctx) {
  setTitle("Jobs");
  const body = h("div", { class: "table-wrap" }, h("p", { class: "empty" }, "Loading jobs…"));
  main.append(
    h("div", { class: "page-head" },
      h("div", {}, h("h1", {}, "Jobs"), h("p", { class: "subtitle" }, "Newest first; this list refreshes by itself.")),
      h("a", { class: "btn btn-primary", href: "#/jobs/new" }, "New job")),
    h("section", { class: "card flush", "aria-label": "Jobs" }, body));

  async function refresh() {
    try {
      const page = await api("/jobs?limit=100", { signal: ctx.signal });
      body.replaceChildren(jobsTable(page.data));
    } catch (err) {
      if (!ctx.signal.aborted) body.replaceChildren(errorAlert(err));
    }
  }
  refresh();
  ctx.every(REFRESH_MS, refresh);
}

function jobsTable(jobs) {
  if (!jobs.length) {
    return h("div", { class: "empty" },
      h("p", {}, "No jobs yet."),
      h("p", {}, h("a", { href: "#/datasets" }, "Upload a dataset"), ", then ", h("a", { href: "#/jobs/new" }, "create a job"), "."));
  }
  return h("table", { class: "table", id: "jobs-table" },
    h("caption", { class: "sr-only" }, "Jobs, newest first"),
    h("thead", {}, h("tr", {},
      h("th", { scope: "col" }, "Name"), h("th", { scope: "col" }, "Status"), h("th", { scope: "col" }, "Progress"),
      h("th", { scope: "col" }, "Base model"), h("th", { scope: "col" }, "Created"))),
    h("tbody", {}, jobs.map((job) => h("tr", { dataset: { jobId: job.id } },
      h("td", {}, h("a", { class: "row-link", href: `#/jobs/${job.id}` }, job.name || "Untitled job"), h("span", { class: "sub" }, job.id.slice(0, 12))),
      h("td", {}, statusBadge(job.status)),
      h("td", {}, progressBar(job)),
      h("td", {}, job.base_model),
      h("td", { class: "when" }, fmt.date(job.created_at))))));
}

// ------------------------------------------------------------------ one job

function viewJob(main, ctx, jobId) {
  setTitle("Job");
  const state = { job: null, train: new Map(), eval: new Map(), events: new Map(), artifacts: [], checkpoints: [] };

  const header = h("div", { class: "page-head" }, h("h1", {}, "Loading job…"));
  const progressCard = h("section", { class: "card", "aria-label": "Progress" });
  const errorBox = h("div");
  const chartBox = h("div", { id: "loss-chart" });
  const summaryBox = h("div");
  const eventsBox = h("ol", { class: "events", id: "events", "aria-label": "Job events, newest first" });
  const checkpointsBox = h("div", { class: "table-wrap" });
  main.append(
    h("a", { class: "back", href: "#/jobs" }, "← All jobs"),
    header, errorBox, progressCard,
    h("div", { class: "grid" },
      h("section", { class: "card", "aria-labelledby": "chart-title" },
        h("div", { class: "card-head" }, h("h2", { id: "chart-title" }, "Loss"),
          h("div", { class: "chart-legend", "aria-hidden": "true" },
            h("span", { class: "legend-item" }, h("span", { class: "legend-swatch legend-train" }), "train"),
            h("span", { class: "legend-item" }, h("span", { class: "legend-swatch legend-eval" }), "eval"))),
        chartBox),
      h("section", { class: "card", "aria-labelledby": "summary-title" },
        h("div", { class: "card-head" }, h("h2", { id: "summary-title" }, "Summary")), summaryBox)),
    h("div", { class: "grid grid-even" },
      h("section", { class: "card", "aria-labelledby": "events-title" },
        h("div", { class: "card-head" }, h("h2", { id: "events-title" }, "Events")), eventsBox),
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
      chartBox.replaceChildren(lossChart([...state.train.values()], [...state.eval.values()], state.job.progress.total_steps));
      renderSummary(summaryBox, state);
      renderEvents(eventsBox, state);
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

  function onMessage(type, payload) {
    if (type === "job") {
      const before = state.job && state.job.status;
      state.job = payload;
      setTitle(payload.name || "Job");
      if (payload.status !== before && FINISHED.includes(payload.status)) {
        loadArtifacts();
        loadCheckpoints();
      }
    } else if (type === "metric") {
      (payload.kind === "eval" ? state.eval : state.train).set(payload.step, payload);
    } else if (type === "event") {
      state.events.set(payload.id, payload);
      if (payload.type === "checkpoint_saved") loadCheckpoints();
    }
    redraw();
  }

  function onFatal(err) {
    header.replaceChildren(h("h1", {}, err.status === 404 ? "Job not found" : "This job cannot be shown"));
    errorBox.replaceChildren(errorAlert(err));
  }

  loadCheckpoints();
  followJob(jobId, ctx, onMessage, onFatal);
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
        training.max_steps ? `${training.max_steps} steps` : `${training.epochs} epochs`, " · created ", fmt.date(job.created_at))),
    h("div", { class: "actions" }, ...downloads, cancel));
}

/**
 * A download the browser saves to disk. On S3 the API's download route answers 307 to a presigned
 * URL; a page cannot follow that with its key as a download (fetch() would need CORS on the store and
 * would hold the archive in memory), so it asks for the presigned link with its key and navigates to
 * it: the store answers with Content-Disposition: attachment. Local storage has no link: then the
 * page fetches the download route itself (same origin, with the key) and saves the body.
 */
async function downloadArtifact(jobId, kind, button, header) {
  button.disabled = true;
  try {
    const link = await api(`/jobs/${jobId}/artifacts/${kind}/link`);
    if (link.url) {
      saveFrom(link.url, link.filename);
    } else {
      const response = await fetch(`/jobs/${jobId}/artifacts/${kind}`, { headers: authHeaders() });
      if (!response.ok) throw new ApiError(response.status, await response.json().catch(() => null));
      const blobUrl = URL.createObjectURL(await response.blob());
      saveFrom(blobUrl, link.filename);
      setTimeout(() => URL.revokeObjectURL(blobUrl), 60000);
    }
  } catch (err) {
    header.append(errorAlert(err));
  } finally {
    button.disabled = false;
  }
}

function saveFrom(url, filename) {
  const a = h("a", { href: url, download: filename, hidden: true });
  document.body.append(a);
  a.click();
  a.remove();
}

function renderProgress(card, state) {
  const job = state.job;
  const pct = job.progress.fraction === null ? null : Math.round(job.progress.fraction * 100);
  const lastTrain = [...state.train.values()].sort((a, b) => a.step - b.step).at(-1);
  card.replaceChildren(
    h("div", { class: "card-head" }, h("h2", {}, "Progress"),
      h("span", { class: "meta" }, job.progress.total_steps ? `step ${job.progress.step} of ${job.progress.total_steps}${pct !== null ? ` · ${pct}%` : ""}` : "waiting for a worker")),
    progressBar(job, true),
    h("dl", { class: "stats" },
      stat("Started", fmt.date(job.started_at)),
      stat(job.finished_at ? "Took" : "Running for", job.started_at ? fmt.duration(job.started_at, job.finished_at) : "—"),
      stat("Trained tokens", fmt.int(job.trained_tokens)),
      stat("Latest train loss", fmt.loss(lastTrain && lastTrain.train_loss)),
      stat("Attempt", String(job.attempt)),
      stat("Queue", job.queue)));
}

function stat(label, value) { return h("div", { class: "stat" }, h("dt", {}, label), h("dd", {}, value)); }

function renderSummary(box, state) {
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
    if (s.perplexity_final) row("Perplexity", Number(s.perplexity_final).toFixed(2));
    if (s.merge_fidelity) {
      section("Merge fidelity");
      row("Max |logit diff|", fmt.small(s.merge_fidelity.max_abs_logit_diff));
      row("Mean |logit diff|", fmt.small(s.merge_fidelity.mean_abs_logit_diff));
      row("Eval loss diff", fmt.small(s.merge_fidelity.eval_loss_diff));
    }
    section("Run");
    row("Tokens / s", fmt.int(s.tokens_per_second));
    row("Peak memory", fmt.bytes(s.peak_memory_bytes));
    row("Tokens seen", fmt.int(s.tokens_seen));
    if (s.steps) row("Steps", `${fmt.int(s.steps.completed)} of ${fmt.int(s.steps.planned)}`);
    if (s.parameters) row("Trainable parameters", `${fmt.int(s.parameters.trainable)} (${(100 * s.parameters.trainable / s.parameters.total).toFixed(2)}%)`);
    if (s.device) row("Device", `${s.device}${s.compute_dtype ? `, ${s.compute_dtype}` : ""}`);
  }
  box.replaceChildren(h("dl", { class: "summary", id: "summary" }, rows));
}

function renderEvents(list, state) {
  const events = [...state.events.values()].sort((a, b) => b.id - a.id);
  if (!events.length) {
    list.replaceChildren(h("li", { class: "empty" }, "No events yet."));
    return;
  }
  list.replaceChildren(...events.map((e) => h("li", { class: `level-${e.level}`, dataset: { type: e.type } },
    h("time", { datetime: e.created_at }, fmt.time(e.created_at)),
    h("div", {},
      h("span", { class: "event-type" }, e.type),
      e.step !== null ? h("span", { class: "event-step" }, `step ${e.step}`) : null,
      e.message ? h("div", { class: "event-message" }, e.message) : null))));
}

function renderCheckpoints(box, checkpoints) {
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

// ------------------------------------------------------------------ the loss chart (inline SVG)

/** Round tick values for [low, high]: steps of 1, 2 or 5 times a power of ten. */
function niceTicks(low, high, count = 5) {
  if (!(high > low)) high = low + 1;
  const raw = (high - low) / count;
  const power = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * power).find((s) => s >= raw);
  const start = Math.floor(low / step) * step;
  const ticks = [];
  for (let v = start; v <= high + step * 1e-9; v += step) ticks.push(Number(v.toFixed(10)));
  if (ticks[ticks.length - 1] < high) ticks.push(Number((ticks[ticks.length - 1] + step).toFixed(10)));
  return { ticks, step };
}

function tickLabel(value, step) {
  const decimals = Math.max(0, -Math.floor(Math.log10(step)));
  return value.toFixed(Math.min(decimals, 6));
}

function lossChart(trainPoints, evalPoints, totalSteps) {
  const W = 720, H = 380;
  const m = { left: 58, right: 18, top: 14, bottom: 42 };
  const train = trainPoints.filter((p) => p.train_loss !== null).sort((a, b) => a.step - b.step);
  const evals = evalPoints.filter((p) => p.eval_loss !== null).sort((a, b) => a.step - b.step);
  const losses = [...train.map((p) => p.train_loss), ...evals.map((p) => p.eval_loss)];

  const maxStep = Math.max(totalSteps || 0, ...train.map((p) => p.step), ...evals.map((p) => p.step), 1);
  const xTicks = niceTicks(0, maxStep, 6);
  const xMax = xTicks.ticks[xTicks.ticks.length - 1];
  const lossLow = losses.length ? Math.min(...losses) : 0;
  const lossHigh = losses.length ? Math.max(...losses) : 1;
  const pad = (lossHigh - lossLow) * 0.08 || lossHigh * 0.1 || 0.5;
  const yTicks = niceTicks(Math.max(0, lossLow - pad), lossHigh + pad, 5);
  const yMin = yTicks.ticks[0], yMax = yTicks.ticks[yTicks.ticks.length - 1];

  const x = (step) => m.left + (step / xMax) * (W - m.left - m.right);
  const y = (loss) => H - m.bottom - ((loss - yMin) / (yMax - yMin)) * (H - m.top - m.bottom);
  const path = (points, key) => points.map((p, i) => `${i ? "L" : "M"}${x(p.step).toFixed(1)},${y(p[key]).toFixed(1)}`).join(" ");

  const description = train.length
    ? `Train loss from ${fmt.loss(train[0].train_loss)} at step ${train[0].step} to ${fmt.loss(train.at(-1).train_loss)} at step ${train.at(-1).step}` +
      (evals.length ? `; eval loss ${fmt.loss(evals.at(-1).eval_loss)} at step ${evals.at(-1).step}.` : ".")
    : "No loss logged yet.";

  const chart = svg("svg", { class: "chart", viewBox: `0 0 ${W} ${H}`, role: "img", "aria-labelledby": "chart-svg-title chart-svg-desc" },
    svg("title", { id: "chart-svg-title" }, "Loss curve"),
    svg("desc", { id: "chart-svg-desc" }, description),
    svg("defs", {}, svg("linearGradient", { id: "train-fill", x1: "0", x2: "0", y1: "0", y2: "1" },
      svg("stop", { offset: "0%", "stop-color": "#4338ca", "stop-opacity": "0.16" }),
      svg("stop", { offset: "100%", "stop-color": "#4338ca", "stop-opacity": "0" }))),
    // grid and ticks
    yTicks.ticks.map((v) => svg("g", {},
      svg("line", { class: "grid-line", x1: m.left, x2: W - m.right, y1: y(v), y2: y(v) }),
      svg("text", { class: "tick-label", x: m.left - 8, y: y(v) + 4, "text-anchor": "end" }, tickLabel(v, yTicks.step)))),
    xTicks.ticks.map((v) => svg("g", {},
      svg("line", { class: "axis-line", x1: x(v), x2: x(v), y1: H - m.bottom, y2: H - m.bottom + 5 }),
      svg("text", { class: "tick-label", x: x(v), y: H - m.bottom + 18, "text-anchor": "middle" }, String(v)))),
    svg("line", { class: "axis-line", x1: m.left, x2: W - m.right, y1: H - m.bottom, y2: H - m.bottom }),
    svg("line", { class: "axis-line", x1: m.left, x2: m.left, y1: m.top, y2: H - m.bottom }),
    svg("text", { class: "axis-title", x: (m.left + W - m.right) / 2, y: H - 6, "text-anchor": "middle" }, "step"),
    svg("text", { class: "axis-title", x: 14, y: (m.top + H - m.bottom) / 2, "text-anchor": "middle", transform: `rotate(-90 14 ${(m.top + H - m.bottom) / 2})` }, "loss"),
    // the series
    train.length > 1 ? svg("path", { class: "area-train", d: `${path(train, "train_loss")} L${x(train.at(-1).step).toFixed(1)},${H - m.bottom} L${x(train[0].step).toFixed(1)},${H - m.bottom} Z` }) : null,
    svg("path", { class: "line-train", id: "train-loss-path", d: path(train, "train_loss"), "data-points": String(train.length) }),
    train.length ? svg("circle", { class: "dot-train", cx: x(train.at(-1).step), cy: y(train.at(-1).train_loss), r: 4 }) : null,
    svg("path", { class: "line-eval", id: "eval-loss-path", d: path(evals, "eval_loss"), "data-points": String(evals.length) }),
    evals.map((p) => svg("circle", { class: "dot-eval", cx: x(p.step), cy: y(p.eval_loss), r: 4 },
      svg("title", {}, `eval loss ${fmt.loss(p.eval_loss)} at step ${p.step}`))),
    losses.length ? null : svg("text", { class: "empty-label", x: (m.left + W - m.right) / 2, y: (m.top + H - m.bottom) / 2, "text-anchor": "middle" },
      "Waiting for the first logged step…"));
  return chart;
}

// ------------------------------------------------------------------ datasets

function viewDatasets(main, ctx) {
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

  async function refresh() {
    try {
      const page = await api("/datasets?limit=100", { signal: ctx.signal });
      list.replaceChildren(datasetsTable(page.data));
    } catch (err) {
      if (!ctx.signal.aborted) list.replaceChildren(errorAlert(err));
    }
  }

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
      const dataset = await api("/datasets", { method: "POST", body: data, signal: ctx.signal });
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

  refresh();
  ctx.every(REFRESH_MS * 3, refresh);
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

// ------------------------------------------------------------------ new job

/**
 * The form's fields. `path` is the field's name in POST /jobs (and in the API's 422 details, so an
 * error lands next to its field); `type` says how the text becomes JSON.
 */
const SPEC_FIELDS = {
  lora: [
    ["lora.r", "Rank (r)", "int", "Adapter size; 16 is the common default."],
    ["lora.alpha", "Alpha", "float", "Update scale is alpha / r."],
    ["lora.dropout", "Dropout", "float", "0.05 up to 13B models."],
  ],
  length: [
    ["training.epochs", "Epochs", "float", "Passes over the data. Set this or max steps."],
    ["training.max_steps", "Max steps", "int", "Optimizer steps. Set this or epochs."],
  ],
  training: [
    ["training.learning_rate", "Learning rate", "float", "2e-4 suits 7B–13B models."],
    ["training.per_device_batch_size", "Batch size per device", "int", "Micro-batch; lower it if memory runs out."],
    ["training.gradient_accumulation_steps", "Gradient accumulation steps", "int", "Effective batch = batch × this."],
    ["training.max_seq_length", "Max sequence length", "int", "Longer rows are truncated."],
    ["training.lr_scheduler", "LR scheduler", ["constant", "cosine", "linear"], "QLoRA used constant."],
    ["training.warmup_ratio", "Warmup ratio", "float", "Share of steps spent warming up."],
    ["training.logging_steps", "Logging steps", "int", "A loss point every this many steps."],
    ["training.eval_steps", "Eval steps", "int", "Used with a validation dataset."],
    ["training.save_steps", "Save steps", "int", "A checkpoint every this many steps."],
  ],
  quantization: [
    ["quantization.bits", "Quantization bits", ["4", "8", "none"], "4 is QLoRA (NF4); the others are baselines."],
  ],
};

function fieldId(path) { return `f-${path.replace(/[^a-zA-Z0-9_-]/g, "-")}`; }

function specField([path, label, type, hint], value) {
  const id = fieldId(path);
  const describedBy = `${id}-hint ${id}-error`;
  let control;
  if (Array.isArray(type)) {
    control = h("select", { id, name: path, "aria-describedby": describedBy, dataset: { type: "choice" } },
      type.map((option) => h("option", { value: option, selected: String(value) === option }, option)));
  } else {
    control = h("input", {
      id, name: path, type: "text", inputmode: type === "int" ? "numeric" : "decimal", autocomplete: "off",
      value: value === null || value === undefined ? "" : String(value), "aria-describedby": describedBy,
      dataset: { type },
    });
  }
  return h("div", { class: "field", dataset: { field: path } },
    h("label", { for: id }, label), control,
    h("p", { class: "hint", id: `${id}-hint` }, hint),
    h("p", { class: "field-error", id: `${id}-error`, hidden: true }));
}

function getPath(object, path) { return path.split(".").reduce((o, k) => (o ? o[k] : undefined), object); }
function setPath(object, path, value) {
  const keys = path.split(".");
  let o = object;
  for (const k of keys.slice(0, -1)) o = o[k] = o[k] || {};
  o[keys.at(-1)] = value;
}

/** Text to JSON: numbers when they parse; otherwise the text as typed, so the API names what is wrong. */
function parseValue(text, type) {
  if (type === "int" || type === "float") {
    const n = Number(text);
    return text.trim() !== "" && Number.isFinite(n) ? n : text;
  }
  return type === "choice" && /^\d+$/.test(text) ? Number(text) : text; // quantization bits: 4, 8 or "none"
}

async function viewNewJob(main, ctx) {
  setTitle("New job");
  main.append(h("div", { class: "page-head" }, h("div", {}, h("h1", {}, "New job"),
    h("p", { class: "subtitle" }, "Pre-filled with the engine's defaults (the QLoRA paper's recipe)."))));
  const holder = h("div", {}, h("p", { class: "empty card" }, "Loading models and datasets…"));
  main.append(holder);

  let models, datasets, defaults;
  try {
    [models, datasets, defaults] = await Promise.all([
      api("/models", { signal: ctx.signal }),
      api("/datasets?limit=200", { signal: ctx.signal }).then((page) => page.data.filter((d) => d.status === "ready")),
      fetch("/web/spec-defaults", { signal: ctx.signal }).then((r) => r.json()),
    ]);
  } catch (err) {
    if (!ctx.signal.aborted) holder.replaceChildren(errorAlert(err));
    return;
  }
  if (ctx.signal.aborted) return;
  if (!datasets.length) {
    holder.replaceChildren(h("div", { class: "card empty" }, h("p", {}, "A job trains on a dataset, and your team has no usable one yet."),
      h("p", {}, h("a", { class: "btn btn-primary", href: "#/datasets" }, "Upload a dataset"))));
    return;
  }
  if (defaults.training.epochs === null && defaults.training.max_steps === null) defaults.training.epochs = SUGGESTED_EPOCHS;

  const datasetLabel = (d) => `${d.filename} — ${fmt.int(d.rows)} rows, ${d.format}`;
  const topFields = [
    h("div", { class: "field", dataset: { field: "name" } },
      h("label", { for: "f-name" }, "Name"),
      h("input", { id: "f-name", name: "name", type: "text", placeholder: "support-bot-v1", autocomplete: "off", "aria-describedby": "f-name-error" }),
      h("p", { class: "field-error", id: "f-name-error", hidden: true })),
    h("div", { class: "field", dataset: { field: "base_model" } },
      h("label", { for: "f-base_model" }, "Base model"),
      h("select", { id: "f-base_model", name: "base_model", "aria-describedby": "f-base_model-error" },
        models.map((mdl) => h("option", { value: mdl.name }, mdl.name + (mdl.description ? ` — ${mdl.description}` : "")))),
      h("p", { class: "field-error", id: "f-base_model-error", hidden: true })),
    h("div", { class: "field", dataset: { field: "dataset_id" } },
      h("label", { for: "f-dataset_id" }, "Training dataset"),
      h("select", { id: "f-dataset_id", name: "dataset_id", "aria-describedby": "f-dataset_id-error" },
        datasets.map((d) => h("option", { value: d.id }, datasetLabel(d)))),
      h("p", { class: "field-error", id: "f-dataset_id-error", hidden: true })),
    h("div", { class: "field", dataset: { field: "validation_dataset_id" } },
      h("label", { for: "f-validation_dataset_id" }, "Validation dataset (optional)"),
      h("select", { id: "f-validation_dataset_id", name: "validation_dataset_id", "aria-describedby": "f-validation_dataset_id-error" },
        h("option", { value: "" }, "None"), datasets.map((d) => h("option", { value: d.id }, datasetLabel(d)))),
      h("p", { class: "field-error", id: "f-validation_dataset_id-error", hidden: true })),
  ];

  const section = (title, hint, fields) => h("fieldset", { class: "form-section" },
    h("legend", {}, title), hint ? h("p", { class: "section-hint" }, hint) : null,
    h("div", { class: "fields" }, fields.map((f) => specField(f, getPath(defaults, f[0])))));

  const summary = h("div", { id: "form-errors" });
  const submit = h("button", { type: "submit", class: "btn btn-primary", id: "create-job" }, "Start training");
  const merge = h("input", { type: "checkbox", id: "f-output-merge", name: "output.merge", checked: defaults.output.merge });
  const form = h("form", { id: "new-job", novalidate: true },
    summary,
    h("fieldset", { class: "form-section" }, h("legend", {}, "Job"),
      h("p", { class: "section-hint" }, "What to train, and on what."),
      h("div", { class: "fields wide" }, topFields)),
    h("hr", { class: "divider" }),
    section("How long", "Set exactly one of epochs and max steps.", SPEC_FIELDS.length),
    h("hr", { class: "divider" }),
    section("Training", null, SPEC_FIELDS.training),
    h("hr", { class: "divider" }),
    section("LoRA adapter", null, SPEC_FIELDS.lora),
    h("hr", { class: "divider" }),
    h("fieldset", { class: "form-section" }, h("legend", {}, "Model"),
      h("div", { class: "fields" },
        SPEC_FIELDS.quantization.map((f) => specField(f, getPath(defaults, f[0]))),
        h("div", { class: "field", dataset: { field: "output.merge" } },
          h("label", { class: "checkbox", for: "f-output-merge" }, merge, "Also build a merged bf16 model"),
          h("p", { class: "field-error", id: "f-output-merge-error", hidden: true })))),
    h("div", { class: "form-actions" }, submit, h("a", { class: "btn btn-ghost", href: "#/jobs" }, "Back to jobs")));
  holder.replaceChildren(h("section", { class: "card" }, form));

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    clearErrors(form, summary);
    const body = { lora: {}, training: {}, quantization: {}, output: { merge: merge.checked } };
    for (const control of form.querySelectorAll("input[name], select[name]")) {
      if (control.type === "checkbox") continue;
      const text = control.value.trim();
      // Blank: the engine's default (or, for the validation dataset and the name, none).
      if (text === "" && control.name !== "dataset_id" && control.name !== "base_model") continue;
      setPath(body, control.name, control.dataset.type ? parseValue(text, control.dataset.type) : text);
    }
    submit.disabled = true;
    submit.textContent = "Creating…";
    try {
      const job = await api("/jobs", { method: "POST", json: body, signal: ctx.signal });
      location.hash = `#/jobs/${job.id}`;
    } catch (err) {
      if (!ctx.signal.aborted) showErrors(form, summary, err);
    } finally {
      submit.disabled = false;
      submit.textContent = "Start training";
    }
  });
}

function clearErrors(form, summary) {
  summary.replaceChildren();
  for (const el of form.querySelectorAll(".field-error")) { el.hidden = true; el.textContent = ""; }
  for (const el of form.querySelectorAll("[aria-invalid]")) el.removeAttribute("aria-invalid");
}

/** The fields an error names: "training.learning_rate", or a rule over two, "training.epochs / max_steps". */
function fieldsNamed(field) {
  const parts = field.split(" / ");
  const prefix = parts[0].includes(".") ? parts[0].slice(0, parts[0].lastIndexOf(".") + 1) : "";
  return [parts[0], ...parts.slice(1).map((p) => (p.includes(".") ? p : prefix + p))];
}

/** A 422 puts each message next to the field it names; what names no field here goes in the summary. */
function showErrors(form, summary, err) {
  const unplaced = [];
  let first = null;
  for (const detail of err.details || []) {
    const targets = fieldsNamed(detail.field || "")
      .map((path) => form.querySelector(`[data-field="${CSS.escape(path)}"]`)).filter(Boolean);
    if (!targets.length) { unplaced.push(detail.field ? `${detail.field}: ${detail.message}` : detail.message); continue; }
    for (const box of targets) {
      const message = box.querySelector(".field-error");
      message.textContent = message.textContent ? `${message.textContent}; ${detail.message}` : detail.message;
      message.hidden = false;
      const control = box.querySelector("input, select");
      control.setAttribute("aria-invalid", "true");
      first = first || control;
    }
  }
  const placed = (err.details || []).length - unplaced.length;
  summary.replaceChildren(h("div", { class: "alert alert-error", role: "alert" },
    h("p", {}, h("strong", {}, "The job was not created. "),
      placed ? "Fix the fields marked below." : err.details && err.details.length ? "" : err.message),
    unplaced.length ? h("ul", {}, unplaced.map((text) => h("li", {}, text))) : null));
  if (first) first.focus();
  else summary.scrollIntoView({ block: "start" });
}

// ------------------------------------------------------------------ start

document.getElementById("sign-out").addEventListener("click", () => signOut("Signed out."));
document.getElementById("skip-link").addEventListener("click", (event) => {
  event.preventDefault();
  document.getElementById("view").focus();
});
window.addEventListener("hashchange", route);
route();
