"""The web home's doors, over real HTTP against the real bot wiring and the fake Discord: whose
job a member may reach, CSRF, one-time links, tampered cookies, OAuth's state, rate limits and
the plain pages bad requests get."""

from __future__ import annotations

import html
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from yarl import URL

from bot.core.models import JobState
from bot.web.ratelimit import RateLimiter
from bot.web.sessions import SESSION_COOKIE
from tests.bot.helpers import JOB_TIMEOUT_S, job_id_of
from tests.fakediscord.model import User
from tests.web.harness import WebHome, web_home

pytestmark = pytest.mark.asyncio(loop_scope="module")

_CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


class World:
    def __init__(self, home: WebHome, alice: User, bob: User, alice_job: int, bob_job: int):
        self.home, self.alice, self.bob = home, alice, bob
        self.alice_job, self.bob_job = alice_job, bob_job


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def world(
    tmp_path_factory: pytest.TempPathFactory, bot_engine_settings: Any, shared_engine: Any
) -> AsyncIterator[World]:
    data = tmp_path_factory.mktemp("web-security") / "data"
    # This module signs in some 25 times a minute from one address: above the shipped
    # limit, which test_bad_requests_get_plain_pages_and_limits_get_429 checks on its own.
    web = {"sign_in_per_minute": 100}
    async with web_home(data, bot_engine_settings, shared_engine, web=web) as home:
        alice = home.fake.add_user("alice")
        bob = home.fake.add_user("bob")
        alice_grid = await home.imagine(alice, "a red fox in the snow", seed=1)
        bob_grid = await home.imagine(bob, "a green frog on a leaf", seed=2)
        yield World(home, alice, bob, job_id_of(alice_grid), job_id_of(bob_grid))


async def signed_in(home: WebHome, user: User) -> aiohttp.ClientSession:
    """An HTTP client signed in as `user` through a /web link."""
    link = await home.sign_in_link(user)
    http = home.client()
    page = await http.get(URL(link).path_qs)
    text = await page.text()
    token, t = _CSRF.search(text), re.search(r'name="t" value="([^"]+)"', text)
    assert token and t, text
    done = await http.post(
        "/signin/link", data={"csrf_token": token[1], "t": t[1]}, allow_redirects=False
    )
    assert done.status == 303 and done.headers["Location"] == "/images"
    return http


async def text_of(response: aiohttp.ClientResponse) -> str:
    return html.unescape(await response.text())


async def csrf_of(http: aiohttp.ClientSession, path: str = "/settings") -> str:
    match = _CSRF.search(await (await http.get(path)).text())
    assert match
    return match[1]


async def test_another_members_job_is_404_like_a_job_that_does_not_exist(world: World) -> None:
    http = await signed_in(world.home, world.alice)
    async with http:
        own = await http.get(f"/jobs/{world.alice_job}")
        assert own.status == 200
        assert "a red fox in the snow" in await text_of(own)
        missing = await http.get("/jobs/999999")
        assert missing.status == 404
        for path in (
            f"/jobs/{world.bob_job}",
            f"/jobs/{world.bob_job}/images/1.png",
            f"/jobs/{world.bob_job}/images/0.png?download=1",
            f"/jobs/{world.bob_job}/thumbs/0.jpg",
            f"/jobs/{world.bob_job}/inputs/0",
        ):
            other = await http.get(path)
            assert other.status == 404, path
            # The same page as for an id that doesn't exist: nothing says bob's job exists.
            assert await other.text() == await missing.text()
        assert "green frog" not in await (await http.get("/images?q=frog")).text()
        # Not an id at all: a plain 404 page too, and never a traceback.
        odd = await http.get("/jobs/1%27%20OR%201=1")
        assert odd.status == 404
        assert "Traceback" not in await text_of(odd)


