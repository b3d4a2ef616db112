"""The fake Discord, exercised by the real discord.py client through a small throwaway bot.

The bot here is not the project's bot: it only has what it takes to cover the wire protocol the
project's bot relies on (defer → edit → follow-up with a file and buttons, DynamicItem buttons
across a restart, subcommand groups, attachment options, and the error paths).
"""

from __future__ import annotations

import asyncio
import io
import signal
import struct
import textwrap
import zlib
from pathlib import Path
from typing import Any

import aiohttp
import discord
import pytest
from discord import app_commands
from discord.ext import commands
from discord.webhook.async_ import async_context, interaction_response_params

from tests.fakediscord import (
    MANAGE_GUILD,
    CommandNotPermitted,
    FakeDiscord,
    SchemaViolation,
    Upload,
)
from tests.fakediscord.model import ATTACH_FILES, SEND_MESSAGES_IN_THREADS, VIEW_CHANNEL


def png(width: int, height: int) -> bytes:
    """A valid RGB PNG, small enough to build inline."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        body = tag + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    rows = b"".join(b"\x00" + b"\xff\x00\x00" * width for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


# -- the throwaway bot -------------------------------------------------------------------------


class Pick(discord.ui.DynamicItem[discord.ui.Button], template=r"pick:(?P<job>\d+):(?P<index>\d)"):
    """A button whose custom_id carries its state, so it works after a restart."""

    def __init__(self, job: int, index: int) -> None:
        super().__init__(discord.ui.Button(label=f"U{index}", custom_id=f"pick:{job}:{index}"))
        self.job = job
        self.index = index

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction, item: discord.ui.Button, match: Any
    ) -> Pick:
        return cls(int(match["job"]), int(match["index"]))

    async def callback(self, interaction: discord.Interaction) -> None:
        await interaction.response.send_message(f"picked {self.job}:{self.index}", ephemeral=True)


class AgainView(discord.ui.View):
    """A classic persistent view: fixed custom_id, registered with add_view()."""

    def __init__(self) -> None:
        super().__init__(timeout=None)

    @discord.ui.button(label="again", custom_id="again")
    async def again(self, interaction: discord.Interaction, button: discord.ui.Button) -> None:
        await interaction.response.edit_message(content="again!", view=None)


class FeedbackModal(discord.ui.Modal, title="Feedback"):
    text: discord.ui.TextInput = discord.ui.TextInput(label="Your words", custom_id="text")

    def __init__(self, topic: str) -> None:
        super().__init__(custom_id="feedback")
        self.topic = topic

    async def on_submit(self, interaction: discord.Interaction) -> None:
        await interaction.response.send_message(f"thanks: {self.topic}: {self.text.value}")


class TopicView(discord.ui.View):
    @discord.ui.select(
        custom_id="topic",
        options=[discord.SelectOption(label=t, value=t) for t in ("bugs", "ideas")],
    )
    async def topic(self, interaction: discord.Interaction, select: discord.ui.Select) -> None:
        await interaction.response.send_modal(FeedbackModal(select.values[0]))


class ProbeBot(commands.Bot):
    """Records what discord.py saw, so tests can assert on the client's side too."""

    def __init__(self, guild_id: int) -> None:
        super().__init__(
            command_prefix="!",
            intents=discord.Intents.default(),
            guild_ready_timeout=0.05,
            help_command=None,
        )
        self.guild_id = guild_id
        self.gate = asyncio.Event()
        self.outcomes: dict[str, Any] = {}

    async def setup_hook(self) -> None:
        self.add_dynamic_items(Pick)
        self.add_view(AgainView())
        self.outcomes["seen"] = []
        await self.tree.sync()
        await self.tree.sync(guild=discord.Object(self.guild_id))

    async def on_message(self, message: discord.Message) -> None:
        if message.author != self.user:
            self.outcomes["seen"].append(message.content)


