"""A per-member limit on refusals: a member refused `limit` times within `window_s` is cooled down.

Every refusal costs the bot something (a parse, a database read, an audit row, an answer to
Discord) and costs the member nothing, so a member hammering a refused command could keep the
bot busy for everyone. The front end records each refusal here and asks `cooling` before it
does anything else with an interaction; a cooled-down member's interactions are answered with
one short line, and those answers count as refusals too, so cooling lasts as long as the spam
does and ends `window_s` after it stops.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable

# Members remembered at most; past it, those whose refusals have all left the window go.
_MAX_TRACKED = 10_000


class RefusalLimiter:
    def __init__(
        self,
        limit: int,
        window_s: float,
        *,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if limit < 1 or window_s <= 0:
            raise ValueError(f"limit >= 1 and window_s > 0 needed, got {limit}, {window_s}")
        self.limit = limit
        self.window_s = window_s
        self._monotonic = monotonic
        self._times: dict[int, deque[float]] = {}

    def record(self, user_id: int) -> None:
        """One more refusal for the member."""
        now = self._monotonic()
        times = self._times.get(user_id)
        if times is None:
            if len(self._times) >= _MAX_TRACKED:
                self._forget_idle(now)
            times = self._times[user_id] = deque(maxlen=self.limit)
        times.append(now)

    def cooling(self, user_id: int) -> float:
        """Seconds until the member may be served again; 0 when they may now."""
        times = self._times.get(user_id)
        if times is None or len(times) < self.limit:
            return 0.0
        left = times[0] + self.window_s - self._monotonic()
        return left if left > 0 else 0.0

    def message(self, wait_s: float) -> str:
        return (
            f"Too many refused commands in a row — wait {max(1, math.ceil(wait_s))} s before "
            "trying again. Nothing was done."
        )

    def _forget_idle(self, now: float) -> None:
        idle = [user for user, times in self._times.items() if now - times[-1] >= self.window_s]
        for user in idle:
            del self._times[user]
