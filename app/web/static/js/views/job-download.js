// Downloading a job's adapter or merged model from its page.

import { api } from "../api.js";
import { h } from "../dom.js";
import { errorAlert } from "../widgets.js";

/**
 * A download the browser saves to disk, straight from the server to the file, never through the tab's
 * memory. The page's key cannot travel with a navigation, so it asks the API with its key for a link
 * that needs none, and navigates to it: on S3 the presigned URL (the store answers with
 * Content-Disposition: attachment), on local storage the API's own signed route, which does the same.
 * (Local archives were once fetched with the key and saved from a blob: a 16 GB merged model took the
 * tab down.)
 */
export async function downloadArtifact(jobId, kind, button, header) {
  button.disabled = true;
  try {
    const link = await api(`/jobs/${jobId}/artifacts/${kind}/link`);
    saveFrom(link.url, link.filename);
  } catch (err) {
    header.append(errorAlert(err));
  } finally {
    button.disabled = false;
  }
}

function saveFrom(url, filename) {
  const a = h("a", { href: url, download: filename, hidden: true });
  document.body.append(a);
  a.click();
  a.remove();
}
