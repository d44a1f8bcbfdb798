// A job's events, as the job page holds them: the page kept every event it was sent, by id, for as long as it
// stayed open (a job that saves every step has as many events as steps, and the stream replays them all on every
// reconnect), though it shows only the newest LIMIT. It keeps those alone, and counts the older ones it let go
// (and their warnings), so the list can say how many there were and that GET /jobs/{id}/events has them.

const LIMIT = 200; // what the events list shows

export class EventLog {
  constructor(limit = LIMIT) {
    this.limit = limit;
    this.byId = new Map(); // oldest first: the stream sends a job's events in id order
    this.older = 0; // events let go, older than every one kept
    this.olderWarnings = 0;
  }

  /** The event `e`; one sent again (a reconnect replays the job) replaces it, or is already counted as older. */
  add(e) {
    if (!this.byId.has(e.id) && this.byId.size >= this.limit && e.id < this.byId.keys().next().value) return;
    this.byId.set(e.id, e);
    if (this.byId.size <= this.limit) return;
    const [oldest, dropped] = this.byId.entries().next().value;
    this.byId.delete(oldest);
    this.older += 1;
    if (dropped.level === "warning") this.olderWarnings += 1;
  }

  /** The events kept, newest first. */
  newestFirst() { return [...this.byId.values()].sort((a, b) => b.id - a.id); }

  /** Warnings among every event seen, those let go included. */
  get warnings() {
    let kept = 0;
    for (const e of this.byId.values()) if (e.level === "warning") kept += 1;
    return kept + this.olderWarnings;
  }

  get size() { return this.byId.size; }
}
