// What the new-job form shows when POST /jobs (or its preflight) refuses the spec: each 422 detail
// next to the field it names, the rest in a summary at the top.

import { h } from "../dom.js";

export function clearErrors(form, summary) {
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
export function showErrors(form, summary, err, headline = "The job was not created. ") {
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
    h("p", {}, h("strong", {}, headline),
      placed ? "Fix the fields marked below." : err.details && err.details.length ? "" : err.message),
    unplaced.length ? h("ul", {}, unplaced.map((text) => h("li", {}, text))) : null));
  if (first) first.focus();
  else summary.scrollIntoView({ block: "start" });
}
