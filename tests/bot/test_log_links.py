"""The bot's log handler takes the query off every link it writes (a signed Discord attachment
link's query lets its reader fetch the file), in messages and in tracebacks alike."""

from __future__ import annotations

import logging

import pytest

from bot.app.logs import without_queries
from tests.bot.helpers import log_to_stream

SIGNED = (
    "https://cdn.discordapp.com/attachments/1/2/cat.png?ex=6650a1b2&is=664f5032&hm=5ec12e7d0b1c"
)


def test_without_queries_keeps_the_path() -> None:
    assert without_queries(f"got <{SIGNED}> and {SIGNED}#x, then") == (
        "got <https://cdn.discordapp.com/attachments/1/2/cat.png> and "
        "https://cdn.discordapp.com/attachments/1/2/cat.png then"
    )
    assert without_queries("no links: a?b=c") == "no links: a?b=c"


def test_the_log_never_holds_a_links_signature(
    monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    stream = log_to_stream(monkeypatch, request, [])  # no token (the console): still filtered
    log = logging.getLogger("imagine-bot.test")
    log.info("fetching %s", SIGNED)
    try:
        raise RuntimeError(f"GET {SIGNED} answered 500")
    except RuntimeError:
        log.exception("picture failed")
    logging.getLogger().handlers.clear()
    text = stream.getvalue()
    assert "fetching https://cdn.discordapp.com/attachments/1/2/cat.png" in text
    assert "GET https://cdn.discordapp.com/attachments/1/2/cat.png answered 500" in text
    assert "hm=" not in text and "ex=" not in text
