"""The dashboard's page, and the engine's defaults it pre-fills the new-job form with.

The page is plain HTML, CSS and JavaScript under static/, shipped inside the package: no build
step, nothing fetched from the internet. The script is native ES modules (static/js/main.js and
what it imports, views under static/js/views/), served as they are by the /static mount. It signs
in with an API key and calls the API routes with it, like curl would.
"""

from __future__ import annotations

import mimetypes
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

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


# The page acts with the key it keeps (cancel, delete): no other site may frame it and steer clicks on it.
NOT_FRAMED = {"X-Frame-Options": "DENY", "Content-Security-Policy": "frame-ancestors 'none'"}


@router.get("/")
def dashboard():
    return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache", **NOT_FRAMED})


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
