"""Requests per minute per key (an address, a member, a sign-in address): a sliding window
kept in memory, small and bounded. A refused request is a 429 page (middleware.py)."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

# Keys not seen for this long are forgotten; at most this many are kept (oldest go first).
MAX_KEYS = 20_000
WINDOW_S = 60.0


class RateLimiter:
    def __init__(self, per_minute: int, *, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.per_minute = per_minute
        self._monotonic = monotonic
        self._hits: dict[str, deque[float]] = {}

    def hit(self, key: str) -> int | None:
        """Count one request; None if allowed, else the seconds to wait."""
        now = self._monotonic()
        hits = self._hits.get(key)
        if hits is None:
            if len(self._hits) >= MAX_KEYS:
                # Dicts keep insertion order: drop the oldest key.
                self._hits.pop(next(iter(self._hits)))
            hits = self._hits[key] = deque()
        while hits and hits[0] <= now - WINDOW_S:
            hits.popleft()
        if len(hits) >= self.per_minute:
            return max(1, int(hits[0] + WINDOW_S - now) + 1)
        hits.append(now)
        return None
