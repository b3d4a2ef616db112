"""Logging is configured here and nowhere else."""

from __future__ import annotations

import logging
import re
import sys

# A link's query and fragment. On a Discord attachment link the query is the signature
# (`?ex=…&is=…&hm=…`) that lets whoever holds the link fetch the file until it expires; the
# path alone still says which file it was.
_LINK_QUERY = re.compile(r"(\bhttps?://[^\s?#<>\"'`]+)[?#][^\s<>\"'`]*", re.IGNORECASE)


def without_queries(text: str) -> str:
    """`text` with the query and fragment of every http(s) link taken out."""
    return _LINK_QUERY.sub(r"\1", text)


class RedactSecrets(logging.Filter):
    """Replaces known secrets in every record, so a token can't leak through a traceback, and
    takes the query off every link in it (a signed attachment link is a credential too)."""

    def __init__(self, secrets: list[str]) -> None:
        super().__init__()
        self.secrets = [s for s in secrets if s]

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + logging.Formatter().formatException(record.exc_info)
            record.exc_info = None
            record.exc_text = None
        for secret in self.secrets:
            message = message.replace(secret, "[redacted]")
        record.msg = without_queries(message)
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