def make_bot(guild_id: int) -> ProbeBot:
    bot = ProbeBot(guild_id)

    @bot.tree.command(name="draw", description="Draw a picture")
    @app_commands.describe(prompt="What to draw", seed="Random seed", style="Look")
    @app_commands.choices(style=[app_commands.Choice(name=n, value=n) for n in ("photo", "sketch")])
    async def draw(
        interaction: discord.Interaction,
        prompt: app_commands.Range[str, 1, 100],
        seed: app_commands.Range[int, 0, 1000] = 0,
        style: str = "photo",
    ) -> None:
        await interaction.response.defer()
        await interaction.edit_original_response(content="drawing 50%")
        await interaction.edit_original_response(
            content=f"{prompt} ({style})",
            attachments=[discord.File(io.BytesIO(png(4, 2)), "grid.png")],
        )
        view = discord.ui.View(timeout=None)
        for index in range(1, 5):
            view.add_item(Pick(seed, index))
        view.add_item(discord.ui.Button(label="locked", custom_id="locked", disabled=True))
        view.add_item(AgainView().again)
        await interaction.followup.send(
            f"{interaction.user.mention} done: {prompt}",
            file=discord.File(io.BytesIO(png(2, 2)), "up.png"),
            view=view,
            allowed_mentions=discord.AllowedMentions(users=[interaction.user]),
        )

    @bot.tree.command(name="describe", description="Describe an image")
    async def describe(interaction: discord.Interaction, image: discord.Attachment) -> None:
        data = await image.read()
        await interaction.response.send_message(
            f"{image.filename}: {len(data)} bytes", ephemeral=True
        )

    @bot.tree.command(name="feedback", description="Tell us something")
    async def feedback(interaction: discord.Interaction) -> None:
        await interaction.response.send_message("pick a topic", view=TopicView(), ephemeral=True)

    @bot.tree.command(name="probe", description="Exercise an error path")
    @app_commands.choices(
        mode=[
            app_commands.Choice(name=n, value=n)
            for n in (
                "double_ack",
                "expired",
                "followup",
                "late_ack",
                "oversize",
                "perms",
                "reply",
            )
        ]
    )
    async def probe(interaction: discord.Interaction, mode: str) -> None:
        if mode == "late_ack":
            await bot.gate.wait()
            try:
                await interaction.response.defer()
            except discord.NotFound as error:
                bot.outcomes[mode] = error.code
            return
        if mode == "perms":
            # Interaction responses work anywhere; a bot-token send obeys the channel.
            await interaction.response.send_message("checking", ephemeral=True)
            channel = interaction.channel
            assert isinstance(channel, discord.TextChannel | discord.Thread)
            assert interaction.guild is not None and interaction.guild.me is not None
            seen = {
                "app": interaction.app_permissions,
                "cached": channel.permissions_for(interaction.guild.me),
            }
            try:
                await channel.send("img", file=discord.File(io.BytesIO(png(1, 1)), "x.png"))
                seen["send"] = "sent"
            except discord.HTTPException as error:
                seen["send"] = (error.status, error.code)
            bot.outcomes[f"perms:{channel.name}"] = seen
            return
        if mode == "reply":
            receipt = discord.File(io.BytesIO(png(1, 1)), "receipt.png")
            await interaction.response.send_message("ok", file=receipt, ephemeral=True)
            first = await interaction.channel.send("first")
            await first.edit(content="first (edited)")
            await first.reply("second", mention_author=False)
            await interaction.user.send("psst")
            return
        await interaction.response.defer(thinking=True)
        try:
            if mode == "double_ack":
                # discord.py refuses a second response itself, so go through its HTTP adapter
                # the way a second process handling the same interaction would.
                await async_context.get().create_interaction_response(
                    interaction.id,
                    interaction.token,
                    session=interaction._session,
                    params=interaction_response_params(5),
                )
            elif mode == "expired":
                await bot.gate.wait()
                await interaction.followup.send("your picture")
            elif mode == "followup":
                await interaction.followup.send("here it is")
            elif mode == "oversize":
                bot.outcomes["filesize_limit"] = interaction.filesize_limit
                big = discord.File(io.BytesIO(b"x" * (interaction.filesize_limit + 1)), "big.png")
                await interaction.followup.send("big", file=big)
        except discord.HTTPException as error:
            bot.outcomes[mode] = (error.status, error.code)
            if error.code == 50027:
                # The token is dead: deliver with the bot token instead, mentioning the user.
                await interaction.channel.send(f"{interaction.user.mention} your picture")

    admin = app_commands.Group(
        name="admin",
        description="Admin commands",
        guild_ids=[guild_id],
        default_permissions=discord.Permissions(manage_guild=True),
    )
    credits = app_commands.Group(name="credits", description="Credits", parent=admin)

    @credits.command(name="grant", description="Grant credits")
    @app_commands.checks.has_permissions(manage_guild=True)
    async def grant(
        interaction: discord.Interaction,
        user: discord.Member,
        amount: app_commands.Range[int, 1, 100],
    ) -> None:
        await interaction.response.send_message(
            f"granted {amount} to {user.display_name}", ephemeral=True
        )

    @grant.error
    async def grant_error(interaction: discord.Interaction, error: Exception) -> None:
        await interaction.response.send_message("not allowed", ephemeral=True)

    bot.tree.add_command(admin)
    return bot


