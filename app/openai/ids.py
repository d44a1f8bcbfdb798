"""The prefixes /v1 puts before our ids, as OpenAI's objects have them: `file-<dataset id>`,
`ftjob-<job id>`. A module of its own, importing nothing, so the `qlora` client reads them without
loading the translation (tables, services): it takes an id as the openai SDK printed it."""

FILE, JOB, EVENT, CHECKPOINT = "file-", "ftjob-", "ftevent-", "ftckpt-"


def without_prefix(value: str, prefix: str) -> str | None:
    """Our id in a /v1 id (`value` with `prefix`, and something after it), or None where it is not one."""
    return value[len(prefix):] if value.startswith(prefix) and len(value) > len(prefix) else None
