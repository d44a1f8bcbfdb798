// A job's logged points, one a step, as the job page holds them: a page left open on a long job (hours of
// polling, a step logged every second) kept every point it was sent for its whole life, though the chart
// draws at most 2,000 of a series (chart.js). Up to LIMIT points it keeps them all, as before; past that
// the newest TAIL stay as they are (the latest loss, the rewards table's rows) and the older ones are
// thinned evenly by step, one per bucket of `bucket` steps (the first of each, so the first point stays),
// the buckets doubling as the job goes on: never more than LIMIT points, however long the job.

const LIMIT = 4000; // twice what the chart draws: a short job's chart is what it was
const TAIL = 1000;

export class PointSeries {
  constructor(limit = LIMIT, tail = TAIL) {
    this.limit = limit;
    this.tail = tail;
    this.byStep = new Map();
    this.bucket = 1; // steps per point kept of the older ones, once thinned
  }

  /** The point of `step`; one sent again (the stream replays the job on every reconnect) replaces it. */
  set(step, point) {
    this.byStep.set(step, point);
    if (this.byStep.size > this.limit) this.thin();
  }

  values() { return this.byStep.values(); }

  get size() { return this.byStep.size; }

  thin() {
    const steps = [...this.byStep.keys()].sort((a, b) => a - b);
    const older = steps.slice(0, steps.length - this.tail);
    const buckets = (width) => new Set(older.map((step) => Math.floor(step / width))).size;
    // Room for the older ones until the next thinning: half of what the tail leaves.
    while (buckets(this.bucket) > (this.limit - this.tail) / 2) this.bucket *= 2;
    let previous = null;
    for (const step of older) {
      const bucket = Math.floor(step / this.bucket);
      if (bucket === previous) this.byStep.delete(step);
      previous = bucket;
    }
  }
}
