// The loss curve: an inline SVG drawn from the job's train and eval points, redrawn whole on
// every update, with no charting library. A long run logs hundreds of thousands of points: the
// scales are found with loops (Math.max(...points) throws past ~125k arguments), and each series is
// drawn from at most DRAWN points.

import { svg } from "./dom.js";
import { fmt } from "./format.js";

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

const DRAWN = 2000; // points of a series drawn: a path of a million is no clearer, and far slower

/** At most `limit` of a series' points, evenly spread, its first and last kept. */
function thinned(points, limit = DRAWN) {
  if (points.length <= limit) return points;
  const stride = (points.length - 1) / (limit - 1);
  return Array.from({ length: limit }, (_, i) => points[Math.round(i * stride)]);
}

/** [lowest, highest] of the values, by a loop: spreading them into Math.min's arguments overflows the stack. */
function extent(values) {
  let low = Infinity, high = -Infinity;
  for (const v of values) {
    if (v < low) low = v;
    if (v > high) high = v;
  }
  return [low, high];
}

/** The whole chart for the job page, from the points so far; totalSteps sets the x axis before they arrive. */
export function lossChart(trainPoints, evalPoints, totalSteps) {
  const W = 720, H = 380;
  const m = { left: 58, right: 18, top: 14, bottom: 42 };
  const train = trainPoints.filter((p) => p.train_loss !== null).sort((a, b) => a.step - b.step);
  const evals = evalPoints.filter((p) => p.eval_loss !== null).sort((a, b) => a.step - b.step);
  const losses = [...train.map((p) => p.train_loss), ...evals.map((p) => p.eval_loss)];

  const maxStep = Math.max(totalSteps || 0, train.at(-1)?.step ?? 0, evals.at(-1)?.step ?? 0, 1); // sorted by step
  const xTicks = niceTicks(0, maxStep, 6);
  const xMax = xTicks.ticks[xTicks.ticks.length - 1];
  const [lossLow, lossHigh] = losses.length ? extent(losses) : [0, 1];
  const pad = (lossHigh - lossLow) * 0.08 || lossHigh * 0.1 || 0.5;
  const yTicks = niceTicks(Math.max(0, lossLow - pad), lossHigh + pad, 5);
  const yMin = yTicks.ticks[0], yMax = yTicks.ticks[yTicks.ticks.length - 1];

  const x = (step) => m.left + (step / xMax) * (W - m.left - m.right);
  const y = (loss) => H - m.bottom - ((loss - yMin) / (yMax - yMin)) * (H - m.top - m.bottom);
  const path = (points, key) => thinned(points).map((p, i) => `${i ? "L" : "M"}${x(p.step).toFixed(1)},${y(p[key]).toFixed(1)}`).join(" ");

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
    thinned(evals, DRAWN / 10).map((p) => svg("circle", { class: "dot-eval", cx: x(p.step), cy: y(p.eval_loss), r: 4 },
      svg("title", {}, `eval loss ${fmt.loss(p.eval_loss)} at step ${p.step}`))),
    losses.length ? null : svg("text", { class: "empty-label", x: (m.left + W - m.right) / 2, y: (m.top + H - m.bottom) / 2, "text-anchor": "middle" },
      "Waiting for the first logged step…"));
  return chart;
}
