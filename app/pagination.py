"""Cursor pagination, newest first. The cursor is the last item's (created_at, id): stable while
rows are added, unlike an offset, and one index serves it."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, NamedTuple

from sqlalchemy import Integer, Select, String, bindparam, tuple_

from app.errors import Invalid, field_errors
from app.text import has_control_characters

MAX_LIMIT = 200
# The largest id a serial column holds on every backend, and the largest step: Postgres' `integer`
# (job_events.id, job_metrics.id and step are SERIAL / INTEGER there) is a signed 32-bit integer. A
# larger number in a query is an error from the database (Postgres cannot cast it to the column's type:
# `after=2147483648` was a 500), not a miss; SQLite's 64-bit integers hold more, but no id gets there.
MAX_ID = 2**31 - 1


class Page(NamedTuple):
    """One page of rows; next_cursor continues after it (None on the last page)."""

    data: list
    next_cursor: str | None

    @property
    def has_more(self) -> bool:
        return self.next_cursor is not None


def encode_cursor(created_at: datetime, item_id: str) -> str:
    raw = json.dumps([created_at.isoformat(), item_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """The (created_at, id) a cursor of encode_cursor holds; Invalid, naming the cursor, for anything
    else a client may have forged: one that would not compare with a stored time (no timezone, or
    out of range once in UTC), an id no row has (not a string, or holding a NUL) or that the JSON parser
    refuses (nested past its recursion limit)."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created, item_id = json.loads(raw)
        moment = datetime.fromisoformat(created)
        if moment.tzinfo is None:
            raise ValueError("no timezone")
        if not isinstance(item_id, str) or has_control_characters(item_id):  # Postgres fails a query with a NUL
            raise ValueError("not an id")
        return moment.astimezone(UTC), item_id
    except (ValueError, TypeError, OverflowError, RecursionError):
        raise Invalid("cursor: not a cursor this API returned; pass next_cursor from the previous page",
                      details=field_errors([("cursor", "not a cursor this API returned")])) from None


def cursor_after(row) -> str:
    """The cursor of the page that starts after this row (for APIs that page by the last id seen)."""
    return encode_cursor(row.created_at, row.id)


def check_limit(limit: int, maximum: int = MAX_LIMIT) -> int:
    if not 1 <= limit <= maximum:
        raise Invalid(f"limit: must be between 1 and {maximum}, got {limit}",
                      details=field_errors([("limit", f"must be between 1 and {maximum}")]))
    return limit


def newest_first(query: Select, table, cursor: str | None, limit: int) -> Select:
    """Order by (created_at, id) descending, start after the cursor, fetch one extra row to know if there is more."""
    return newest_first_shape(query, table, after=bool(cursor)).params(newest_first_values(cursor, limit))


def newest_first_shape(query: Select, table, *, after: bool) -> Select:
    """newest_first's statement with the cursor's place and the limit left as parameters, filled in by
    newest_first_values: for a read built once and run by every poll (GET /jobs)."""
    if after:
        created, item_id = bindparam("after_created", type_=table.created_at.type), bindparam("after_id", type_=String)
        # A row comparison, which Postgres seeks the (team_id, created_at, id) index to; the equivalent
        # `created_at < c OR (created_at = c AND id < i)` was a filter over every row newer than the cursor
        # (1,000 rows read to skip them at page 20, more each page: bench/scale_bench.py).
        query = query.where(tuple_(table.created_at, table.id) < tuple_(created, item_id))
    return query.order_by(table.created_at.desc(), table.id.desc()).limit(bindparam("rows_wanted", type_=Integer))


def newest_first_values(cursor: str | None, limit: int) -> dict[str, Any]:
    check_limit(limit)
    values: dict[str, Any] = {"rows_wanted": limit + 1}
    if cursor:
        values["after_created"], values["after_id"] = decode_cursor(cursor)
    return values


def page(rows: list, limit: int) -> Page:
    """Split the limit+1 rows fetched into the page and the next cursor (None on the last page)."""
    if len(rows) <= limit:
        return Page(rows, None)
    rows = rows[:limit]
    return Page(rows, cursor_after(rows[-1]))


def page_after(rows: list, key: Callable[[Any], str], after: str | None, limit: int, unknown: str) -> Page:
    """A page of a short list held whole, starting after the row whose key is `after` (Invalid with the
    message `unknown` when no row has it); next_cursor is the key of the page's last row."""
    keys = [key(row) for row in rows]
    start = 0
    if after:
        if after not in keys:
            raise Invalid(unknown, details=field_errors([("after", "unknown")]))
        start = keys.index(after) + 1
    check_limit(limit)
    end = start + limit
    return Page(rows[start:end], keys[end - 1] if len(rows) > end else None)
