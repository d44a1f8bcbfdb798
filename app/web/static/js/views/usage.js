// Usage: the team's GPU time this month against its quota (GET /quota), its jobs running and queued
// against their limits, its storage, and the month by day and by job (GET /usage), refreshed on a timer.

import { api } from "../api.js";
import { h, setTitle, svg } from "../dom.js";
import { fmt } from "../format.js";
import { REFRESH_MS } from "../live-list.js";
import { errorAlert, statusBadge } from "../widgets.js";

const GIB = 2 ** 30;
const TOP_JOBS = 10; // the month's jobs with the most GPU time; `qlora usage` or GET /usage list them all

export function viewUsage(main, ctx) {
  setTitle("Usage");
  const quotaCard = h("section", { class: "card", id: "quota-card", "aria-labelledby": "quota-title" },
    h("div", { class: "card-head" }, h("h2", { id: "quota-title" }, "Quota")), h("p", { class: "empty" }, "Loading…"));
  const daysCard = h("section", { class: "card", id: "usage-by-day", "aria-labelledby": "days-title" });
  const jobsCard = h("section", { class: "card flush", id: "usage-by-job", "aria-labelledby": "jobs-title" });
  const errorBox = h("div");
  main.append(
    h("div", { class: "page-head" }, h("div", {}, h("h1", {}, "Usage"),
      h("p", { class: "subtitle" }, "Your team this month (UTC): GPU time counts from a job's start on a GPU to its end, pauses excluded."))),
    errorBox, quotaCard, h("div", { class: "grid grid-even" }, daysCard, jobsCard));

  async function refresh() {
    // /quota and /usage are asked together; the page shows what it got, and the error of what it did not.
    const [quota, usage] = await Promise.allSettled([api("/quota", { signal: ctx.signal }), api("/usage", { signal: ctx.signal })]);
    if (ctx.signal.aborted) return;
    const failed = [quota, usage].filter((r) => r.status === "rejected").map((r) => errorAlert(r.reason));
    errorBox.replaceChildren(...failed);
    const team = usage.status === "fulfilled" ? usage.value.teams[0] : null;
    renderQuota(quotaCard, quota.status === "fulfilled" ? quota.value : null, team);
    if (usage.status === "fulfilled") {
      renderDays(daysCard, usage.value, team);
      renderJobs(jobsCard, team);
    }
    return failed.length === 0; // ctx.every asks less often while it fails
  }
  refresh();
  ctx.every(REFRESH_MS * 5, refresh);
}

/** One limit: what is used, of how much, as a bar that turns amber near the limit and red at it. */
function meter(id, label, used, limit, show, showLimit = show) {
  const fraction = limit === null || limit === undefined ? null : limit > 0 ? used / limit : used > 0 ? Infinity : 0;
  const level = fraction === null ? "" : fraction >= 1 ? "over" : fraction >= 0.8 ? "high" : "";
  const text = fraction === null ? `${show(used)} · no limit` : `${show(used)} of ${showLimit(limit)}`;
  return h("div", { class: "meter", id },
    h("div", { class: "meter-label" }, label), h("div", { class: "meter-value" }, text),
    h("div", {
      class: "meter-track", role: "meter", "aria-label": label, "aria-valuetext": text,
      "aria-valuemin": "0", "aria-valuemax": String(limit ?? used), "aria-valuenow": String(used),
    }, h("div", { class: `meter-fill ${level}`, style: `width: ${fraction === null ? 0 : Math.min(100, fraction * 100).toFixed(1)}%` })));
}

function renderQuota(card, quota, team) {
  const head = h("div", { class: "card-head" }, h("h2", { id: "quota-title" }, "Quota"),
    quota ? h("span", { class: "meta" }, `team ${quota.team} · fair-share weight ${quota.quota.weight}`) : null);
  if (!quota && !team) {
    card.replaceChildren(head, h("p", { class: "empty" }, "Not available right now."));
    return;
  }
  const q = quota ? quota.quota : {};
  const use = quota ? quota.use : {};
  const hours = quota ? use.gpu_hours_this_month : team.gpu_hours;
  const stored = quota ? use.storage_bytes : team.storage_bytes;
  card.replaceChildren(...[head,
    h("div", { class: "meters" },
      meter("meter-gpu-hours", "GPU-hours this month", hours, q.gpu_hours_per_month ?? null, (x) => `${fmt.hours(x)} h`,
        (x) => `${Number(x).toLocaleString()} h`),
      quota ? meter("meter-running", "Jobs running", use.running, q.max_running ?? null, fmt.int) : null,
      quota ? meter("meter-queued", "Jobs queued", use.queued, q.max_queued ?? null, fmt.int) : null,
      meter("meter-storage", "Storage", stored, q.storage_gib === null || q.storage_gib === undefined ? null : q.storage_gib * GIB, fmt.ibytes)),
    quota ? null : h("p", { class: "hint" }, "The team's limits could not be read; this shows its use only.")].filter(Boolean));
}

/** Every UTC day of the month the window starts in, as bars of GPU-hours (none yet after today); a
 * day's tokens in its bar's tooltip. */