# -- tests -------------------------------------------------------------------------------------


async def test_slash_defer_edits_followup_with_file_and_buttons() -> None:
    async with FakeDiscord() as fake:
        alice = fake.add_user("alice")
        async with fake.run_bot(make_bot(fake.guild_id)):
            assert fake.command("draw")["options"][0]["max_length"] == 100

            job = await fake.slash(alice, "draw", prompt="a red fox", seed=7, style="sketch")
            assert await job.wait_acked() == 5
            assert job.ack_latency is not None and job.ack_latency < 1.0
            result = await job.wait_followup(lambda m: m.attachments)

            # Every state of the deferred message, in order: thinking, progress, result.
            original = job.original
            assert original is not None and not original.loading
            assert original.contents == ["", "drawing 50%", "a red fox (sketch)"]
            assert [len(s.attachments) for s in original.states] == [0, 0, 1]
            assert original.attachments[0].dimensions == (4, 2)

            assert result.attachments[0].filename == "up.png"
            assert result.attachments[0].data == png(2, 2)
            assert result.via == "interaction" and not result.ephemeral
            assert result.pings.users == {alice.id} and not result.pings.everyone
            assert [b["label"] for b in result.buttons] == [
                *("U1", "U2", "U3", "U4"),
                *("locked", "again"),
            ]

            pick = await fake.click(alice, result, label="U2")
            reply = await pick.wait_original()
            assert reply.content == "picked 7:2" and reply.ephemeral and pick.ephemeral

            with pytest.raises(SchemaViolation, match="disabled"):
                await fake.click(alice, result, "locked")
            with pytest.raises(SchemaViolation, match="no component"):
                await fake.click(alice, result, "pick:7:9")

            again = await fake.click(alice, result, "again")
            assert await again.wait_acked() == 7
            assert result.content == "again!" and result.buttons == []
            assert result.edit_count == 1
        assert not fake.errors


async def test_followup_can_fill_the_deferred_message() -> None:
    async with FakeDiscord(followup_replaces_deferred=True) as fake:
        alice = fake.add_user("alice")
        async with fake.run_bot(make_bot(fake.guild_id)):
            job = await fake.slash(alice, "probe", mode="followup")
            filled = await job.wait_followup()
            assert filled is job.original and job.messages == [filled]
            assert filled.contents == ["", "here it is"] and not filled.loading


async def test_buttons_work_after_a_restart() -> None:
    async with FakeDiscord() as fake:
        alice = fake.add_user("alice")
        async with fake.run_bot(make_bot(fake.guild_id)):
            job = await fake.slash(alice, "draw", prompt="a cube", seed=42)
            grid = await job.wait_followup()

        # A new process: new client, same Discord. Nothing about the view is in memory.
        async with fake.run_bot(make_bot(fake.guild_id)):
            pick = await fake.click(alice, grid, "pick:42:3")
            assert (await pick.wait_original()).content == "picked 42:3"
            again = await fake.click(alice, grid, label="again")
            await again.wait_acked()
            assert grid.content == "again!"
        assert len(fake.sessions) == 2 and not fake.sessions[0].connected


