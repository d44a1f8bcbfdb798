// A list that refreshes itself on a timer while its view is open: the jobs table and the datasets
// list both work this way, so they share this one helper.

import { api } from "./api.js";
import { errorAlert } from "./widgets.js";

export const REFRESH_MS = 3000; // the jobs table refreshes this often; the datasets list less often

/**
 * Fetch the page at `path`, draw its rows into `box` with `render`, and again every `ms` until the
 * view is left (ctx.every: while the tab is seen, less often while refreshes fail). A failed refresh
 * shows its error in place of the list; the next good one replaces it. Returns the refresh, for a
 * caller that knows the list just changed (an upload).
 */
export function liveList(ctx, box, path, render, ms) {
  async function refresh() {
    try {
      const page = await api(path, { signal: ctx.signal });
      box.replaceChildren(render(page.data));
      return true;
    } catch (err) {
      if (!ctx.signal.aborted) box.replaceChildren(errorAlert(err));
      return false;
    }
  }
  refresh();
  ctx.every(ms, refresh);
  return refresh;
}
