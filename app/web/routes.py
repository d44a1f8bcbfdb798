"""The dashboard's page, and the engine's defaults it pre-fills the new-job form with.

The page is plain HTML, CSS and JavaScript under static/, shipped inside the package: no build
step, nothing fetched from the internet. The script is native ES modules (static/js/main.js and
what it imports, views under static/js/views/), served as they are by the /static mount. It signs
in with an API key and calls the API routes with it, like curl would.
"""

from __future__ import annotations

import mimetypes
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import Headers
from starlette.responses import Response
from starlette.staticfiles import NotModifiedResponse
from starlette.types import Scope

from app.ranges import RangedFileResponse
from worker.training.spec import (
    LEARNING_RATES,
    DpoMethod,
    EvalSpec,
    LoraSpec,
    OutputSpec,
    QuantizationSpec,
    SftMethod,
    TrainingSpec,
)

STATIC_DIR = Path(__file__).parent / "static"

# Browsers refuse an ES module served with a non-JavaScript type, and the /static mount takes its
# types from the mimetypes table, which differs by host: Python 3.11's own says
# application/javascript, /etc/mime.types or Windows' registry may say anything (text/plain
# included). So the standard type for the dashboard's modules is set here, the same everywhere.
mimetypes.add_type("text/javascript", ".js")

router = APIRouter(include_in_schema=False)


# The page acts with the key it keeps (cancel, delete): no other site may frame it and steer clicks on
# it, and it runs only its own modules, talks only to this API, and loads nothing from elsewhere (its
# styles set widths inline: 'unsafe-inline' for style only). Navigating to a presigned download URL is
# not a fetch: connect-src does not bar it.
PAGE_POLICY = {
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
                               "img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
                               "frame-ancestors 'none'",
}


@router.api_route("/", methods=["GET", "HEAD"])  # a health check or uptime probe may ask with HEAD (405 before)
def dashboard():
    return RangedFileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache", **PAGE_POLICY})


class DashboardFiles(StaticFiles):
    """The /static mount, with the page's policy on every file: index.html is one of them, and at
    /static/index.html it is the whole dashboard, key and all, which another site could otherwise frame and
    where script injected into it would run."""

    async def get_response(self, path: str, scope: Scope):
        response = await super().get_response(path, scope)
        response.headers.update(PAGE_POLICY)
        return response

    def file_response(self, full_path, stat_result, scope: Scope, status_code: int = 200) -> Response:
        """StaticFiles' own, with a Range read as a download's (app.ranges.RangedFileResponse)."""
        response = RangedFileResponse(full_path, status_code=status_code, stat_result=stat_result)
        if self.is_not_modified(response.headers, Headers(scope=scope)):
            return NotModifiedResponse(response.headers)
        return response


@router.get("/web/spec-defaults")
def spec_defaults():
    """The engine's defaults, so the new-job form is pre-filled from spec.py and cannot drift from it."""
    defaults = {section: {name: field.default for name, field in model.model_fields.items()}
                for section, model in (("quantization", QuantizationSpec), ("lora", LoraSpec),
                                       ("training", TrainingSpec), ("output", OutputSpec), ("eval", EvalSpec))}
    # The method: sft by default, with dpo's settings pre-filled for when dpo is picked (sent only then).
    defaults["method"] = {"type": SftMethod.model_fields["type"].default,
                          **{name: field.default for name, field in DpoMethod.model_fields.items() if name != "type"}}
    defaults["learning_rates"] = LEARNING_RATES  # training.learning_rate's default depends on the method
    return defaults


# /docs and /redoc: FastAPI's pages, with their CDN files pinned to one release and checked by the browser
# against their hashes (Subresource Integrity). The pages share their origin with the dashboard and the
# API key it keeps: a file changed on the CDN, or a new release under a floating "@5", must not run there.
# (The hashes are of the files in the npm packages, which the CDN serves as they are.)
SWAGGER_UI = "https://cdn.jsdelivr.net/npm/swagger-ui-dist@5.35.0"
REDOC = "https://cdn.jsdelivr.net/npm/redoc@2.5.4/bundles/redoc.standalone.js"
PINNED = {
    f"{SWAGGER_UI}/swagger-ui-bundle.js": "sha384-gjRm0bEPMeTmMh5jT2cHccIwCUZSTd8YC+j0d0sXw0MdGEfScduGpSyF3ZSSLkX9",
    f"{SWAGGER_UI}/swagger-ui.css": "sha384-WlYgdmXYOOBWL5apwjDEZwN+U3HmXSSu5R6V5aGxEcf7z+KuRNwBhoxKVN1i3D5I",
    REDOC: "sha384-w447zOpYfw/1Tv/5AK9NfHTlQIqE3RVR6KY62jCyy9zNDgO64cMwGGP1Fj0zJVf5",
}


def _pinned(page: HTMLResponse) -> HTMLResponse:
    html = bytes(page.body).decode()
    for url, digest in PINNED.items():
        for attribute in ("src", "href"):
            html = html.replace(f'{attribute}="{url}"', f'{attribute}="{url}" integrity="{digest}" crossorigin="anonymous"')
    return HTMLResponse(html, headers={"X-Frame-Options": "DENY"})


@router.get("/docs")
def swagger_ui(request: Request):
    return _pinned(get_swagger_ui_html(openapi_url=request.app.openapi_url, title="qlora-service API",
                                       swagger_js_url=f"{SWAGGER_UI}/swagger-ui-bundle.js",
                                       swagger_css_url=f"{SWAGGER_UI}/swagger-ui.css"))


@router.get("/redoc")
def redoc(request: Request):
    return _pinned(get_redoc_html(openapi_url=request.app.openapi_url, title="qlora-service API", redoc_js_url=REDOC))