async def test_subcommand_group_user_option_and_permissions() -> None:
    async with FakeDiscord() as fake:
        bob = fake.add_user("bob")
        mod = fake.add_user("mod", roles=[fake.add_role("Moderators", MANAGE_GUILD)])
        async with fake.run_bot(make_bot(fake.guild_id)):
            grant = await fake.slash(mod, "admin credits grant", user=bob, amount=5)
            assert (await grant.wait_original()).content == "granted 5 to bob"
            assert grant.payload["data"]["resolved"]["members"][str(bob.id)]["roles"] == []

            # Discord hides the command from bob...
            with pytest.raises(CommandNotPermitted):
                await fake.slash(bob, "admin credits grant", user=bob, amount=5)
            # ...unless a server admin overrode it; then the bot's own check must refuse.
            fake.enforce_default_permissions = False
            sneaky = await fake.slash(bob, "admin credits grant", user=bob, amount=5)
            assert (await sneaky.wait_original()).content == "not allowed"


async def test_attachment_option_is_served_by_the_cdn() -> None:
    async with FakeDiscord() as fake:
        alice = fake.add_user("alice")
        async with fake.run_bot(make_bot(fake.guild_id)):
            job = await fake.slash(alice, "describe", image=Upload("cat.png", png(3, 3)))
            answer = await job.wait_original()
            assert answer.content == f"cat.png: {len(png(3, 3))} bytes"
            assert fake.count("GET", "/cdn/attachments/*", status=200) == 1


async def test_invocations_are_checked_against_the_synced_schema() -> None:
    async with FakeDiscord() as fake:
        alice = fake.add_user("alice")
        async with fake.run_bot(make_bot(fake.guild_id)):
            bad_calls: list[tuple[str, dict[str, Any], str]] = [
                ("paint", {"prompt": "x"}, "not a synced"),
                ("draw", {"prompt": "x", "size": 3}, "unknown option"),
                ("draw", {"seed": 3}, "required"),
                ("draw", {"prompt": "x", "seed": 1001}, "outside"),
                ("draw", {"prompt": ""}, "length"),
                ("draw", {"prompt": "x", "style": "oil"}, "choices"),
                ("draw", {"prompt": "x", "seed": "7"}, "not an integer"),
                ("admin credits", {}, "needs a subcommand"),
                ("admin credits grant", {"user": "bob", "amount": 1}, "not a user"),
            ]
            for command, options, reason in bad_calls:
                with pytest.raises(SchemaViolation, match=reason):
                    await fake.slash(fake.owner, command, options=options)
            assert fake.interactions == []
            await fake.slash(alice, "draw", prompt="x")  # and a good one still goes through
            assert len(fake.interactions) == 1


async def test_rate_limited_upload_is_retried_by_discord_py() -> None:
    async with FakeDiscord() as fake:
        alice = fake.add_user("alice")
        fault = fake.rate_limit_next("POST", "/webhooks/*", with_files=True, retry_after=0.05)
        async with fake.run_bot(make_bot(fake.guild_id)):
            job = await fake.slash(alice, "draw", prompt="a fox")
            await job.wait_followup(lambda m: m.attachments)
        assert fault.hits == 1
        assert fake.count("POST", "/webhooks/*", status=429) == 1
        assert fake.count("POST", "/webhooks/*", status=200) == 1


async def test_server_error_on_edit_is_retried() -> None:
    async with FakeDiscord() as fake:
        alice = fake.add_user("alice")
        fault = fake.fail_next("PATCH", "/webhooks/*/messages/@original", status=502)
        async with fake.run_bot(make_bot(fake.guild_id)):
            job = await fake.slash(alice, "draw", prompt="a fox")
            await job.wait_followup(timeout=10)  # discord.py waits 1 s before its retry
        assert fault.exhausted
        assert job.original is not None and job.original.edit_count == 2


