"""[web]: off by default, 127.0.0.1:8080 when on, every key checked by name; the sample's
commented section loads as written once uncommented; the secrets come from the environment
only and leave it once read."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from bot.app.sign_in import signing_key
from bot.config import ConfigError, parse_config
from bot.config.web import (
    CLIENT_ID_ENV,
    CLIENT_SECRET_ENV,
    SECRET_ENV,
    WebSecrets,
    take_web_secrets,
)

REPO = Path(__file__).resolve().parents[2]


def test_off_by_default_and_local_when_on() -> None:
    assert parse_config({}).web.enabled is False
    web = parse_config({"web": {"enabled": True}}).web
    assert (web.host, web.port) == ("127.0.0.1", 8080)
    assert web.base_url == "http://127.0.0.1:8080"
    assert web.oauth_redirect_url == "http://127.0.0.1:8080/signin/discord/callback"
    assert web.secure_cookies is False
    behind = parse_config({"web": {"enabled": True, "public_url": "https://x.example/"}}).web
    assert behind.oauth_redirect_url == "https://x.example/signin/discord/callback"
    assert behind.secure_cookies is True


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"port": 0}, "web.port"),
        ({"port": 70000}, "web.port"),
        ({"public_url": "bot.example.org"}, "web.public_url"),
        ({"public_url": "javascript:alert(1)"}, "web.public_url"),
        ({"discord_url": "ftp://discord.com"}, "web.discord_url"),
        ({"link_ttl_s": 0}, "web.link_ttl_s"),
        ({"page_size": 1000}, "web.page_size"),
        ({"ip_requests_per_minute": -1}, "web.ip_requests_per_minute"),
        ({"enabled": "yes"}, "web.enabled"),
        ({"secret": "in the file"}, "web.secret"),
    ],
)
def test_a_bad_value_is_refused_by_name(values: dict[str, Any], named: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(named)):
        parse_config({"web": values})


def test_the_sample_section_loads_as_written() -> None:
    text = (REPO / "config.toml").read_text(encoding="utf-8")
    block = text[text.index("# [web]") :]
    lines = [line[2:] for line in block.splitlines() if line.startswith("# ")]
    web = parse_config(tomllib.loads("\n".join(lines))).web
    assert web.enabled and web.public_url == "https://bot.example.org"


def test_secrets_come_from_the_environment_and_leave_it() -> None:
    environ = {SECRET_ENV: "s" * 40, CLIENT_ID_ENV: "123", CLIENT_SECRET_ENV: "shh", "PATH": "/bin"}
    secrets = take_web_secrets(environ)
    assert secrets == WebSecrets("s" * 40, "123", "shh")
    assert environ == {"PATH": "/bin"}
    assert "shh" not in repr(secrets) and "s" * 40 not in repr(secrets)
    assert secrets.oauth_enabled and not WebSecrets("s" * 40).oauth_enabled
    with pytest.raises(ValueError, match="IMAGINE_WEB_SECRET"):
        signing_key(WebSecrets("short"))
    # Unset: a random key for this run, different every start.
    assert signing_key(WebSecrets()) != signing_key(WebSecrets())


def test_the_browser_tests_screenshots_stay_out_of_git() -> None:
    assert "/artifacts/" in (REPO / ".gitignore").read_text(encoding="utf-8").splitlines()
