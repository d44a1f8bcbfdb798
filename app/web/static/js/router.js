// The hash router: #/… picks a view, and leaving a view stops everything it started (fetches,
// timers, its job stream) through the context it was given.

import { h } from "./dom.js";
import { apiKey, hasSignInNotice } from "./session.js";
import { viewDatasets } from "./views/datasets.js";
import { viewJob } from "./views/job.js";
import { viewJobs } from "./views/jobs.js";
import { viewNewJob } from "./views/new-job.js";
import { viewSignIn } from "./views/signin.js";
import { viewUsage } from "./views/usage.js";

// [hash pattern, view, the nav link it marks current]; the pattern's groups are the view's arguments.
const ROUTES = [
  [/^#\/signin$/, viewSignIn, null],
  [/^#\/jobs$/, viewJobs, "jobs"],
  [/^#\/jobs\/new$/, viewNewJob, "new"],
  [/^#\/jobs\/([0-9a-zA-Z_-]+)$/, viewJob, "jobs"],
  [/^#\/datasets$/, viewDatasets, "datasets"],
  [/^#\/usage$/, viewUsage, "usage"],
];

let currentView = null;

const BACKOFF_MAX_MS = 60000; // a refresh that keeps failing is tried again at most this seldom

/** What a view gets: an abort signal for its fetches, and timers that stop when the view is left. */
function viewContext() {
  const controller = new AbortController();
  const signal = controller.signal;
  return {
    signal,
    leave: () => controller.abort(),
    /**
     * `fn` again `ms` after each call of it has ended, while the view is open. Not on a fixed beat: an answer
     * slower than `ms` never had the next request sent beside it. Only while the tab is seen: a team's
     * forgotten tabs each asked for the jobs list every 3 s; one shown again refreshes at once. A call that
     * fails (`fn` resolves to false) is followed by a wait twice the one before, up to BACKOFF_MAX_MS.
     */
    every(ms, fn) {
      let wait = ms, timer = null, running = false;
      const later = (delay) => { clearTimeout(timer); timer = setTimeout(tick, delay); };
      async function tick() {
        if (signal.aborted || running || document.hidden) return; // hidden: visibilitychange starts it again
        running = true;
        try {
          wait = (await fn()) === false ? Math.min(2 * wait, BACKOFF_MAX_MS) : ms;
        } finally {
          running = false;
        }
        if (!signal.aborted) later(wait);
      }
      const seen = () => { if (!document.hidden && !signal.aborted) later(0); };
      document.addEventListener("visibilitychange", seen);
      signal.addEventListener("abort", () => { clearTimeout(timer); document.removeEventListener("visibilitychange", seen); });
      later(ms);
    },
    sleep(ms) {
      return new Promise((resolve) => {
        const timer = setTimeout(resolve, ms);
        signal.addEventListener("abort", () => { clearTimeout(timer); resolve(); });
      });
    },
  };
}

export function route() {
  if (currentView) currentView.leave();
  currentView = null;
  const hash = location.hash || "#/jobs";
  if (!apiKey() && hash !== "#/signin") {
    location.replace("#/signin");
    return;
  }
  if (apiKey() && hash === "#/signin" && !hasSignInNotice()) {
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

/** The top bar: nav and account only when signed in, and the current page's link marked. */
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