async def test_expired_token_answers_50027_and_bot_token_still_works() -> None:
    async with FakeDiscord() as fake:
        alice = fake.add_user("alice")
        bot = make_bot(fake.guild_id)
        async with fake.run_bot(bot):
            job = await fake.slash(alice, "probe", mode="expired")
            await job.wait_acked()
            fake.clock.advance(16 * 60)
            bot.gate.set()
            fallback = await fake.wait_for_message(lambda m: m.via == "bot")
            assert bot.outcomes["expired"] == (401, 50027)
            assert (401, 50027) in job.errors and job.followups == []
            assert fallback.pings.users == {alice.id}


async def test_channel_permissions_bind_bot_token_routes_not_interaction_responses() -> None:
    async with FakeDiscord() as fake:
        alice = fake.add_user("alice")
        fake.deny_bot(fake.general, ATTACH_FILES)
        quiet = fake.add_channel("quiet")
        fake.deny_bot(quiet, SEND_MESSAGES_IN_THREADS)
        thread = fake.add_thread("ideas", parent=quiet)
        hidden = fake.add_channel("hidden")
        bot = make_bot(fake.guild_id)
        async with fake.run_bot(bot):
            fake.deny_bot(hidden, VIEW_CHANNEL)  # while connected: the bot's cache hears of it
            for channel in (fake.general, thread, hidden, fake.nsfw_channel):
                job = await fake.slash(alice, "probe", mode="perms", channel=channel)
                assert (await job.wait_original()).content == "checking"
            await fake.wait_for(lambda: len(bot.outcomes) == 5)  # "seen" and four channels

        general = bot.outcomes["perms:general"]
        assert general["send"] == (403, 50013)
        # Discord sets Attach Files in app_permissions for interaction responses anyway.
        assert general["app"].attach_files and not general["cached"].attach_files
        assert general["cached"].send_messages
        ideas = bot.outcomes["perms:ideas"]
        assert ideas["send"] == (403, 50013)
        assert not ideas["app"].send_messages_in_threads
        assert not ideas["cached"].send_messages_in_threads
        hidden_seen = bot.outcomes["perms:hidden"]
        assert hidden_seen["send"] == (403, 50001)
        assert not hidden_seen["cached"].view_channel
        assert bot.outcomes["perms:nsfw"]["send"] == "sent"


async def test_late_ack_gets_unknown_interaction() -> None:
    async with FakeDiscord() as fake:
        alice = fake.add_user("alice")
        bot = make_bot(fake.guild_id)
        async with fake.run_bot(bot):
            job = await fake.slash(alice, "probe", mode="late_ack")
            fake.clock.advance(3.5)
            bot.gate.set()
            await job.wait_error(10062)
            await fake.wait_for(lambda: "late_ack" in bot.outcomes)
            assert bot.outcomes["late_ack"] == 10062 and not job.acked


async def test_upload_over_the_limit_is_413() -> None:
    async with FakeDiscord(attachment_size_limit=1000) as fake:
        alice = fake.add_user("alice")
        bot = make_bot(fake.guild_id)
        async with fake.run_bot(bot):
            job = await fake.slash(alice, "probe", mode="oversize")
            await job.wait_error(40005)
            await fake.wait_for(lambda: "oversize" in bot.outcomes)
            assert bot.outcomes["filesize_limit"] == 1000
            assert bot.outcomes["oversize"] == (413, 40005)


async def test_second_ack_is_40060() -> None:
    async with FakeDiscord() as fake:
        alice = fake.add_user("alice")
        bot = make_bot(fake.guild_id)
        async with fake.run_bot(bot):
            job = await fake.slash(alice, "probe", mode="double_ack")
            await job.wait_error(40060)
            await fake.wait_for(lambda: "double_ack" in bot.outcomes)
            assert bot.outcomes["double_ack"] == (400, 40060)
            assert job.ack_type == 5 and job.ephemeral is False


