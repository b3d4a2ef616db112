"""Time as the core sees it: always an aware UTC datetime, injectable so tests can move days."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta

# Anything that returns "now" as an aware UTC datetime; `system_clock` in production.
Clock = Callable[[], datetime]


def system_clock() -> datetime:
    return datetime.now(UTC)


def utc_day(moment: datetime) -> str:
    """The UTC calendar day a moment falls on, as stored in the database (YYYY-MM-DD)."""
    return moment.astimezone(UTC).date().isoformat()


def next_utc_midnight(moment: datetime) -> datetime:
    day = moment.astimezone(UTC).date() + timedelta(days=1)
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


def to_db(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    if moment.tzinfo is None:
        # A naive datetime here is a programming error that would silently shift days.
        raise ValueError("clock: datetimes must be timezone-aware (UTC)")
    return moment.astimezone(UTC).isoformat()


def from_db(text: str | None) -> datetime | None:
    if text is None:
        return None
    return datetime.fromisoformat(text)


def day_from_db(text: str) -> date:
    return date.fromisoformat(text)


class ManualClock:
    """A clock that only moves when told to; for tests and benchmarks."""

    def __init__(self, start: datetime | None = None) -> None:
        self.now = start or datetime(2025, 1, 1, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> datetime:
        self.now += timedelta(**delta)
        return self.now

    def set(self, moment: datetime) -> None:
        self.now = moment
