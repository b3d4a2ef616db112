"""A member's web home in a real browser (Debian's Chromium driven by Playwright) against the
real bot wiring and the fake Discord: signing in with Discord's OAuth and with a /web link (and
the link's replay refused), My images with search and filters, a job's page with its copy
button, its pictures and its PNG download (metadata intact), Explore and its sharing switch,
and thumbnails served once and then from cache. Every page is kept as a screenshot."""

from __future__ import annotations

import asyncio
import html
import io
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from PIL import Image

from bot.core.execute import safe_path
from bot.core.models import Job
from tests.bot.helpers import job_id_of
from tests.fakediscord import Upload
from tests.fakediscord.model import Message, User
from tests.web.harness import BROWSER_GROUP, WebHome, chromium, keep_screenshot, web_home

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.xdist_group(BROWSER_GROUP)]


@dataclass
class World:
    home: WebHome
    alice: User
    bob: User
    fox: Message
    lighthouse: Message
    frog: Message

    async def job(self, message: Message) -> Job:
        return await self.home.bot.core.jobs.require(job_id_of(message))


def _png(colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (96, 64), colour).save(buffer, "PNG")
    return buffer.getvalue()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def world(
    tmp_path_factory: pytest.TempPathFactory, bot_engine_settings: Any, shared_engine: Any
) -> AsyncIterator[World]:
    data = tmp_path_factory.mktemp("web-members") / "data"
    async with web_home(data, bot_engine_settings, shared_engine) as home:
        alice = home.fake.add_user("alice")
        bob = home.fake.add_user("bob")
        fox = await home.imagine(alice, "a red fox in the snow --ar 3:2", seed=11)
        lighthouse = await home.imagine(
            alice,
            "a blue lighthouse at dusk",
            seed=12,
            image=Upload("sky.png", _png((20, 40, 200))),
        )
        frog = await home.imagine(bob, "a green frog on a leaf", seed=13)
        yield World(home, alice, bob, fox, lighthouse, frog)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def browser(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Any]:
    async with chromium(tmp_path_factory.mktemp("chromium")) as context:
        yield context


async def cards(page: Any) -> list[str]:
    return [await c.inner_text() for c in await page.query_selector_all("li.card .prompt")]


async def sign_out(page: Any) -> None:
    if await page.query_selector("form.signout button"):
        await page.click("form.signout button")
        await page.wait_for_url("**/signin")


async def test_oauth_sign_in_my_images_search_and_a_jobs_page(
    world: World, browser: Any, tmp_path: Path
) -> None:
    home, alice = world.home, world.alice
    page = await browser.new_page()
    await sign_out(page)
    await page.goto(home.url + "/images")
    # Signed out: sent to the sign-in page, which remembers where to come back to.
    assert "/signin?next=" in page.url
    await keep_screenshot(page, "01-sign-in", tmp_path)
    await page.click("#signin-discord")
    await page.wait_for_selector("a.authorize")
    await keep_screenshot(page, "02-discord-authorize", tmp_path)
    await page.click(f'a.authorize[data-user="{alice.id}"]')
    await page.wait_for_url(home.url + "/images")

    # My images: alice's two jobs, newest first, thumbnails loaded; nothing of bob's.
    shown = await cards(page)
    assert [t.split()[2] for t in shown] == ["lighthouse", "fox"], shown
    assert not any("frog" in t for t in shown)
    loaded = await page.eval_on_selector_all(
        "li.card img", "imgs => imgs.map(i => i.complete && i.naturalWidth > 0)"
    )
    assert loaded == [True, True]
    await keep_screenshot(page, "03-my-images", tmp_path)

    await page.fill("input[name=q]", "fox")
    await page.click(".filters button[type=submit]")
    await page.wait_for_url("**/images?q=fox*")
    assert len(await cards(page)) == 1 and "red fox" in (await cards(page))[0]
    await keep_screenshot(page, "04-my-images-search", tmp_path)
    # The aspect filter: the 3:2 fox is landscape, the square lighthouse is not.
    await page.goto(home.url + "/images?aspect=landscape")
    assert [c.split()[2] for c in await cards(page)] == ["fox"]
    await page.goto(home.url + "/images?aspect=square")
    assert [c.split()[2] for c in await cards(page)] == ["lighthouse"]
    await page.goto(home.url + "/images?kind=variation")
    assert await cards(page) == []

    # The fox's page: prompt, parameters and seeds, A1111 text, copy button, download.
    fox = await world.job(world.fox)
    await page.goto(home.url + "/images")
    await page.click(f'li.card[data-job="{fox.id}"] a')
    await page.wait_for_url(f"{home.url}/jobs/{fox.id}")
    assert await page.inner_text("#prompt") == fox.prompt
    table = await page.inner_text("table.parameters")
    assert str(fox.result.seeds[0]) in table and "model" in table
    parameters = await page.text_content("#parameters-1") or ""
    assert f"Seed: {fox.result.seeds[0]}" in parameters
    assert await page.eval_on_selector_all("figure img", "i => i.length") == 4
    record = (await home.bot.core.jobs.deliveries(fox.id))["result"]
    link = await page.get_attribute("#discord-link", "href")
    assert link == (
        f"{home.fake.url}/channels/{home.fake.guild_id}/"
        f"{record.info['channel_id']}/{record.info['message_id']}"
    )
    await keep_screenshot(page, "05-job", tmp_path)

    await browser.grant_permissions(["clipboard-read", "clipboard-write"], origin=home.url)
    await page.click('button[data-copy="#prompt"]')
    await page.wait_for_selector('button[data-copy="#prompt"].copied')
    assert await page.evaluate("navigator.clipboard.readText()") == fox.prompt

    async with page.expect_download() as download_info:
        await page.click("#download-1")
    download = await download_info.value
    saved = Path(await download.path())
    stored = safe_path(home.bot.config.data_dir, fox.result.image_paths[0])
    served, kept = (
        await asyncio.to_thread(saved.read_bytes),
        await asyncio.to_thread(stored.read_bytes),
    )
    assert served == kept, "the PNG is served as stored"
    with Image.open(io.BytesIO(served)) as png:
        text = png.info["parameters"]
    assert text.startswith(fox.prompt)
    assert f"Seed: {fox.result.seeds[0]}" in text
    assert download.suggested_filename == f"imagine-{fox.id}-1.png"

    # The lighthouse had a picture: the owner sees it on the job's page.
    lighthouse = await world.job(world.lighthouse)
    await page.goto(f"{home.url}/jobs/{lighthouse.id}")
    await page.wait_for_selector(".inputs img")
    size = await page.eval_on_selector(".inputs img", "i => [i.naturalWidth, i.naturalHeight]")
    assert size == [96, 64]
    await keep_screenshot(page, "06-job-with-pictures", tmp_path)
    await page.close()