async def test_channel_messages_edits_and_replies() -> None:
    async with FakeDiscord() as fake:
        alice = fake.add_user("alice")
        async with fake.run_bot(make_bot(fake.guild_id)):
            job = await fake.slash(alice, "probe", mode="reply")
            ok = await job.wait_original()
            assert ok.ephemeral and ok.attachments[0].filename == "receipt.png"  # multipart ack
            reply = await fake.wait_for_message(lambda m: m.content == "second")
            first = reply.referenced
            assert first is not None and first.contents == ["first", "first (edited)"]
            assert reply.type == 19 and reply.via == "bot" and not reply.pings
            assert fake.messages_in(fake.general) == [first, reply]  # the ephemeral "ok" is hidden
            dm = await fake.wait_for_message(lambda m: m.content == "psst")
            channel = fake.channel(dm.channel_id)
            assert channel is not None and channel.kind == "dm" and channel.recipient is alice


async def test_select_then_modal_then_submit() -> None:
    async with FakeDiscord() as fake:
        alice = fake.add_user("alice")
        async with fake.run_bot(make_bot(fake.guild_id)):
            menu = await (await fake.slash(alice, "feedback")).wait_original()
            assert menu.ephemeral
            with pytest.raises(SchemaViolation, match="only visible"):
                await fake.select(fake.owner, menu, "topic", ["ideas"])
            with pytest.raises(SchemaViolation, match="not allowed"):
                await fake.select(alice, menu, "topic", ["cats"])
            choice = await fake.select(alice, menu, "topic", ["ideas"])
            assert await choice.wait_acked() == 9 and choice.modal is not None
            submitted = await fake.submit_modal(choice, {"text": "more foxes"})
            assert (await submitted.wait_original()).content == "thanks: ideas: more foxes"


async def test_message_content_needs_the_intent_or_a_mention() -> None:
    async with FakeDiscord() as fake:
        alice = fake.add_user("alice")
        bot = make_bot(fake.guild_id)
        async with fake.run_bot(bot):
            await fake.say(alice, "hello there")
            await fake.say(alice, f"hello {fake.bot_user.mention}")
            await fake.wait_for(lambda: len(bot.outcomes["seen"]) == 2)
            assert bot.outcomes["seen"] == ["", f"hello {fake.bot_user.mention}"]


async def test_enforced_rate_limits_are_respected_by_discord_py() -> None:
    async with FakeDiscord(rate_limit=(1, 0.05)) as fake:
        alice = fake.add_user("alice")
        async with fake.run_bot(make_bot(fake.guild_id)):
            job = await fake.slash(alice, "draw", prompt="a fox")
            await job.wait_followup()
        # The headers are accurate, so discord.py waits on its own instead of hitting 429s.
        assert fake.count(status=429) == 0


async def test_gateway_reconnect_resumes_the_session() -> None:
    async with FakeDiscord() as fake:
        alice = fake.add_user("alice")
        async with fake.run_bot(make_bot(fake.guild_id)):
            await fake.request_reconnect()
            await fake.wait_for(lambda: fake.sessions[0].resumes == 1 and fake.connected)
            await fake.drop_gateway(4000)
            await fake.wait_for(lambda: fake.sessions[0].resumes == 2 and fake.connected)
            job = await fake.slash(alice, "describe", image=("a.txt", b"hi"))
            assert (await job.wait_original()).content == "a.txt: 2 bytes"
        assert len(fake.sessions) == 1


