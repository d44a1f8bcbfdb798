// Sign in: paste an API key, check it with one cheap call, keep it in this browser.

import { ApiError } from "../api.js";
import { h, setTitle } from "../dom.js";
import { saveKey, takeSignInNotice } from "../session.js";
import { errorAlert } from "../widgets.js";

export function viewSignIn(main) {
  setTitle("Sign in");
  const notice = takeSignInNotice();
  const input = h("input", { type: "password", id: "api-key", name: "api-key", autocomplete: "off", spellcheck: "false", required: true, "aria-describedby": "api-key-hint" });
  const message = h("div", { role: "status" });
  if (notice) message.append(h("div", { class: "alert alert-info" }, notice));
  const button = h("button", { type: "submit", class: "btn btn-primary" }, "Sign in");
  const form = h("form", { novalidate: true },
    h("div", { class: "field" },
      h("label", { for: "api-key" }, "API key"),
      input,
      h("p", { class: "hint", id: "api-key-hint" }, "Kept in this browser only. An admin makes one with ", h("code", {}, "qlora admin create-key TEAM"),
        "; ", h("code", {}, "qlora serve"), " with nothing configured saved its first one in ", h("code", {}, "credentials.json"),
        " in its QLORA_HOME (", h("code", {}, "~/.qlora"), "), as it says when it starts.")),
    button);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const key = input.value.trim();
    message.replaceChildren();
    if (!key) {
      message.append(h("div", { class: "alert alert-error" }, "Paste your API key first."));
      return;
    }
    button.disabled = true;
    try {
      // A cheap authenticated call tells whether the key works before it is kept.
      const response = await fetch("/models", { headers: { Authorization: `Bearer ${key}` } });
      if (response.status === 401) {
        const refused = await response.json().catch(() => null);
        message.append(h("div", { class: "alert alert-error", role: "alert" }, refused?.error?.code === "team_disabled"
          ? `${refused.error.message}.` : "This key was not accepted: check it, or ask an admin for a new one."));
        return;
      }
      if (!response.ok) throw new ApiError(response.status, await response.json().catch(() => null));
      saveKey(key);
      location.hash = "#/jobs";
    } catch (err) {
      message.append(errorAlert(err));
    } finally {
      button.disabled = false;
    }
  });
  main.append(h("section", { class: "signin card", "aria-labelledby": "signin-title" },
    h("h1", { id: "signin-title" }, "Sign in"),
    h("p", { class: "lead" }, "Fine-tune open models with QLoRA: upload a dataset, start a job, watch its loss curve and download the adapter."),
    message, form));
  input.focus();
}
