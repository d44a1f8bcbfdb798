// Downloading a job's adapter or merged model from its page, with the key.

import { api, ApiError } from "../api.js";
import { h } from "../dom.js";
import { authHeaders } from "../session.js";
import { errorAlert } from "../widgets.js";

/**
 * A download the browser saves to disk. On S3 the API's download route answers 307 to a presigned
 * URL; a page cannot follow that with its key as a download (fetch() would need CORS on the store and
 * would hold the archive in memory), so it asks for the presigned link with its key and navigates to
 * it: the store answers with Content-Disposition: attachment. Local storage has no link: then the
 * page fetches the download route itself (same origin, with the key) and saves the body.
 */
export async function downloadArtifact(jobId, kind, button, header) {
  button.disabled = true;
  try {
    const link = await api(`/jobs/${jobId}/artifacts/${kind}/link`);
    if (link.url) {
      saveFrom(link.url, link.filename);
    } else {
      const response = await fetch(`/jobs/${jobId}/artifacts/${kind}`, { headers: authHeaders() });
      if (!response.ok) throw new ApiError(response.status, await response.json().catch(() => null));
      const blobUrl = URL.createObjectURL(await response.blob());
      saveFrom(blobUrl, link.filename);
      setTimeout(() => URL.revokeObjectURL(blobUrl), 60000);
    }
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