async def test_a_form_without_its_csrf_token_is_refused_and_changes_nothing(
    world: World,
) -> None:
    store = world.home.server.ctx.store
    http = await signed_in(world.home, world.alice)
    async with http:
        for data in ({"share": "on"}, {"share": "on", "csrf_token": "forged"}):
            refused = await http.post("/settings", data=data, allow_redirects=False)
            assert refused.status == 403
            assert "didn't come from this site" in await text_of(refused)
        assert await store.share_choice(world.alice.id) is None
        # Another member's token doesn't work either.
        other = await signed_in(world.home, world.bob)
        async with other:
            bobs = await csrf_of(other)
        stolen = await http.post(
            "/settings", data={"share": "on", "csrf_token": bobs}, allow_redirects=False
        )
        assert stolen.status == 403
        assert await store.share_choice(world.alice.id) is None
        token = await csrf_of(http)
        saved = await http.post(
            "/settings", data={"share": "on", "csrf_token": token}, allow_redirects=False
        )
        assert saved.status == 303
        assert await store.share_choice(world.alice.id) is True
        await store.set_share(world.alice.id, False)
        # Signing out is a form too.
        assert (await http.post("/signout", allow_redirects=False)).status == 403
        assert (await http.get("/images", allow_redirects=False)).status == 200


async def test_a_sign_in_link_works_once_and_a_forged_one_not_at_all(world: World) -> None:
    home = world.home
    link = await home.sign_in_link(world.alice)
    query = URL(link).query["t"]

    async def redeem(http: aiohttp.ClientSession, token: str) -> aiohttp.ClientResponse:
        csrf = _CSRF.search(await (await http.get(URL(link).path_qs)).text())
        assert csrf
        return await http.post(
            "/signin/link", data={"csrf_token": csrf[1], "t": token}, allow_redirects=False
        )

    # Opening the link (a link preview would) doesn't use it: only the button's POST does.
    async with home.client() as preview:
        assert (await preview.get(URL(link).path_qs)).status == 200
    async with home.client() as first:
        assert (await redeem(first, query)).status == 303
        assert (await first.get("/images", allow_redirects=False)).status == 200
    async with home.client() as replay:
        again = await redeem(replay, query)
        assert again.status == 410
        assert "already used" in await text_of(again)
        assert (await replay.get("/images", allow_redirects=False)).status == 303
    nonce, _, signature = query.partition(".")
    flipped = ("A" if signature[0] != "A" else "B") + signature[1:]
    async with home.client() as forger:
        forged = await redeem(forger, f"{nonce}.{flipped}")
        assert forged.status == 400
        assert "isn't valid" in await text_of(forged)
    # An expired link: past [web] link_ttl_s.
    late = await home.sign_in_link(world.alice)
    async with home.client() as slow:
        await home.bot.core.db.transaction(
            lambda txn: txn.execute("UPDATE web_links SET expires_at = '2000-01-01T00:00:00+00:00'")
        )
        expired = await redeem(slow, URL(late).query["t"])
        assert expired.status == 410
        assert "expired" in await text_of(expired)


async def test_a_tampered_session_cookie_signs_the_member_out(world: World) -> None:
    http = await signed_in(world.home, world.alice)
    async with http:
        value = next(c for c in http.cookie_jar if c.key == SESSION_COOKIE).value
        token = await csrf_of(http)
    session_id, _, signature = value.partition(".")
    changed = session_id[:-1] + ("A" if session_id[-1] != "A" else "B")
    # Cookies sent by hand, exactly as given (a jar may keep and send two of one name).
    async with aiohttp.ClientSession(
        base_url=world.home.url, cookie_jar=aiohttp.DummyCookieJar()
    ) as raw:

        def cookie(text: str) -> dict[str, str]:
            return {"Cookie": f"{SESSION_COOKIE}={text}"}

        for bad in (f"{changed}.{signature}", f"{session_id}.{signature[::-1]}", "x", "a.b.c"):
            out = await raw.get("/images", headers=cookie(bad), allow_redirects=False)
            assert out.status == 303 and out.headers["Location"].startswith("/signin"), bad
            # The bad cookie is cleared.
            assert out.cookies[SESSION_COOKIE].value == ""
        # The untouched cookie still works; signing out ends the session on the server.
        good = await raw.get("/images", headers=cookie(value), allow_redirects=False)
        assert good.status == 200
        out = await raw.post(
            "/signout", data={"csrf_token": token}, headers=cookie(value), allow_redirects=False
        )
        assert out.status == 303
        after = await raw.get("/images", headers=cookie(value), allow_redirects=False)
        assert after.status == 303


