"""Pictures are fetched last: a command is refused for its cooldown, its prompt, the queue
limits or the credits before any of its links or attachments is downloaded or decoded, and what
is fetched is fetched a few at a time, per member and for the whole bot.

The app-level tests replace only the network (the fetch function records each call and hands
back a picture); the last test is the reported burst end to end, through the fake Discord and
its CDN, with a real tiny engine."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from bot.app.actions import Actor, UserError
from bot.app.application import ImagineApp, open_core, picture_inputs
from bot.app.fetch import FetchedImage, FetchPolicy, FetchRefused
from bot.app.inputs import InputScreen
from bot.config import Config
from bot.core import InProcessWorker
from tests.bot.test_bad_input import _config
from tests.core.fakes import create_fake_engine

ALICE = Actor(user_id=11, guild_id=1, channel_id=2)  # has no credits
BOB = Actor(user_id=22, guild_id=1, channel_id=2)
LINKS = [f"https://cdn.discordapp.com/attachments/1/{n}/p{n}.png" for n in range(1, 41)]
BURST = "{" + ", ".join(LINKS) + "} cat"


class Network:
    """Stands in for the internet: records each fetch, and holds it until released when
    `gated`, to see how many run at once."""

    def __init__(self, gated: bool = False, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.started: list[str] = []
        self.running = 0
        self.peak = 0
        self.gate = asyncio.Event()
        if not gated:
            self.gate.set()

    async def fetch(self, url: str, policy: FetchPolicy) -> FetchedImage:
        self.started.append(url)
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            await self.gate.wait()
            if "broken" in url:
                raise FetchRefused("the link answered HTTP 404")
            await asyncio.sleep(self.delay_s)
        finally:
            self.running -= 1
        return FetchedImage(Image.new("RGB", (64, 64), (9, 9, 9)), url, "ab" * 32, "PNG")

    async def attachment(self, attachment: Any, policy: FetchPolicy) -> FetchedImage:
        return await self.fetch(str(attachment.url), policy)


class Upload:
    def __init__(self, filename: str) -> None:
        self.filename, self.size = filename, 100
        self.url = f"https://cdn.discordapp.com/attachments/1/9/{filename}"


def config(tmp_path: Path, **changes: Any) -> Config:
    base = _config(tmp_path)
    credits = dataclasses.replace(base.credits, daily_allowance=0)
    scheduler = dataclasses.replace(base.scheduler, **changes.pop("scheduler", {}))
    images = dataclasses.replace(base.images, **changes.pop("images", {}))
    discord = dataclasses.replace(base.discord, **changes.pop("discord", {}))
    return dataclasses.replace(
        base, credits=credits, scheduler=scheduler, images=images, discord=discord
    )


@pytest.fixture
async def opened(tmp_path: Path) -> AsyncIterator[Any]:
    made: list[Any] = []

    async def open_app(network: Network, **changes: Any) -> ImagineApp:
        settings = config(tmp_path, **changes)
        worker = InProcessWorker(settings.engine, settings.data_dir, create_fake_engine)
        core = await open_core(settings, lambda _c: False, workers=[worker])
        made.append(core)
        screen = InputScreen(dataclasses.replace(settings.moderation, nsfw_check=False), bool)
        pictures = picture_inputs(settings, screen)
        pictures._fetch, pictures._fetch_attachment = network.fetch, network.attachment
        app = ImagineApp(settings, core, seed_source=lambda: 1234, pictures=pictures)
        await core.admin.grant(user_id=BOB.user_id, amount=10_000, actor_id=1)
        return app

    yield open_app
    for core in made:
        await core.close(drain_timeout_s=5.0)


async def test_no_credits_means_nothing_is_fetched(opened: Any) -> None:
    network = Network()
    app: ImagineApp = await opened(network, scheduler={"max_queued_per_user": 100})
    with pytest.raises(UserError, match="Not enough credits: these 40 jobs cost"):
        await app.imagine(ALICE, BURST)
    with pytest.raises(UserError, match="Not enough credits"):
        await app.imagine(ALICE, "a cat", attachments=[Upload("a.png")])
    with pytest.raises(UserError, match="Not enough credits"):
        await app.blend(ALICE, [Upload("a.png"), Upload("b.png")])
    with pytest.raises(UserError, match="Not enough credits"):
        await app.describe(ALICE, LINKS[0])
    assert network.started == []


async def test_a_full_queue_a_bad_prompt_or_a_paused_queue_fetch_nothing(opened: Any) -> None:
    network = Network()
    app: ImagineApp = await opened(network)  # 100 queued per member in this config
    before = (await app.core.credits.balance(BOB.user_id)).available
    (small,) = [await app.imagine(BOB, "a dog")]
    assert small
    many = "{" + ", ".join(LINKS[:3]) + "} cat --ar 0:1"
    with pytest.raises(UserError, match="--ar"):
        await app.imagine(BOB, many)
    with pytest.raises(UserError, match=r"--sref"):
        await app.imagine(BOB, "a cat --sref", attachments=[Upload("a.png")])
    await app.core.scheduler.set_paused(True)
    with pytest.raises(UserError, match="paused"):
        await app.imagine(BOB, LINKS[0] + " a cat")
    await app.core.scheduler.set_paused(False)
    assert network.started == []
    # The same prompt with room and credits does fetch: the refusals above were the checks.
    (job,) = await app.imagine(BOB, LINKS[0] + " a cat")
    assert network.started == [LINKS[0]] and job.job.cost > 0
    assert (await app.core.credits.balance(BOB.user_id)).available < before


async def test_the_cooldown_is_taken_on_entry_so_a_burst_fetches_once(opened: Any) -> None:
    network = Network(gated=True)
    app: ImagineApp = await opened(
        network, scheduler={"max_queued_per_user": 100}, discord={"command_cooldown_s": 30.0}
    )
    prompt = "{" + ", ".join(LINKS[:3]) + "} cat"
    burst = [asyncio.ensure_future(app.imagine(BOB, prompt)) for _ in range(5)]
    await asyncio.sleep(0.2)
    network.gate.set()
    results = await asyncio.gather(*burst, return_exceptions=True)
    refused = [r for r in results if isinstance(r, UserError)]
    assert len(refused) == 4 and all("Slow down" in str(r) for r in refused), results
    assert sorted(network.started) == sorted(LINKS[:3])


async def test_fetches_run_a_few_at_a_time_per_member_and_for_the_bot(opened: Any) -> None:
    network = Network(gated=True)
    app: ImagineApp = await opened(
        network,
        scheduler={"max_queued_per_user": 100},
        images={"max_fetches": 3, "max_fetches_per_member": 2},
    )
    carol = Actor(user_id=33, guild_id=1, channel_id=2)
    await app.core.admin.grant(user_id=carol.user_id, amount=10_000, actor_id=1)
    bob_job = asyncio.ensure_future(app.imagine(BOB, BURST))
    carol_job = asyncio.ensure_future(app.imagine(carol, LINKS[-1] + " a fox"))
    await asyncio.sleep(0.3)
    # Bob's 40 links: two at a time; Carol's one gets the bot's third slot meanwhile.
    assert network.running == 3 and LINKS[-1] in network.started
    assert app.pictures.in_flight == 3
    network.gate.set()
    assert len(await bob_job) == 40 and len(await carol_job) == 1
    assert network.peak == 3 and app.pictures.peak_in_flight == 3
    assert len(set(network.started)) == 40


async def test_the_first_refused_link_calls_off_the_rest(opened: Any) -> None:
    network = Network(delay_s=0.2)  # a download takes a while; a 404 comes at once
    app: ImagineApp = await opened(network, scheduler={"max_queued_per_user": 100})
    links = [LINKS[0], "https://cdn.discordapp.com/attachments/1/2/broken.png", *LINKS[1:38]]
    prompt = "{" + ", ".join(links) + "} cat"
    before = (await app.core.credits.balance(BOB.user_id)).available
    with pytest.raises(UserError, match=r"broken\.png: the link answered HTTP 404"):
        await app.imagine(BOB, prompt)
    # Two at a time: the broken one is the second, so few of the other 38 ever started.
    assert len(network.started) <= 4
    assert (await app.core.credits.balance(BOB.user_id)).available == before


async def test_a_burst_without_credits_fetches_nothing_and_others_are_served(
    tmp_path: Path, bot_engine_settings: Any, shared_engine: Any
) -> None:
    """The reported burst: five `/imagine {link1,…,link40} cat` at once from a member with no
    credits started 200 fetches. Now none starts, and another member is answered meanwhile."""
    from bot.discord.client import ImagineBot
    from tests.bot.conftest import bot_config, in_process_workers
    from tests.bot.helpers import JOB_TIMEOUT_S, assert_ledger_consistent, available
    from tests.bot.test_discord_images import FAKE_CDN, is_result, png
    from tests.fakediscord import FakeDiscord

    async with FakeDiscord() as fake:
        alice, bob = fake.add_user("alice"), fake.add_user("bob")
        links = [fake.host_file(f"p{n}.png", png((n, 0, 0))) for n in range(40)]
        settings = bot_config(
            tmp_path / "data",
            bot_engine_settings,
            fake.guild_id,
            credits={"daily_allowance": 0},
            scheduler={"max_queued_per_user": 100, "max_queue": 1000},
            discord={"command_cooldown_s": 5.0},
        )
        bot = ImagineBot(
            settings,
            core_options={"workers": in_process_workers(settings, shared_engine)},
            fetch_policy=FAKE_CDN,
            guild_ready_timeout=0.05,
        )
        async with fake.run_bot(bot):
            await bot.core.admin.grant(user_id=bob.id, amount=1000, actor_id=1)
            prompt = "{" + ", ".join(links) + "} cat"
            burst = await asyncio.gather(
                *(fake.slash(alice, "imagine", prompt=prompt) for _ in range(5))
            )
            other = await fake.slash(bob, "imagine", prompt="a lighthouse --style [a](https://e.x)")
            refusals = [
                await job.wait_message(lambda m: m.ephemeral and m.content) for job in burst
            ]
            assert all(
                "Not enough credits" in m.content or "Slow down" in m.content for m in refusals
            ), [m.content for m in refusals]
            assert any("Not enough credits: these 40 jobs cost" in m.content for m in refusals)
            # Bob's job runs and is posted; its note shows his ignored flag as a code span.
            grid = await other.wait_message(is_result, timeout=JOB_TIMEOUT_S)
            assert "`--style [a](https://e.x)` ignored (Midjourney style)" in grid.content
            assert fake.count("GET", "/cdn/attachments/*") == 0
            assert await available(bot, alice.id) == 0
            await assert_ledger_consistent(bot)
