// The API key this browser signs in with. It lives in localStorage only: the page sends it as a
// Bearer token on every request, like curl would, and forgets it on sign-out or on a 401.

const KEY_STORAGE = "qlora.apiKey";

export function apiKey() { return localStorage.getItem(KEY_STORAGE); }
export function saveKey(key) { localStorage.setItem(KEY_STORAGE, key); }
export function authHeaders(extra = {}) { return { Authorization: `Bearer ${apiKey()}`, ...extra }; }

// Why the user landed on the sign-in page (signed out, key refused); the sign-in view shows it once.
let signInNotice = null;
export function hasSignInNotice() { return Boolean(signInNotice); }
export function takeSignInNotice() {
  const notice = signInNotice;
  signInNotice = null;
  return notice;
}

// Signing out while already on #/signin changes no hash, so the router hands in its redraw here
// (set by main.js); the session module stays free of the router and the views.
let rerender = () => {};
export function onSignOutInPlace(fn) { rerender = fn; }

export function signOut(notice) {
  localStorage.removeItem(KEY_STORAGE);
  signInNotice = notice || null;
  if (location.hash !== "#/signin") location.hash = "#/signin";
  else rerender();
}