async def test_oauth_sign_in_checks_state_and_knows_only_the_servers_members(
    world: World,
) -> None:
    home, fake = world.home, world.home.fake
    fake.oauth.approve_as = world.alice
    try:
        async with home.client() as http:
            start = await http.get("/signin/discord", allow_redirects=False)
            assert start.status == 303
            authorize = URL(start.headers["Location"])
            assert authorize.query["scope"] == "identify"
            assert authorize.query["redirect_uri"] == home.bot.config.web.oauth_redirect_url
            async with aiohttp.ClientSession() as discord_side:
                approved = await discord_side.get(authorize, allow_redirects=False)
            callback = URL(approved.headers["Location"])
            # A state that isn't this browser's: refused, and nobody is signed in.
            wrong = callback.update_query(state="someone-elses")
            refused = await http.get(wrong.path_qs, allow_redirects=False)
            assert refused.status == 400
            done = await http.get(callback.path_qs, allow_redirects=False)
            assert done.status == 303 and done.headers["Location"] == "/images"
            page = await http.get("/images")
            assert "a red fox in the snow" in await text_of(page)
            # The code was used up.
            again = await http.get(callback.path_qs, allow_redirects=False)
            assert again.status in (400, 502)
        # Someone who never used the bot in its servers.
        stranger = fake.add_user("stranger")
        fake.oauth.approve_as = stranger
        async with home.client() as http:
            start = await http.get("/signin/discord", allow_redirects=False)
            async with aiohttp.ClientSession() as discord_side:
                approved = await discord_side.get(start.headers["Location"], allow_redirects=False)
            callback = URL(approved.headers["Location"])
            unknown = await http.get(callback.path_qs, allow_redirects=False)
            assert unknown.status == 403
            assert "doesn't know you yet" in await text_of(unknown)
    finally:
        fake.oauth.approve_as = None


async def test_bad_requests_get_plain_pages_and_limits_get_429(world: World) -> None:
    http = await signed_in(world.home, world.alice)
    ctx = world.home.server.ctx
    async with http:
        for path, status in (
            ("/images?from=yesterday", 400),
            ("/images?aspect=wide", 400),
            ("/images?kind=sculpture", 400),
            ("/images?before=-1", 400),
            ("/images?q=" + "x" * 300, 400),
            ("/nowhere", 404),
        ):
            response = await http.get(path, allow_redirects=False)
            text = await response.text()
            assert response.status == status, path
            assert "Traceback" not in text and "<h1>" in text
            assert response.headers["Content-Security-Policy"].startswith("default-src 'self'")
        # FTS5 syntax typed in the search box is just words.
        hostile = await http.get("/images?q=%22fox%22%20OR%20NEAR(a%20b)%20*%20-")
        assert hostile.status == 200
        saved = ctx.member_limits
        ctx.member_limits = RateLimiter(3)
        try:
            statuses = [(await http.get("/images")).status for _ in range(4)]
            assert statuses == [200, 200, 200, 429]
            limited = await http.get("/images")
            assert "Too many requests" in await text_of(limited)
            assert int(limited.headers["Retry-After"]) >= 1
        finally:
            ctx.member_limits = saved
    # Per address, signed in or not; and sign-in attempts have a tighter limit of their own.
    saved_ip, saved_sign_in = ctx.ip_limits, ctx.sign_in_limits
    ctx.ip_limits, ctx.sign_in_limits = RateLimiter(3), RateLimiter(1)
    try:
        async with world.home.client() as anonymous:
            statuses = [(await anonymous.get("/signin")).status for _ in range(4)]
            assert statuses == [200, 200, 200, 429]
        ctx.ip_limits = RateLimiter(100)
        async with world.home.client() as anonymous:
            first = await anonymous.get("/signin/discord", allow_redirects=False)
            second = await anonymous.get("/signin/discord", allow_redirects=False)
            assert (first.status, second.status) == (303, 429)
            assert "sign-in attempts" in await text_of(second)
    finally:
        ctx.ip_limits, ctx.sign_in_limits = saved_ip, saved_sign_in


async def test_where_to_go_after_signing_in_is_always_this_site(world: World) -> None:
    # Browsers drop tabs and newlines inside an address ("/\t/evil.example" is
    # "//evil.example", another site), and aiohttp's redirect does the same.
    http = await signed_in(world.home, world.alice)
    async with http:
        for target in (
            "/%09/evil.example",
            "%2F%09%2Fevil.example",
            "/%0A/evil.example",
            "/%0D/evil.example",
            "//evil.example",
            "/%5Cevil.example",
            "https://evil.example/",
            "/%09%09/evil.example/x",
        ):
            response = await http.get(f"/signin?next={target}", allow_redirects=False)
            assert response.status == 303, target
            location = URL(response.headers["Location"])
            assert not location.is_absolute() and location.host is None, (target, location)
            assert response.headers["Location"].startswith("/"), target
            assert not response.headers["Location"].startswith("//"), target
        kept = await http.get("/signin?next=/jobs/1%3Fx%3D1", allow_redirects=False)
        assert kept.headers["Location"] == "/jobs/1?x=1"