function renderDays(card, usage, team) {
  const byDay = new Map(team.by_day.map((d) => [d.date, d]));
  const days = [];
  const start = new Date(usage.from);
  for (let d = start; d.getUTCMonth() === start.getUTCMonth(); d = new Date(d.getTime() + 86_400_000)) {
    const key = d.toISOString().slice(0, 10);
    days.push(byDay.get(key) || { date: key, gpu_seconds: 0, trained_tokens: 0 });
  }
  card.replaceChildren(
    h("div", { class: "card-head" }, h("h2", { id: "days-title" }, "By day"),
      h("span", { class: "meta" }, `${fmt.hours(team.gpu_hours)} GPU-hours · ${fmt.int(team.trained_tokens)} tokens this month`)),
    dayChart(days));
}

function dayChart(days) {
  const W = 540, H = 240; // about the card's width on a laptop: the labels print near their font size
  const m = { left: 44, right: 10, top: 12, bottom: 28 };
  const hours = days.map((d) => d.gpu_seconds / 3600);
  const top = niceMax(Math.max(0, ...hours));
  const slot = (W - m.left - m.right) / Math.max(days.length, 1);
  const y = (v) => H - m.bottom - (v / top) * (H - m.top - m.bottom);
  const ticks = [0, top / 2, top];
  const busiest = days.reduce((best, d) => (d.gpu_seconds > (best ? best.gpu_seconds : 0) ? d : best), null);
  return svg("svg", { class: "chart day-chart", viewBox: `0 0 ${W} ${H}`, role: "img", "aria-labelledby": "days-svg-title days-svg-desc" },
    svg("title", { id: "days-svg-title" }, "GPU-hours by day"),
    svg("desc", { id: "days-svg-desc" }, busiest
      ? `${days.length} days; the busiest, ${busiest.date}, used ${fmt.hours(busiest.gpu_seconds / 3600)} GPU-hours.`
      : `${days.length} days with no GPU time.`),
    ticks.map((v) => svg("g", {},
      svg("line", { class: "grid-line", x1: m.left, x2: W - m.right, y1: y(v), y2: y(v) }),
      svg("text", { class: "tick-label", x: m.left - 6, y: y(v) + 4, "text-anchor": "end" }, Number(v).toLocaleString()))),
    days.map((d, i) => svg("rect", {
      class: "day-bar", "data-date": d.date, x: (m.left + i * slot + slot * 0.15).toFixed(1), width: (slot * 0.7).toFixed(1),
      y: y(d.gpu_seconds / 3600).toFixed(1), height: (H - m.bottom - y(d.gpu_seconds / 3600)).toFixed(1),
    }, svg("title", {}, `${d.date}: ${fmt.hours(d.gpu_seconds / 3600)} GPU-hours, ${fmt.int(d.trained_tokens)} tokens`))),
    days.map((d, i) => (i % 7 === 0 // a label a week: the 1st, 8th, 15th, 22nd, 29th
      ? svg("text", { class: "tick-label", x: (m.left + (i + 0.5) * slot).toFixed(1), y: H - m.bottom + 16, "text-anchor": "middle" }, d.date.slice(5))
      : null)),
    svg("line", { class: "axis-line", x1: m.left, x2: W - m.right, y1: H - m.bottom, y2: H - m.bottom }),
    svg("text", { class: "axis-title", x: 12, y: (m.top + H - m.bottom) / 2, "text-anchor": "middle", transform: `rotate(-90 12 ${(m.top + H - m.bottom) / 2})` }, "GPU-hours"));
}

/** A round top for the y axis: 1, 2 or 5 times a power of ten, at least the largest value. */
function niceMax(value) {
  if (!(value > 0)) return 1;
  const power = 10 ** Math.floor(Math.log10(value));
  return [1, 2, 5, 10].map((k) => k * power).find((v) => v >= value);
}

function renderJobs(card, team) {
  const head = h("div", { class: "card-head" }, h("h2", { id: "jobs-title" }, "By job"),
    h("span", { class: "meta" }, team.jobs > TOP_JOBS ? `the ${TOP_JOBS} with the most GPU time of ${fmt.int(team.jobs)}` : "most GPU time first"));
  if (!team.by_job.length) {
    card.replaceChildren(head, h("p", { class: "empty" }, "No GPU time this month yet."));
    return;
  }
  card.replaceChildren(head, h("div", { class: "table-wrap" }, h("table", { class: "table", id: "usage-jobs-table" },
    h("caption", { class: "sr-only" }, "This month's GPU time by job"),
    h("thead", {}, h("tr", {},
      h("th", { scope: "col" }, "Job"), h("th", { scope: "col" }, "Status"),
      h("th", { scope: "col", class: "num" }, "GPU-hours"), h("th", { scope: "col", class: "num" }, "Tokens"))),
    h("tbody", {}, team.by_job.slice(0, TOP_JOBS).map((j) => h("tr", { dataset: { jobId: j.job_id } },
      h("td", {}, h("a", { class: "row-link", href: `#/jobs/${j.job_id}` }, j.name || "Untitled job"),
        h("span", { class: "sub" }, `${j.attempts} attempt${j.attempts === 1 ? "" : "s"}`)),
      h("td", {}, statusBadge(j.status)),
      h("td", { class: "num" }, fmt.hours(j.gpu_seconds / 3600)),
      h("td", { class: "num" }, fmt.int(j.trained_tokens))))))));
}