async def test_the_grid_in_discord_links_to_its_page(world: World) -> None:
    fox = await world.job(world.fox)
    web = [b for b in world.fox.buttons if b.get("label") == "Web"]
    assert web == [{**web[0], "url": f"{world.home.url}/jobs/{fox.id}", "style": 5}]


async def test_a_web_link_signs_in_once_and_a_replay_is_refused(
    world: World, browser: Any, tmp_path: Path
) -> None:
    home = world.home
    page = await browser.new_page()
    await page.goto(home.url + "/images")
    await sign_out(page)
    link = await home.sign_in_link(world.bob)
    await page.goto(link)
    await keep_screenshot(page, "07-web-link", tmp_path)
    await page.click("#signin-link")
    await page.wait_for_url(home.url + "/images")
    assert [c.split()[2] for c in await cards(page)] == ["frog"]
    await keep_screenshot(page, "08-my-images-via-link", tmp_path)
    await sign_out(page)

    await page.goto(link)
    response_status = []
    page.on("response", lambda r: response_status.append(r.status))
    await page.click("#signin-link")
    await page.wait_for_selector("p.message")
    assert 410 in response_status
    assert "already used" in html.unescape(await page.inner_text("p.message"))
    assert await page.query_selector("form.signout") is None
    await keep_screenshot(page, "09-web-link-replayed", tmp_path)
    await page.close()


async def test_explore_shows_only_what_owners_share(
    world: World, browser: Any, tmp_path: Path
) -> None:
    home, fake = world.home, world.home.fake
    frog = await world.job(world.frog)
    page = await browser.new_page()
    await page.goto(home.url + "/images")
    await sign_out(page)
    await page.goto(await home.sign_in_link(world.alice))
    await page.click("#signin-link")
    await page.wait_for_url(home.url + "/images")

    await page.goto(home.url + "/explore")
    assert not any("frog" in c for c in await cards(page))
    assert (await page.goto(f"{home.url}/jobs/{frog.id}")).status == 404

    # Bob turns sharing on in Discord's /settings.
    panel = await fake.slash(world.bob, "settings")
    settings = await panel.wait_original(lambda m: "Share in Explore: off" in str(m.buttons))
    press = await fake.click(world.bob, settings, label="Share in Explore: off")
    await press.wait_for(lambda i: i.acked)
    assert await home.server.ctx.store.share_choice(world.bob.id) is True

    await page.goto(home.url + "/explore")
    assert [c.split()[2] for c in await cards(page)] == ["frog"]
    await keep_screenshot(page, "10-explore", tmp_path)
    await page.click(f'li.card[data-job="{frog.id}"] a')
    await page.wait_for_url(f"{home.url}/jobs/{frog.id}")
    assert await page.inner_text("#prompt") == frog.prompt
    # Someone else's job: no cost, no pictures of theirs.
    assert "cost" not in await page.inner_text("table.parameters")
    assert (await page.goto(f"{home.url}/jobs/{frog.id}/inputs/0")).status == 404

    # Alice's own switch on the web: the settings page's form (with its CSRF token).
    await page.goto(home.url + "/settings")
    assert await page.inner_text("#share-state") == "off"
    await keep_screenshot(page, "11-settings", tmp_path)
    await page.click("#share-toggle")
    await page.wait_for_url(home.url + "/settings")
    assert await page.inner_text("#share-state") == "on"
    assert await home.server.ctx.store.share_choice(world.alice.id) is True

    # Bob stops sharing: his job is a 404 again for alice.
    await home.server.ctx.store.set_share(world.bob.id, False)
    assert (await page.goto(f"{home.url}/jobs/{frog.id}")).status == 404
    await page.close()


async def test_thumbnails_are_made_once_and_then_served_from_cache(world: World) -> None:
    home = world.home
    fox = await world.job(world.fox)
    thumbnails = home.server.ctx.thumbnails
    link = await home.sign_in_link(world.alice)
    from tests.web.test_web_security import signed_in

    http = await signed_in(home, world.alice)
    del link
    async with http:
        path = f"/jobs/{fox.id}/thumbs/2.jpg"
        made = thumbnails.made
        first = await http.get(path)
        body = await first.read()
        assert first.status == 200 and first.content_type == "image/jpeg"
        assert "max-age" in first.headers["Cache-Control"]
        etag = first.headers["ETag"]
        assert thumbnails.made == made + 1
        with Image.open(io.BytesIO(body)) as thumb:
            assert max(thumb.size) <= 384
        cached = await http.get(path, headers={"If-None-Match": etag})
        assert cached.status == 304 and cached.headers["ETag"] == etag
        again = await http.get(path)
        assert await again.read() == body
        assert thumbnails.made == made + 1, "the second request was served from disk"