async def test_odd_numbers_and_dates_get_plain_refusals_never_a_500(world: World) -> None:
    # Superscripts and other scripts' digits pass str.isdigit; ids past 2**63 - 1 overflow
    # SQLite; the last day of the calendar has no next day.
    huge, odd = "9" * 20, "%C2%B2"
    member_paths = (
        f"/jobs/{odd}",
        f"/jobs/{huge}",
        f"/jobs/{world.alice_job}/images/{odd}.png",
        f"/jobs/{world.alice_job}/thumbs/{odd}.jpg",
        f"/jobs/{world.alice_job}/inputs/{odd}",
        f"/images?before={odd}",
        "/images?to=9999-12-31",
        f"/explore?before={odd}",
        f"/explore?guild={odd}",
    )
    admin_paths = (
        f"/admin/credits?user={huge}",
        f"/admin/credits?user={odd}",
        f"/admin/credits?user={world.alice.id}&before={huge}",
        f"/admin/audit?member={huge}",
        f"/admin/audit?before={huge}",
        "/admin/audit?to=9999-12-31",
        f"/admin/queue?server={odd}",
    )
    member = await signed_in(world.home, world.alice)
    owner = await signed_in(world.home, world.home.fake.owner)
    db = world.home.bot.core.db
    ledger = [tuple(r) for r in await db.read("SELECT * FROM ledger ORDER BY id")]
    async with member, owner:
        for http, paths in ((member, member_paths), (owner, admin_paths)):
            for path in paths:
                response = await http.get(path, allow_redirects=False)
                # The last day is a day like any other; the rest isn't a number here.
                expected = (200,) if "9999-12-31" in path else range(400, 500)
                assert response.status in expected, (path, response.status)
                assert "Traceback" not in await response.text()
        token = await csrf_of(owner)
        forms = (
            ("/admin/credits/grant", {"user": huge, "amount": "5", "reason": "x"}),
            ("/admin/credits/set", {"user": str(world.alice.id), "amount": "²", "reason": "x"}),
            ("/admin/allowances/member", {"user": huge, "amount": "5"}),
            ("/admin/allowances/role", {"role": huge, "amount": "5"}),
            ("/admin/allowances/member", {"user": str(world.alice.id), "amount": "²"}),
        )
        for path, form in forms:
            response = await owner.post(path, data={**form, "csrf_token": token})
            assert 400 <= response.status < 500, (path, form, response.status)
    assert [tuple(r) for r in await db.read("SELECT * FROM ledger ORDER BY id")] == ledger


async def test_images_the_safety_filter_withheld_are_not_on_the_web_either(
    tmp_path: Path, bot_engine_settings: Any, shared_engine: Any
) -> None:
    # A withheld job is refused and refunded, but its files stay on disk (the audit's
    # evidence) and its result still names them: the web home must not serve them.
    from tests.bot.test_discord_e2e import FlaggedImageEngine

    async with web_home(
        tmp_path / "data",
        bot_engine_settings,
        FlaggedImageEngine(shared_engine),
        moderation={"nsfw_policy": "withhold"},
    ) as home:
        alice = home.fake.add_user("alice")
        asked = await home.fake.slash(alice, "imagine", prompt="an abstract mosaic")
        await asked.wait_original(lambda m: "refunded" in m.content, timeout=JOB_TIMEOUT_S)
        job = (await home.bot.core.jobs.for_user(alice.id))[0]
        assert job.state is JobState.REFUSED and job.result and job.result.image_paths
        grid = job.grid_file(home.bot.config.data_dir)
        assert grid is not None and grid.is_file()
        http = await signed_in(home, alice)
        async with http:
            page = await http.get(f"/jobs/{job.id}")
            assert page.status == 200
            assert f"/jobs/{job.id}/images/" not in await page.text()
            gallery = await (await http.get("/images")).text()
            assert "an abstract mosaic" in html.unescape(gallery)
            assert f"/jobs/{job.id}/thumbs/" not in gallery
            for path in (
                f"/jobs/{job.id}/images/0.png",
                f"/jobs/{job.id}/images/1.png?download=1",
                f"/jobs/{job.id}/thumbs/0.jpg",
                f"/jobs/{job.id}/thumbs/1.jpg",
            ):
                assert (await http.get(path)).status == 404, path


