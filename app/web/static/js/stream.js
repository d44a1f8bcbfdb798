// A job's live stream (GET /jobs/{id}/stream, Server-Sent Events), read with fetch so it can carry
// the API key.

import { ApiError, FINISHED, refusal } from "./api.js";
import { authHeaders, signOut } from "./session.js";

const RECONNECT_MS = 2000; // a job stream cut before the job finished is reopened after this
const RETRY_MAX_MS = 30000; // refused for now (429, 5xx) or out of reach: retried ever less often, up to this

/**
 * Read a Server-Sent Events body. EventSource cannot send an Authorization header, so the stream is
 * fetched like any request and its `event:` / `data:` lines are parsed here (comments are skipped).
 */
async function* readServerSentEvents(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let event = "message";
  let data = [];
  let id = null; // the message's `id:`, null where it has none
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value;
      let newline;
      while ((newline = buffer.indexOf("\n")) >= 0) {
        let line = buffer.slice(0, newline);
        buffer = buffer.slice(newline + 1);
        if (line.endsWith("\r")) line = line.slice(0, -1);
        if (line === "") {
          if (data.length) yield { event, data: data.join("\n"), id };
          event = "message";
          data = [];
          id = null;
          continue;
        }
        if (line.startsWith(":")) continue; // a keepalive comment
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        let text = colon < 0 ? "" : line.slice(colon + 1);
        if (text.startsWith(" ")) text = text.slice(1);
        if (field === "event") event = text;
        else if (field === "data") data.push(text);
        else if (field === "id") id = text;
      }
    }
  } finally {
    reader.releaseLock();
  }
}

/**
 * Follow a job's stream until the job has finished. The first connection sends the job's history (only
 * the points past `afterStep` when given: a long job's page holds the thinned curve through it); a
 * reconnection sends the id of the last message received as Last-Event-ID, as EventSource does, and the
 * stream goes on right after it. The page also keys what it holds by step and event id.
 *
 * An answer that may change by itself is retried, not final: 429 (the key already holds
 * QLORA_MAX_STREAMS_PER_KEY streams, say another tab's: it frees when that one closes) and 5xx (a proxy
 * while the API restarts), like a connection that failed. `onNotice(text)` says why the page is not live
 * meanwhile, and `onNotice(null)` once it is again. Those answers ended the page's live view for good
 * ("This job cannot be shown"), until a reload.
 */
export async function followJob(jobId, ctx, onMessage, onFatal, onNotice = () => {}, afterStep = null) {
  let wait = RECONNECT_MS;
  let lastEventId = null;
  const url = `/jobs/${jobId}/stream` + (afterStep === null ? "" : `?after_step=${afterStep}`);
  while (!ctx.signal.aborted) {
    let finished = false;
    try {
      const resume = lastEventId === null ? {} : { "Last-Event-ID": lastEventId };
      const response = await fetch(url, {
        headers: authHeaders({ Accept: "text/event-stream", ...resume }), signal: ctx.signal, cache: "no-store",
      });
      if (response.status === 401) return signOut(refusal(await response.json().catch(() => null)));
      if (response.status === 429 || response.status >= 500) {
        const error = new ApiError(response.status, await response.json().catch(() => null));
        onNotice(`Live updates paused: ${error.message}. Trying again in ${Math.round(wait / 1000)} s.`);
      } else if (!response.ok) {
        return onFatal(new ApiError(response.status, await response.json().catch(() => null)));
      } else {
        let live = false;
        for await (const message of readServerSentEvents(response.body)) {
          if (!live) { live = true; wait = RECONNECT_MS; onNotice(null); }
          if (message.id !== null) lastEventId = message.id;
          const payload = JSON.parse(message.data);
          onMessage(message.event, payload);
          if (message.event === "job" && FINISHED.includes(payload.status)) finished = true;
        }
      }
    } catch (err) {
      if (ctx.signal.aborted) return;
      onNotice(`Live updates paused: the API did not answer. Trying again in ${Math.round(wait / 1000)} s.`);
    }
    if (finished) return;
    await ctx.sleep(wait);
    wait = Math.min(2 * wait, RETRY_MAX_MS);
  }
}
