"""/help says how pictures come in and how their weights map (quoted from generation)."""

from __future__ import annotations

from bot.app import render
from bot.config import parse_config
from generation.conditioning import WEIGHT_HELP


def test_help_explains_pictures_and_the_weight_mapping() -> None:
    config = parse_config(
        {"images": {"allowed_hosts": ["cdn.discordapp.com"], "max_bytes": 5 << 20}}
    )
    text = render.help_text(config)
    assert "/blend" in text and "/describe" in text and "`image2`" in text
    assert "(cdn.discordapp.com), at most 5 MB" in text
    for line in WEIGHT_HELP.splitlines():
        assert line in text
    assert "`--iw 0-3`" in text and "`--sref LINK`" in text
    assert "one needs words beside it; two or more alone are blended" in text
