"""The prefixes /v1 puts before our ids, as OpenAI's objects have them: `file-<dataset id>`,
`ftjob-<job id>`. A module of its own, importing nothing, so the `qlora` client reads them without
loading the translation (tables, services): it takes an id as the openai SDK printed it, as the native
routes do (app.deps.JobId, DatasetId)."""

FILE, JOB, EVENT, CHECKPOINT = "file-", "ftjob-", "ftevent-", "ftckpt-"
# A succeeded job's result file (its metrics as CSV, OpenAI's step_metrics.csv): `file-results-<job id>`, made from
# the job when read, never a dataset (a dataset's id is hex, so no dataset's file id starts so).
RESULTS = FILE + "results-"


def without_prefix(value: str, prefix: str) -> str | None:
    """Our id in a /v1 id (`value` with `prefix`, and something after it), or None where it is not one."""
    return value[len(prefix):] if value.startswith(prefix) and len(value) > len(prefix) else None


def native(value: str, prefix: str) -> str:
    """A job or dataset id as the native API names it: `value` as given, or our id in its /v1 name (our ids are
    hex, so none starts with a prefix)."""
    return without_prefix(value, prefix) or value
