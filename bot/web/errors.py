"""The one way a handler refuses a request: `WebError(status, message)`, shown as a plain page
(middleware.py). The message is written for the member and never holds internals."""

from __future__ import annotations

NOT_FOUND = "There is nothing here (or it isn't yours to see)."


class WebError(Exception):
    def __init__(self, status: int, message: str, *, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after_s = retry_after_s


def not_found() -> WebError:
    # 404, never 403, for what isn't the member's: a 403 would tell them the id exists.
    return WebError(404, NOT_FOUND)
