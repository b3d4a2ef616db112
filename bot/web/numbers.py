"""Numbers and dates read from addresses and forms (ids, pages, amounts; the from/to days of a
list). Numbers: ASCII digits only, and within
SQLite's 64-bit integers. `str.isdigit` alone lets through superscripts and other scripts'
digits (`²` passes it and `int()` then raises), and Discord-sized ids past 2**63 - 1 make
SQLite raise: either would be a 500 page instead of a plain refusal."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import date

from bot.web.errors import WebError

# SQLite's largest integer.
MAX_INTEGER = 2**63 - 1


def whole_number(text: str, max_digits: int = 19) -> int | None:
    """`text` as a non-negative integer, or None unless it is 1 to `max_digits` ASCII digits
    within SQLite's integers."""
    if not text or len(text) > max_digits or not (text.isascii() and text.isdigit()):
        return None
    value = int(text)
    return value if value <= MAX_INTEGER else None


def query_day(query: Mapping[str, str], name: str) -> date | None:
    """The day a query names as `name` (ISO, 2025-01-31), None when absent; 400 when it is not
    a date."""
    text = query.get(name, "")
    if not text:
        return None
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise WebError(400, f"'{name}' must be a date like 2025-01-31.") from None