async def test_wire_contract_for_raw_clients() -> None:
    async with FakeDiscord() as fake, aiohttp.ClientSession() as http:
        auth = {"Authorization": f"Bot {fake.bot_token}"}
        async with http.get(f"{fake.url}/api/v10/users/@me", headers=auth) as response:
            # Exactly this, or discord.py's json_or_text hands back a str.
            assert response.headers["Content-Type"] == "application/json"
            for header in ("Limit", "Remaining", "Reset", "Reset-After", "Bucket"):
                assert f"X-RateLimit-{header}" in response.headers
        async with http.get(f"{fake.url}/api/v10/users/@me") as response:
            assert response.status == 401
        async with http.get(f"{fake.url}/api/v10/no/such/route") as response:
            assert response.status == 404
        assert fake.errors == ["no such route in the fake: GET /api/v10/no/such/route"]
        fake.errors.clear()

        async with http.ws_connect(f"{fake.gateway_url}?v=10&encoding=json") as ws:
            hello = await ws.receive_json()
            assert hello["op"] == 10
            await ws.send_json({"op": 2, "d": {"token": "wrong", "intents": 0}})
            closed = await ws.receive()
            assert closed.type is aiohttp.WSMsgType.CLOSE and closed.data == 4004


async def test_bad_token_fails_login() -> None:
    async with FakeDiscord() as fake:
        bot = make_bot(fake.guild_id)
        with pytest.raises(discord.LoginFailure):
            await bot.start("not-the-token")
        await bot.close()


async def test_bot_in_a_subprocess_survives_sigkill(tmp_path: Path) -> None:
    (tmp_path / "pingbot.py").write_text(
        textwrap.dedent(
            """
            import os, discord
            from discord import app_commands

            client = discord.Client(intents=discord.Intents.none(), guild_ready_timeout=0.05)
            tree = app_commands.CommandTree(client)

            @tree.command(name="ping", description="Ping")
            async def ping(interaction: discord.Interaction) -> None:
                await interaction.response.send_message(f"pong from {os.getpid()}")

            client.setup_hook = tree.sync
            client.run(os.environ["DISCORD_TOKEN"], log_handler=None)
            """
        )
    )
    async with FakeDiscord(redirect=False) as fake:
        alice = fake.add_user("alice")
        env = fake.subprocess_env()
        env["PYTHONPATH"] += f":{tmp_path}"
        for _ in range(2):
            bot = await asyncio.create_subprocess_exec(*fake.subprocess_argv("pingbot"), env=env)
            try:
                await fake.wait_ready(timeout=15)
                job = await fake.slash(alice, "ping")
                assert (await job.wait_original()).content == f"pong from {bot.pid}"
            finally:
                bot.send_signal(signal.SIGKILL)
                await bot.wait()
            await fake.wait_for(lambda: not fake.connected)
        assert len(fake.sessions) == 2


async def test_an_enforced_nonce_answers_a_repeat_with_the_first_message() -> None:
    async with FakeDiscord() as fake, aiohttp.ClientSession() as http:
        auth = {"Authorization": f"Bot {fake.bot_token}"}
        other = fake.add_channel("other")

        async def post(channel_id: int, **body: Any) -> tuple[int, dict[str, Any]]:
            url = f"{fake.url}/api/v10/channels/{channel_id}/messages"
            async with http.post(url, json={"content": "hi", **body}, headers=auth) as response:
                return response.status, await response.json()

        status, first = await post(fake.general.id, nonce="r1", enforce_nonce=True)
        assert status == 200
        _, again = await post(fake.general.id, nonce="r1", enforce_nonce=True)
        assert again["id"] == first["id"]
        # Not enforced, another nonce, or another channel: a new message each.
        _, loose = await post(fake.general.id, nonce="r1")
        _, second = await post(fake.general.id, nonce="r2", enforce_nonce=True)
        _, elsewhere = await post(other.id, nonce="r1", enforce_nonce=True)
        ids = {first["id"], loose["id"], second["id"], elsewhere["id"]}
        assert len(ids) == 4 and len(fake.messages) == 4
        # A deleted message is not handed back.
        fake.message(int(first["id"])).deleted = True  # type: ignore[union-attr]
        _, after_delete = await post(fake.general.id, nonce="r1", enforce_nonce=True)
        assert after_delete["id"] not in ids
        status, error = await post(fake.general.id, nonce="x" * 26, enforce_nonce=True)
        assert status == 400 and error["code"] == 50035 and "nonce" in error["errors"]
