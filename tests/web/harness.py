"""What the web home's tests share: the bot as `python -m bot` wires it (the Discord client
with the web home beside it) against the fake Discord, a headless Chromium driven by
Playwright, and screenshots kept as artifacts.

    async with web_home(tmp_path, settings, engine) as home:
        alice = home.fake.add_user("alice")
        link = await home.sign_in_link(alice)           # /web through the fake Discord
        async with chromium(tmp_path) as browser:
            page = await browser.new_page()
            await page.goto(link)
            await page.click("#signin-link")
            await keep_screenshot(page, "my-images", tmp_path)

Screenshots go to `$WEB_ARTIFACTS_DIR` (default `artifacts/web/` at the repository root,
ignored by git) and to the test's own temp folder.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from bot.app.fetch import FetchPolicy
from bot.config.web import WebSecrets
from bot.discord.client import ImagineBot
from bot.web.server import WebServer, start_web
from tests.bot.conftest import bot_config, in_process_workers
from tests.bot.helpers import JOB_TIMEOUT_S, has_variations
from tests.fakediscord import FakeDiscord
from tests.fakediscord.model import Guild, Message, User

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
# The test machines have no internet: nothing in the background may try to reach it.
CHROMIUM_ARGS = (
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
)
SIGNING_KEY = "test-signing-key-" + "x" * 32
# Every browser test shares one xdist group (one worker): each launches Chromium.
BROWSER_GROUP = "web-browser"
_LINK = re.compile(r"https?://\S+/signin/link\?t=[\w.-]+")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def artifacts_dir() -> Path:
    return Path(os.environ.get("WEB_ARTIFACTS_DIR", REPO / "artifacts" / "web"))


async def keep_screenshot(page: Any, name: str, tmp_path: Path) -> Path:
    """A full-page screenshot, in the artifacts folder and in the test's temp folder."""
    data = await page.screenshot(full_page=True)
    for folder in (artifacts_dir(), tmp_path / "screenshots"):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{name}.png").write_bytes(data)
    return tmp_path / "screenshots" / f"{name}.png"


@asynccontextmanager
async def chromium(tmp_path: Path) -> AsyncIterator[Any]:
    """Debian's Chromium, headless, with a fresh profile: a Playwright browser context."""
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        context = await playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),
            executable_path=CHROMIUM,
            headless=True,
            args=list(CHROMIUM_ARGS),
            accept_downloads=True,
        )
        try:
            yield context
        finally:
            await context.close()


@dataclass
class WebHome:
    fake: FakeDiscord
    bot: ImagineBot
    server: WebServer
    guilds: dict[str, Guild] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.bot.config.web.base_url

    async def sign_in_link(self, user: User) -> str:
        """/web as `user` through the fake Discord; the link of its private answer."""
        interaction = await self.fake.slash(user, "web")
        message: Message = await interaction.wait_original(lambda m: "/signin/link" in m.content)
        assert message.ephemeral
        match = _LINK.search(message.content)
        assert match, message.content
        return match[0]

    async def imagine(self, user: User, prompt: str, **options: Any) -> Message:
        """/imagine as `user` through the fake Discord; its message once the grid is in."""
        interaction = await self.fake.slash(user, "imagine", prompt=prompt, **options)
        return await interaction.wait_message(has_variations, timeout=JOB_TIMEOUT_S)

    def client(self) -> aiohttp.ClientSession:
        """A cookie-keeping HTTP client that doesn't follow redirects on its own."""
        return aiohttp.ClientSession(
            base_url=self.url,
            cookie_jar=aiohttp.CookieJar(unsafe=True),
        )


@asynccontextmanager
async def web_home(
    data_dir: Path,
    settings: Any,
    engine: Any,
    *,
    web: dict[str, Any] | None = None,
    oauth: bool = True,
    guilds: Sequence[str] = (),
    **sections: Any,
) -> AsyncIterator[WebHome]:
    """The fake Discord and the bot with the web home on a free port of 127.0.0.1. `guilds`:
    more servers, made before the bot starts and listed in its `guild_ids` (`home.guilds`)."""
    async with FakeDiscord() as fake:
        extra = {name: fake.add_guild(name) for name in guilds}
        if extra:
            discord = dict(sections.pop("discord", {}))
            discord["guild_ids"] = [fake.guild_id, *(g.id for g in extra.values())]
            sections["discord"] = discord
        port = free_port()
        values = {
            "enabled": True,
            "port": port,
            "public_url": f"http://127.0.0.1:{port}",
            "discord_url": fake.url,
            **(web or {}),
        }
        config = bot_config(data_dir, settings, fake.guild_id, web=values, **sections)
        fake.oauth.redirect_uris.add(config.web.oauth_redirect_url)
        secrets = WebSecrets(
            signing_key=SIGNING_KEY,
            client_id=fake.oauth.client_id if oauth else "",
            client_secret=fake.oauth.client_secret if oauth else "",
        )
        bot = ImagineBot(
            config,
            core_options={"workers": in_process_workers(config, engine)},
            guild_ready_timeout=0.05,
            # Members' pictures come from the fake's CDN on 127.0.0.1.
            fetch_policy=FetchPolicy(
                allowed_hosts=frozenset({"127.0.0.1"}),
                allowed_schemes=frozenset({"http"}),
                allow_private_addresses=True,
            ),
            web_secrets=secrets,
            companions=(start_web,),
        )
        async with fake.run_bot(bot):
            server = next(c for c in bot.companions if isinstance(c, WebServer))
            yield WebHome(fake, bot, server, extra)
