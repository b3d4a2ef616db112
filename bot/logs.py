"""Logging is configured here and nowhere else."""

from __future__ import annotations

import logging
import sys


class RedactSecrets(logging.Filter):
    """Replaces known secrets in every record, so a token can't leak through a traceback."""

    def __init__(self, secrets: list[str]) -> None:
        super().__init__()
        self.secrets = [s for s in secrets if s]

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.secrets:
            return True
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + logging.Formatter().formatException(record.exc_info)
            record.exc_info = None
            record.exc_text = None
        for secret in self.secrets:
            message = message.replace(secret, "[redacted]")
        record.msg = message
        record.args = ()
        return True


def setup_logging(level: str, secrets: list[str] | None = None) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S")
    )
    handler.addFilter(RedactSecrets(secrets or []))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # discord.py's gateway chatter at INFO is noise for a server owner.
    logging.getLogger("discord").setLevel(max(logging.getLevelName(level), logging.WARNING))
