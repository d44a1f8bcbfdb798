// The API client: every call carries the key, a 401 anywhere signs the page out, and an error
// answer becomes an ApiError that keeps the API's message and per-field details.

import { authHeaders, signOut } from "./session.js";

/** A job in one of these states never changes again: its stream ends, its artifacts are final. */
export const FINISHED = ["succeeded", "failed", "cancelled"];

export class ApiError extends Error {
  constructor(status, body) {
    const error = (body && body.error) || {};
    super(error.message || `the server answered ${status}`);
    this.status = status;
    this.code = error.code;
    this.details = error.details || [];
  }
}

/**
 * Why a 401 signed the page out: the server's own words where the key is fine but its team was disabled
 * by an admin (signing in again would not help), else the usual guess.
 */
export function refusal(data) {
  if (data?.error?.code === "team_disabled") return `${data.error.message}.`;
  return "Your API key was not accepted (revoked or mistyped). Sign in again.";
}

/** Call the API with the key. A 401 anywhere means the key is gone or revoked: back to sign-in. */
export async function api(path, { method = "GET", json, body, signal, headers: extra = {} } = {}) {
  const headers = authHeaders(extra);
  if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  }
  const response = await fetch(path, { method, headers, body, signal });
  if (response.status === 401) {
    const refused = await response.json().catch(() => null);
    signOut(refusal(refused));
    throw new ApiError(401, refused);
  }
  if (response.status === 204) return null;
  const data = await response.json().catch(() => null);
  if (!response.ok) throw new ApiError(response.status, data);
  return data;
}

/**
 * Idempotency-Keys for one form's creations (POST /jobs, POST /datasets): `keyFor(what)` is the key of the request
 * that `what` (the body as text, or the file's name, size and date) describes, the same as long as `what` is. A
 * creation whose answer was lost (a proxy's 504 after a minute of preflight, a dropped connection) made its job or
 * dataset all the same, and sent again without a key it would make a second (hours of GPU): with the same key the
 * API answers with what the first made. A changed form is another request, with a key of its own.
 */
export function idempotencyKeys() {
  let last = null;
  return (what) => {
    if (last === null || last.what !== what) last = { what, key: randomKey() };
    return last.key;
  };
}

function randomKey() {
  // Not crypto.randomUUID(): a page served over plain HTTP from another host than localhost has none.
  return Array.from(crypto.getRandomValues(new Uint8Array(16)), (b) => b.toString(16).padStart(2, "0")).join("");
}
