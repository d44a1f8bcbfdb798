// qlora-service dashboard: plain JavaScript as native ES modules, no build step, no library,
// nothing from the internet. It is a client of the API like curl: every request carries the API
// key as a Bearer token. This module only starts the page; the views are under views/.

import { route } from "./router.js";
import { onSignOutInPlace, signOut } from "./session.js";

onSignOutInPlace(route);
document.getElementById("sign-out").addEventListener("click", () => signOut("Signed out."));
document.getElementById("skip-link").addEventListener("click", (event) => {
  event.preventDefault();
  document.getElementById("view").focus();
});
window.addEventListener("hashchange", route);
route();
