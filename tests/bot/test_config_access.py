"""The [discord] keys of who the bot serves and the refusal limit, and [storage] retention."""

from __future__ import annotations

from pathlib import Path

import pytest

from bot.config import ConfigError, load_config, parse_config

REPO = Path(__file__).resolve().parents[2]


def test_shipped_config_serves_no_server_until_one_is_listed() -> None:
    config = load_config(REPO / "config.toml")
    assert config.discord.guild_ids == ()
    assert config.discord.leave_other_guilds is False
    assert (config.discord.refusal_limit, config.discord.refusal_window_s) == (6, 60.0)
    storage = config.storage
    assert (storage.job_retention_days, storage.audit_retention_days) == (90, 90)


def test_servers_and_limits_are_read() -> None:
    config = parse_config(
        {
            "discord": {
                "guild_ids": [3, 1, 3],
                "leave_other_guilds": True,
                "refusal_limit": 2,
                "refusal_window_s": 5,
            },
            "storage": {"job_retention_days": 0, "audit_retention_days": 7},
        }
    )
    assert config.discord.guild_ids == (3, 1)
    assert config.discord.leave_other_guilds is True
    assert (config.discord.refusal_limit, config.discord.refusal_window_s) == (2, 5.0)
    assert (config.storage.job_retention_days, config.storage.audit_retention_days) == (0, 7)


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"discord": {"guild_ids": ["123"]}}, "discord.guild_ids"),
        ({"discord": {"guild_ids": [0]}}, "discord.guild_ids"),
        ({"discord": {"leave_other_guilds": "yes"}}, "discord.leave_other_guilds"),
        ({"discord": {"refusal_limit": 0}}, "discord.refusal_limit"),
        ({"discord": {"refusal_window_s": -1}}, "discord.refusal_window_s"),
        ({"storage": {"job_retention_days": -1}}, "storage.job_retention_days"),
        ({"storage": {"audit_retention_days": 1.5}}, "storage.audit_retention_days"),
    ],
)
def test_bad_values_name_the_key(raw: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        parse_config(raw)
