"""The owners' and admins' dashboard end to end: the bot with its web home against the fake
Discord, an owner in headless Chromium granting credits that the member's `/balance` in Discord
then shows, the ledger row equal to `/admin credits grant`'s, the live queue receiving a server-
sent event when a job is submitted, screenshots of each page; and the refusals (a non-admin, a
form without its CSRF token, a server admin reaching for another server's member)."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from yarl import URL

from bot.web import routes_admin_live
from tests.bot.conftest import GatedEngine
from tests.bot.helpers import JOB_TIMEOUT_S, has_cancel, job_id_of
from tests.fakediscord import MANAGE_GUILD
from tests.fakediscord.model import Channel, User
from tests.web.harness import BROWSER_GROUP, WebHome, chromium, keep_screenshot, web_home

pytestmark = pytest.mark.xdist_group(BROWSER_GROUP)

_LINK = re.compile(r"https?://[^/\s]+(/signin/link\?t=[\w.-]+)")
_CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')
_AVAILABLE = re.compile(r"\*\*(\d+) credits available\*\*")
LEDGER_COLUMNS = "user_id, amount, allowance_delta, granted_delta, kind, job_id, reason, actor_id"


async def _link(home: WebHome, user: User, channel: Channel | None = None) -> str:
    """/web as `user` (in `channel`'s server): the path of its one-time sign-in link."""
    asked = await home.fake.slash(user, "web", channel=channel)
    message = await asked.wait_original(lambda m: "/signin/link" in m.content)
    match = _LINK.search(message.content)
    assert match, message.content
    return match[1]


async def _signed_in(home: WebHome, user: User, channel: Channel | None = None) -> Any:
    """An HTTP client signed in as `user` through a /web link."""
    client = home.client()
    path = await _link(home, user, channel)
    async with client.get(path) as response:
        page = await response.text()
    token = re.search(r'name="t" value="([^"]+)"', page)
    csrf = _CSRF.search(page)
    assert token and csrf, page
    form = {"csrf_token": csrf[1], "t": token[1]}
    async with client.post("/signin/link", data=form, allow_redirects=False) as response:
        assert response.status == 303, await response.text()
    return client


async def _csrf(client: Any) -> str:
    async with client.get("/images") as response:
        match = _CSRF.search(await response.text())
    assert match
    return match[1]


async def _available(home: WebHome, user: User) -> int:
    asked = await home.fake.slash(user, "balance")
    message = await asked.wait_original(lambda m: "credits available" in m.content)
    match = _AVAILABLE.search(message.content)
    assert match, message.content
    return int(match[1])


async def _grants(home: WebHome, user_id: int) -> list[tuple[Any, ...]]:
    rows = await home.bot.core.db.read(
        f"SELECT {LEDGER_COLUMNS} FROM ledger WHERE user_id = ? AND kind = 'grant' ORDER BY id",
        (user_id,),
    )
    return [tuple(row) for row in rows]


async def _first_live_event(client: Any, path: str) -> dict[str, Any]:
    async with client.get(path, timeout=aiohttp.ClientTimeout(total=20)) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        event = ""
        async for raw in response.content:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                event = line.removeprefix("event: ")
            elif line.startswith("data: ") and event == "live":
                data: dict[str, Any] = json.loads(line.removeprefix("data: "))
                return data
    raise AssertionError("the stream ended without a live event")


async def test_an_owner_runs_the_server_from_the_dashboard(
    tmp_path: Path, bot_engine_settings: Any, shared_engine: Any
) -> None:
    engine = GatedEngine(shared_engine)
    async with web_home(
        tmp_path / "data",
        bot_engine_settings,
        engine,
        moderation={"banned_words": ["forbidden"]},
        discord={"command_cooldown_s": 0.0},
    ) as home:
        fake = home.fake
        alice = fake.add_user("alice")
        before = await _available(home, alice)
        blocked = await fake.slash(alice, "imagine", prompt="a forbidden lighthouse")
        await blocked.wait_original(lambda m: "blocked" in m.content)
        link = await _link(home, fake.owner)
        async with chromium(tmp_path) as browser:
            page = await browser.new_page()
            # The machine may be loaded: waits are for events, not for speed.
            page.set_default_timeout(JOB_TIMEOUT_S * 1000)
            await page.goto(home.url + link)
            await page.click("#signin-link")
            await page.wait_for_load_state()

            # Credits: the grant form, then Discord's /balance shows it.
            await page.goto(f"{home.url}/admin/credits?user={alice.id}")
            await page.wait_for_selector("#grant-form")
            await keep_screenshot(page, "admin-credits", tmp_path)
            await page.fill("#grant-form input[name=amount]", "25")
            await page.fill("#grant-form input[name=reason]", "contest prize")
            await page.click("#grant-form button[type=submit]")
            await page.wait_for_selector("#done")
            assert "Granted 25" in (await page.text_content("#done") or "")
            assert await page.get_attribute("#balance", "data-granted") == "25"
            await keep_screenshot(page, "admin-credits-granted", tmp_path)
            assert await _available(home, alice) == before + 25

            # The same grant through Discord writes the same ledger row.
            grant = await fake.slash(
                fake.owner, "admin credits grant", user=alice, amount=25, reason="contest prize"
            )
            await grant.wait_original(lambda m: "Granted 25" in m.content)
            web_row, discord_row = await _grants(home, alice.id)
            assert web_row == discord_row
            assert web_row == (alice.id, 25, 0, 25, "grant", None, "contest prize", fake.owner.id)

            # The queue, live: a job submitted in Discord reaches the open page as an event.
            await page.goto(f"{home.url}/admin/queue")
            await page.wait_for_function(
                "Number(document.getElementById('live-status').dataset.updates) >= 1"
            )
            job = await fake.slash(alice, "imagine", prompt="a lighthouse at dusk")
            job_id = job_id_of(await job.wait_original(has_cancel))
            await page.wait_for_selector(
                f"#running tr[data-job='{job_id}'], #waiting tr[data-job='{job_id}']"
            )
            second = await fake.slash(alice, "imagine", prompt="a harbour at dawn")
            second_id = job_id_of(await second.wait_original(has_cancel))
            await page.wait_for_selector(f"#waiting tr[data-job='{second_id}']")
            await page.wait_for_selector(f"#running tr[data-job='{job_id}']")
            workers = await page.text_content("#workers")
            assert workers and str(job_id) in workers
            await keep_screenshot(page, "admin-queue", tmp_path)
            engine.gate.set()
            # The second job leaves the waiting list once the first is done (a loaded machine
            # may take a while to run it).
            await page.wait_for_selector(
                f"#waiting tr[data-job='{second_id}']",
                state="detached",
                timeout=JOB_TIMEOUT_S * 1000,
            )

            # The logs, filtered.
            await page.goto(f"{home.url}/admin/moderation?kind=prompt_blocked")
            row = await page.text_content("#audit tbody tr")
            assert row and "prompt_blocked" in row and str(alice.id) in row
            await keep_screenshot(page, "admin-moderation", tmp_path)
            await page.goto(f"{home.url}/admin/audit?member={alice.id}")
            await keep_screenshot(page, "admin-audit", tmp_path)
            await page.goto(f"{home.url}/admin/allowances")
            await page.fill("#member-form input[name=user]", str(alice.id))
            await page.fill("#member-form input[name=amount]", "50")
            await page.click("#member-form button[type=submit]")
            await page.wait_for_selector("#done")
            assert str(alice.id) in (await page.text_content("#member-allowances") or "")
            await keep_screenshot(page, "admin-allowances", tmp_path)
            await page.goto(f"{home.url}/admin/server")
            await page.click("#explore-toggle")
            await page.wait_for_selector("#done")
            assert await page.text_content("#explore-default") == "on"
            assert await home.server.ctx.store.guild_default(fake.guild_id)
            await keep_screenshot(page, "admin-server", tmp_path)


async def test_the_dashboard_refuses_non_admins_forms_without_csrf_and_other_servers(
    tmp_path: Path, bot_engine_settings: Any, shared_engine: Any
) -> None:
    engine = GatedEngine(shared_engine)
    async with web_home(
        tmp_path / "data",
        bot_engine_settings,
        engine,
        guilds=("Second",),
        moderation={"banned_words": ["forbidden"]},
    ) as home:
        fake = home.fake
        alice = fake.add_user("alice")
        managers = fake.add_role("managers", MANAGE_GUILD)
        moderator = fake.add_user("moderator", roles=[managers])
        second = home.guilds["Second"]
        second_managers = fake.add_role("managers", MANAGE_GUILD, guild=second)
        second_admin = fake.add_user("second admin", guild=second, roles=[second_managers])
        assert second.general is not None
        blocked = await fake.slash(alice, "imagine", prompt="a forbidden lighthouse")
        await blocked.wait_original(lambda m: "blocked" in m.content)
        job = await fake.slash(alice, "imagine", prompt="alice's lighthouse")
        job_id = job_id_of(await job.wait_original(has_cancel))

        async with await _signed_in(home, alice) as member:
            for path in ("/admin", "/admin/queue", "/admin/queue/events", "/admin/audit"):
                async with member.get(f"{path}?user={alice.id}") as response:
                    assert response.status == 403, path
                    assert "Traceback" not in await response.text()
            form = {"csrf_token": await _csrf(member), "user": alice.id, "amount": 5, "reason": "x"}
            async with member.post("/admin/credits/grant", data=form) as response:
                assert response.status == 403

        async with await _signed_in(home, fake.owner) as owner:
            grants = await _grants(home, alice.id)
            form = {"user": alice.id, "amount": 5, "reason": "no token"}
            async with owner.post("/admin/credits/grant", data=form) as response:
                assert response.status == 403
            form["csrf_token"] = "forged"
            async with owner.post("/admin/credits/grant", data=form) as response:
                assert response.status == 403
            assert await _grants(home, alice.id) == grants

        async with await _signed_in(home, moderator) as local:
            async with local.get(f"/admin/credits?user={alice.id}") as response:
                assert response.status == 200
                assert 'id="ledger"' in await response.text()
            async with local.get(f"/admin/moderation?member={alice.id}") as response:
                assert "<tr data-id=" in await response.text()
            live = await _first_live_event(local, "/admin/queue/events")
            assert job_id in [j["job_id"] for j in (*live["running"], *live["waiting"])]
            assert live["workers"] is None

        async with await _signed_in(home, second_admin, second.general) as foreign:
            async with foreign.get(f"/admin/credits?user={alice.id}") as response:
                assert response.status == 403
                assert "a member of this server" in await response.text()
            async with foreign.get(f"/admin/queue?server={fake.guild_id}") as response:
                assert response.status == 403
            live = await _first_live_event(foreign, "/admin/queue/events")
            assert live["running"] == [] and live["waiting"] == []
            for log in ("audit", "moderation"):
                async with foreign.get(f"/admin/{log}?member={alice.id}") as response:
                    assert response.status == 200
                    assert "<tr data-id=" not in await response.text()
            grants = await _grants(home, alice.id)
            form = {
                "csrf_token": await _csrf(foreign),
                "user": alice.id,
                "amount": 1000,
                "reason": "mine",
            }
            async with foreign.post(
                f"/admin/credits/grant?server={second.id}", data=form
            ) as response:
                assert response.status == 403
                assert "Nothing was changed" in await response.text()
            assert await _grants(home, alice.id) == grants
            # A server's settings: their own server only, whatever the form names.
            form = {"csrf_token": await _csrf(foreign), "guild": fake.guild_id, "share": "on"}
            async with foreign.post("/admin/server/explore", data=form) as response:
                assert response.status == 200
            assert not await home.server.ctx.store.guild_default(fake.guild_id)
            assert await home.server.ctx.store.guild_default(second.id)

        # Signed in with Discord (no server in the session): rights are asked of Discord.
        made = await fake.slash(moderator, "imagine", prompt="a moderator's fox")
        await made.wait_original(has_cancel)
        fake.oauth.approve_as = moderator
        try:
            async with home.client() as oauth:
                start = await oauth.get("/signin/discord", allow_redirects=False)
                async with aiohttp.ClientSession() as discord_side:
                    approved = await discord_side.get(
                        start.headers["Location"], allow_redirects=False
                    )
                callback = URL(approved.headers["Location"])
                done = await oauth.get(callback.path_qs, allow_redirects=False)
                assert done.status == 303
                async with oauth.get(f"/admin/credits?user={alice.id}") as response:
                    assert response.status == 200
                    assert f"Admin of server <code>{fake.guild_id}</code>" in await response.text()
        finally:
            fake.oauth.approve_as = None
        engine.gate.set()


async def test_a_live_stream_says_goodbye_and_ends_when_the_web_home_closes(
    tmp_path: Path, bot_engine_settings: Any, shared_engine: Any, monkeypatch: Any
) -> None:
    monkeypatch.setattr(routes_admin_live, "HEARTBEAT_S", 0.2)
    async with web_home(tmp_path / "data", bot_engine_settings, shared_engine) as home:
        async with await _signed_in(home, home.fake.owner) as owner:
            timeout = aiohttp.ClientTimeout(total=20)
            async with owner.get("/admin/queue/events", timeout=timeout) as response:
                events: list[str] = []
                closing = None
                async for raw in response.content:
                    line = raw.decode().rstrip("\n")
                    if line.startswith("event: "):
                        events.append(line.removeprefix("event: "))
                    elif line == ": heartbeat" and closing is None:
                        # A quiet queue still says it is alive; then the bot stops.
                        events.append("heartbeat")
                        closing = asyncio.ensure_future(home.server.close())
                assert closing is not None
                await closing
            # One view, then the goodbye: the stream was ended, not cut off mid-shutdown.
            assert events == ["live", "heartbeat", "bye"]
