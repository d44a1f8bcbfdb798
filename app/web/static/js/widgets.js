// Small pieces more than one view draws: an error box, a status badge, a progress bar.

import { FINISHED } from "./api.js";
import { h } from "./dom.js";

export function errorAlert(err) {
  return h("div", { class: "alert alert-error", role: "alert" }, h("p", {}, err.message || String(err)));
}

export function statusBadge(status) { return h("span", { class: `badge badge-${status}` }, status); }

export function progressBar(job, large = false) {
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
