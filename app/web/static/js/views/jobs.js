// The jobs list: the team's jobs, newest first, refreshed on a timer.

import { h, setTitle } from "../dom.js";
import { fmt } from "../format.js";
import { liveList, REFRESH_MS } from "../live-list.js";
import { progressBar, statusBadge } from "../widgets.js";

export function viewJobs(main, ctx) {
  setTitle("Jobs");
  const body = h("div", { class: "table-wrap" }, h("p", { class: "empty" }, "Loading jobs…"));
  main.append(
    h("div", { class: "page-head" },
      h("div", {}, h("h1", {}, "Jobs"), h("p", { class: "subtitle" }, "Newest first; this list refreshes by itself.")),
      h("a", { class: "btn btn-primary", href: "#/jobs/new" }, "New job")),
    h("section", { class: "card flush", "aria-label": "Jobs" }, body));
  liveList(ctx, body, "/jobs?limit=100", jobsTable, REFRESH_MS);
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
