// The new-job form's hyperparameter fields: which there are, how each is drawn, and how its text
// becomes JSON for POST /jobs.

import { h } from "../dom.js";

/**
 * The form's fields. `path` is the field's name in POST /jobs (and in the API's 422 details, so an
 * error lands next to its field); `type` says how the text becomes JSON.
 */
export const SPEC_FIELDS = {
  method: [
    ["method.type", "Method", ["sft", "dpo"], "sft learns the answers of chat or prompt/completion rows; dpo learns to prefer the preferred answer of preference rows."],
    ["method.beta", "DPO beta", "float", "How far from the starting model it may move; 0.1 is the usual."],
    ["method.loss", "DPO loss", ["sigmoid", "ipo"], "sigmoid is the DPO paper's; ipo overfits less on easy pairs."],
  ],
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
    ["training.learning_rate", "Learning rate", "float", "2e-4 suits SFT on 7B–13B models; picking dpo sets DPO's far lower default."],
    ["training.per_device_batch_size", "Batch size per device", "int", "Micro-batch; lower it if memory runs out."],
    ["training.gradient_accumulation_steps", "Gradient accumulation steps", "int", "Effective batch = batch × this."],
    ["training.max_seq_length", "Max sequence length", "int", "Longer rows are truncated."],
    ["training.lr_scheduler", "LR scheduler", ["constant", "cosine", "linear"], "QLoRA used constant."],
    ["training.warmup_ratio", "Warmup ratio", "float", "Share of steps spent warming up."],
    ["training.logging_steps", "Logging steps", "int", "A loss point every this many steps."],
    ["training.eval_steps", "Eval steps", "int", "Used with a validation dataset."],
    ["training.save_steps", "Save steps", "int", "A checkpoint every this many steps."],
    ["training.early_stopping", "Early stopping patience", "int", "Stop after this many evaluations without a better eval loss; blank: off."],
  ],
  eval: [
    ["eval.prompts", "Report prompts", "int", "Validation rows (train rows without a validation set) answered by base and tuned; 0: no report."],
    ["eval.max_new_tokens", "Max new tokens", "int", "Per answer."],
    ["eval.temperature", "Temperature", "float", "0 is greedy: the same answers every time."],
  ],
  quantization: [
    ["quantization.bits", "Quantization bits", ["4", "8", "none"], "4 is QLoRA (NF4); the others are baselines."],
  ],
};

function fieldId(path) { return `f-${path.replace(/[^a-zA-Z0-9_-]/g, "-")}`; }

export function specField([path, label, type, hint], value) {
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

/** "training.learning_rate" in the nested spec: the form's names are paths into the JSON body. */
export function getPath(object, path) { return path.split(".").reduce((o, k) => (o ? o[k] : undefined), object); }
export function setPath(object, path, value) {
  const keys = path.split(".");
  let o = object;
  for (const k of keys.slice(0, -1)) o = o[k] = o[k] || {};
  o[keys.at(-1)] = value;
}

/** Text to JSON: numbers when they parse; otherwise the text as typed, so the API names what is wrong. */
export function parseValue(text, type) {
  if (type === "int" || type === "float") {
    const n = Number(text);
    return text.trim() !== "" && Number.isFinite(n) ? n : text;
  }
  return type === "choice" && /^\d+$/.test(text) ? Number(text) : text; // quantization bits: 4, 8 or "none"
}

/** The method as POST /jobs takes it: sft has no settings, dpo's are sent only for dpo. */
export function methodBody(method) {
  if (!method || method.type !== "dpo") return { type: "sft" };
  return method;
}

