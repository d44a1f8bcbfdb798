"""Text rules and formats shared by the API and the worker: what names and ids may hold, and sizes as
people read them (in error messages and in progress events alike)."""

from __future__ import annotations

import unicodedata

# Counts in messages are said alike by the API and the engine, which imports nothing of app.
from worker.training.spec import agreeing as agreeing
from worker.training.spec import counted as counted

# Unicode's bidirectional embeddings, overrides and isolates (not the LRM/RLM marks right-to-left text
# uses): they reorder how the text after them is shown, so a name holding one displays as another name
# in a listing, a terminal or a downloaded file's name ("Trojan Source", CVE-2021-42574).
BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


# What a GPU class is called (a job's gpu_class, a worker's --gpu-class): its queue is "gpu-<class>",
# a Celery queue name, a label value in /metrics and a column of 100 characters in the workers table.
GPU_CLASS_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,49}$"


def has_control_characters(text: str) -> bool:
    """C0/C1 controls (NUL, line breaks, tabs, DEL) and bidi overrides: no name or id has them, and
    Postgres refuses NUL in a text value, even one only compared with (the query fails)."""
    return any(unicodedata.category(c) == "Cc" or c in BIDI_CONTROLS for c in text)


_UNITS = ("bytes", "KiB", "MiB", "GiB", "TiB")


def byte_unit(size: float) -> str:
    """The largest unit in which `size` is at least 1 (bytes below 1 KiB)."""
    for i, unit in enumerate(_UNITS[:-1]):
        if size < 1024 ** (i + 1):
            return unit
    return _UNITS[-1]


def in_unit(size: float, unit: str) -> str:
    """`size` as a number of `unit`: "6.2" of GiB; whole bytes."""
    value = size / 1024 ** _UNITS.index(unit)
    return f"{value:.0f}" if unit == "bytes" else f"{value:.1f}"


def format_bytes(size: float) -> str:
    """"512 bytes", "4.0 MiB", "16.0 GiB"."""
    unit = byte_unit(size)
    return f"{in_unit(size, unit)} {unit}"


def format_number(value: float) -> str:
    """A number as it was given: "10" for 10 and 10.0, "2.5", "1000000" (never "1e+06", nor 1234567
    rounded to six digits as "1.23457e+06", as :g writes them)."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)
