// The new-job form: pre-filled from the engine's defaults (GET /web/spec-defaults), it posts the
// spec and opens the new job's page, or puts the API's 422 details next to their fields. Before
// submit, its preflight (POST /jobs/preflight, the same body) shows what the job would train on.

import { api, idempotencyKeys } from "../api.js";
import { h, setTitle } from "../dom.js";
import { fmt } from "../format.js";
import { errorAlert } from "../widgets.js";
import { clearErrors, showErrors } from "./new-job-errors.js";
import { getPath, methodBody, parseValue, setPath, SPEC_FIELDS, specField } from "./new-job-fields.js";
import { preflightPanel } from "./new-job-preflight.js";

const SUGGESTED_EPOCHS = 3; // the engine needs one of epochs / max_steps and has no default for either

export async function viewNewJob(main, ctx) {
  setTitle("New job");
  main.append(h("div", { class: "page-head" }, h("div", {}, h("h1", {}, "New job"),
    h("p", { class: "subtitle" }, "Pre-filled with the engine's defaults (the QLoRA paper's recipe)."))));
  const holder = h("div", {}, h("p", { class: "empty card" }, "Loading models and datasets…"));
  main.append(holder);

  let models, datasets, defaults, finished;
  try {
    [models, datasets, defaults, finished] = await Promise.all([
      api("/models", { signal: ctx.signal }),
      api("/datasets?limit=200", { signal: ctx.signal }).then((page) => page.data.filter((d) => d.status === "ready")),
      fetch("/web/spec-defaults", { signal: ctx.signal }).then((r) => r.json()),
      api("/jobs?status=succeeded&limit=50", { signal: ctx.signal }).then((page) => page.data),
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
    h("div", { class: "field", dataset: { field: "initial_job_id" } },
      h("label", { for: "f-initial_job_id" }, "Start from job (optional)"),
      h("select", { id: "f-initial_job_id", name: "initial_job_id", "aria-describedby": "f-initial_job_id-hint f-initial_job_id-error" },
        h("option", { value: "" }, "None: a fresh adapter"),
        finished.map((j) => h("option", { value: j.id }, `${j.name || j.id} — ${j.base_model}, ${(j.spec.method || {}).type || "sft"}`))),
      h("p", { class: "hint", id: "f-initial_job_id-hint" }, "A succeeded job's adapter to continue: SFT first, then DPO from it."),
      h("p", { class: "field-error", id: "f-initial_job_id-error", hidden: true })),
  ];

  const section = (title, hint, fields) => h("fieldset", { class: "form-section" },
    h("legend", {}, title), hint ? h("p", { class: "section-hint" }, hint) : null,
    h("div", { class: "fields" }, fields.map((f) => specField(f, getPath(defaults, f[0])))));

  const summary = h("div", { id: "form-errors" });
  const submit = h("button", { type: "submit", class: "btn btn-primary", id: "create-job", "aria-describedby": "submit-blocked" }, "Start training");
  const blocked = h("p", { class: "field-error", id: "submit-blocked", hidden: true });
  const check = h("button", { type: "button", class: "btn", id: "run-preflight" }, "Run preflight");
  const preflightBox = h("div", { id: "preflight-result", "aria-live": "polite" });
  const merge = h("input", { type: "checkbox", id: "f-output-merge", name: "output.merge", checked: defaults.output.merge });
  const best = h("input", { type: "checkbox", id: "f-output-use_best_checkpoint", name: "output.use_best_checkpoint",
    checked: Boolean(defaults.output.use_best_checkpoint) });
  const form = h("form", { id: "new-job", novalidate: true },
    summary,
    h("fieldset", { class: "form-section" }, h("legend", {}, "Job"),
      h("p", { class: "section-hint" }, "What to train, and on what."),
      h("div", { class: "fields wide" }, topFields)),
    h("hr", { class: "divider" }),
    section("Method", "dpo trains on a preference dataset (a preferred and a non-preferred answer per prompt).", SPEC_FIELDS.method),
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
          h("p", { class: "field-error", id: "f-output-merge-error", hidden: true })),
        h("div", { class: "field", dataset: { field: "output.use_best_checkpoint" } },
          h("label", { class: "checkbox", for: "f-output-use_best_checkpoint" }, best, "Ship the checkpoint with the best eval loss"),
          h("p", { class: "field-error", id: "f-output-use_best_checkpoint-error", hidden: true })))),
    h("hr", { class: "divider" }),
    section("Eval report", "Made when the job ends: the base and the tuned model answer the same prompts, scored against the references.",
      SPEC_FIELDS.eval),
    h("hr", { class: "divider" }),
    h("fieldset", { class: "form-section", id: "preflight" }, h("legend", {}, "Preflight"),
      h("p", { class: "section-hint" }, "What this job would train on, counted with the base model's own tokenizer and chat template, ",
        "and where it would run. Nothing is created. Run it again after changing the form."),
      h("div", { class: "form-actions" }, check), preflightBox),
    h("div", { class: "form-actions" }, submit, h("a", { class: "btn btn-ghost", href: "#/jobs" }, "Back to jobs"), blocked));
  holder.replaceChildren(h("section", { class: "card" }, form));

  // dpo's settings show only while dpo is picked (an sft job has none).
  const methodType = form.querySelector("[name='method.type']");
  const showMethodFields = () => {
    for (const name of ["method.beta", "method.loss"]) {
      form.querySelector(`[data-field='${name}']`).hidden = methodType.value !== "dpo";
    }
  };
  methodType.addEventListener("change", showMethodFields);
  showMethodFields();

  // The learning rate's default is the method's (DPO's is 40x below SFT's): a rate still at the old
  // method's default follows the switch; one the user typed stays.
  const learningRate = form.querySelector("[name='training.learning_rate']");
  let shownMethod = methodType.value;
  methodType.addEventListener("change", () => {
    if (Number(learningRate.value) === defaults.learning_rates[shownMethod]) {
      learningRate.value = defaults.learning_rates[methodType.value];
    }
    shownMethod = methodType.value;
  });

  // A job continues an adapter on the base it was trained on (any other is a 422): picking the job picks its base.
  const initialJob = form.querySelector("[name='initial_job_id']");
  initialJob.addEventListener("change", () => {
    const started = finished.find((j) => j.id === initialJob.value);
    if (started) form.querySelector("[name='base_model']").value = started.base_model;
  });

  /** Submit is blocked only by a preflight that refused this very form; any change may have fixed it. */
  function blockSubmit(reason) {
    submit.disabled = Boolean(reason);
    blocked.hidden = !reason;
    blocked.textContent = reason ? `Cannot start: ${reason}` : "";
  }

  // A change makes the shown preflight stale: it says so (no request per keystroke; the button re-runs it),
  // and lifts its block, since POST /jobs runs the same checks and answers 422 with the reason anyway.
  const markStale = () => {
    if (!preflightBox.firstChild || preflightBox.classList.contains("stale")) return;
    preflightBox.classList.add("stale");
    preflightBox.prepend(h("p", { class: "alert alert-info stale-note" }, "The form changed since this preflight: run it again to check the change."));
    blockSubmit(null);
  };
  form.addEventListener("input", markStale);
  form.addEventListener("change", markStale);

  check.addEventListener("click", async () => {
    clearErrors(form, summary);
    check.disabled = true;
    check.textContent = "Checking…";
    try {
      const answer = await api("/jobs/preflight", { method: "POST", json: { ...formBody(), examples: 1 }, signal: ctx.signal });
      preflightBox.classList.remove("stale");
      preflightBox.replaceChildren(preflightPanel(answer));
      blockSubmit(answer.can_learn === false ? answer.report.refusals[0] : null);
    } catch (err) {
      if (!ctx.signal.aborted) {
        preflightBox.replaceChildren();
        showErrors(form, summary, err, "The preflight could not run. ");
      }
    } finally {
      check.disabled = false;
      check.textContent = "Run preflight";
    }
  });

  /** The form as the body of POST /jobs (and of POST /jobs/preflight). */
  function formBody() {
    const body = { lora: {}, training: {}, quantization: {}, eval: {}, output: { merge: merge.checked, use_best_checkpoint: best.checked } };
    for (const control of form.querySelectorAll("input[name], select[name]")) {
      if (control.type === "checkbox") continue;
      const text = control.value.trim();
      // Blank: the engine's default (or, for the validation dataset and the name, none).
      if (text === "" && control.name !== "dataset_id" && control.name !== "base_model") continue;
      setPath(body, control.name, control.dataset.type ? parseValue(text, control.dataset.type) : text);
    }
    body.method = methodBody(body.method);
    return body;
  }

  const keyFor = idempotencyKeys(); // the same form sent again makes no second job
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    clearErrors(form, summary);
    const body = formBody();
    submit.disabled = true;
    submit.textContent = "Creating…";
    try {
      const headers = { "Idempotency-Key": keyFor(JSON.stringify(body)) };
      const job = await api("/jobs", { method: "POST", json: body, headers, signal: ctx.signal });
      location.hash = `#/jobs/${job.id}`;
    } catch (err) {
      if (!ctx.signal.aborted) showErrors(form, summary, err);
    } finally {
      submit.disabled = false;
      submit.textContent = "Start training";
    }
  });
}