async def test_images_posted_as_spoilers_are_not_in_explore_for_others(
    tmp_path: Path, bot_engine_settings: Any, shared_engine: Any
) -> None:
    # Discord hides flagged images behind a spoiler; Explore would show them to every member
    # of the server in the clear. Their owner still sees them in My images.
    from tests.bot.test_discord_e2e import FlaggedImageEngine

    async with web_home(
        tmp_path / "data",
        bot_engine_settings,
        FlaggedImageEngine(shared_engine),
        moderation={"nsfw_policy": "spoiler"},
    ) as home:
        alice, bob = home.fake.add_user("alice"), home.fake.add_user("bob")
        job_id = job_id_of(await home.imagine(alice, "an abstract mosaic"))
        await home.imagine(bob, "bob's own picture")
        await home.server.ctx.store.set_share(alice.id, True)
        paths = (
            f"/jobs/{job_id}",
            f"/jobs/{job_id}/images/1.png",
            f"/jobs/{job_id}/thumbs/0.jpg",
        )
        async with await signed_in(home, alice) as owner:
            assert f"/jobs/{job_id}/thumbs/0.jpg" in await (await owner.get("/images")).text()
            for path in paths:
                assert (await owner.get(path)).status == 200, path
        async with await signed_in(home, bob) as other:
            explore = await (await other.get("/explore")).text()
            assert "Explore" in explore and f'href="/jobs/{job_id}"' not in explore
            for path in paths:
                assert (await other.get(path)).status == 404, path


async def test_a_form_that_is_not_utf8_is_a_plain_400(world: World) -> None:
    store = world.home.server.ctx.store
    before = await store.share_choice(world.alice.id)
    http = await signed_in(world.home, world.alice)
    async with http:
        token = await csrf_of(http)
        form = {"Content-Type": "application/x-www-form-urlencoded"}
        for headers in ({**form, "X-CSRF-Token": token}, form):
            for path in ("/settings", "/signout", "/admin/credits/grant"):
                response = await http.post(
                    path, data=b"share=\xff\xfe&csrf_token=" + token.encode(), headers=headers
                )
                assert response.status == 400, (path, headers, response.status)
                assert "Traceback" not in await response.text()
        assert (await http.get("/images", allow_redirects=False)).status == 200
    assert await store.share_choice(world.alice.id) == before


async def test_a_shared_jobs_page_shows_no_taste_weights(world: World) -> None:
    # A --p job's request carries its owner's taste (a direction learned from their private
    # ratings): the page says it was personalized, and shows nobody the numbers.
    db, store = world.home.bot.core.db, world.home.server.ctx.store
    row = await db.read_one("SELECT request FROM jobs WHERE id = ?", (world.alice_job,))
    assert row is not None
    taste = {"weights": [0.8125, -0.4375, 0.0625], "space": "vit-l-14", "strength": 1.0}
    tasted = json.dumps({**json.loads(row["request"]), "personalize": taste})
    choice = await store.share_choice(world.alice.id)

    async def set_request(text: str) -> None:
        await db.transaction(
            lambda txn: txn.execute(
                "UPDATE jobs SET request = ? WHERE id = ?", (text, world.alice_job)
            )
        )

    await set_request(tasted)
    await store.set_share(world.alice.id, True)
    try:
        for user in (world.alice, world.bob):
            http = await signed_in(world.home, user)
            async with http:
                page = await http.get(f"/jobs/{world.alice_job}")
                assert page.status == 200, user.name
                text = await text_of(page)
            assert "0.8125" not in text and "vit-l-14" not in text, user.name
            assert "<th>personalize</th><td>yes</td>" in text, user.name
    finally:
        await set_request(row["request"])
        if choice is not None:
            await store.set_share(world.alice.id, choice)
        else:
            await db.transaction(
                lambda txn: txn.execute(
                    "DELETE FROM explore_sharing WHERE user_id = ?", (world.alice.id,)
                )
            )
