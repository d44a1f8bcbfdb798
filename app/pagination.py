"""Cursor pagination, newest first. The cursor is the last item's (created_at, id): stable while
rows are added, unlike an offset, and one index serves it."""

from __future__ import annotations

import base64
import json
from datetime import datetime

from sqlalchemy import Select, and_, or_

from app.errors import Invalid

MAX_LIMIT = 200


def encode_cursor(created_at: datetime, item_id: str) -> str:
    raw = json.dumps([created_at.isoformat(), item_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created, item_id = json.loads(raw)
        return datetime.fromisoformat(created), str(item_id)
    except (ValueError, TypeError):
        raise Invalid("cursor: not a cursor this API returned; pass next_cursor from the previous page") from None


def newest_first(query: Select, table, cursor: str | None, limit: int) -> Select:
    """Order by (created_at, id) descending, start after the cursor, fetch one extra row to know if there is more."""
    if not 1 <= limit <= MAX_LIMIT:
        raise Invalid(f"limit: must be between 1 and {MAX_LIMIT}, got {limit}")
    if cursor:
        created, item_id = decode_cursor(cursor)
        query = query.where(or_(table.created_at < created, and_(table.created_at == created, table.id < item_id)))
    return query.order_by(table.created_at.desc(), table.id.desc()).limit(limit + 1)


def page(rows: list, limit: int) -> tuple[list, str | None]:
    """Split the limit+1 rows into the page and the next cursor (None on the last page)."""
    if len(rows) <= limit:
        return rows, None
    rows = rows[:limit]
    return rows, encode_cursor(rows[-1].created_at, rows[-1].id)
