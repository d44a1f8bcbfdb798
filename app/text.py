"""Rules for text the API stores or looks up (names, ids), shared by the request models and services."""

from __future__ import annotations

import unicodedata


def has_control_characters(text: str) -> bool:
    """C0/C1 controls (NUL, line breaks, tabs, DEL): no name or id has them, and Postgres refuses NUL
    in a text value, even one only compared with (the query fails)."""
    return any(unicodedata.category(c) == "Cc" for c in text)
