"""The Discord front end: slash commands and buttons over `ImagineApp` and the core services.

Thin on purpose: each handler turns the interaction into an `Actor`, calls the app, and renders.
User-facing errors (`UserError`) become short ephemeral replies in one handler; anything else is
logged with context and shown as "something went wrong".
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import discord
from discord import app_commands
from discord.ext import commands

from bot.app import access, render
from bot.app.access import AdminScope
from bot.app.actions import Action, Actor, Submitted, UserError
from bot.app.application import ImagineApp, open_core
from bot.app.fetch import FetchPolicy, policy_from_config
from bot.app.health import HealthServer, start_health_server
from bot.app.moderation import flagged_indices
from bot.app.refusals import RefusalLimiter
from bot.config import Config
from bot.core.clock import Clock, system_clock
from bot.core.models import Job
from bot.core.service import Core
from bot.discord.cogs import after_grid, pictures
from bot.discord.cogs.admin import AdminCommands
from bot.discord.cogs.catalog import add_catalog_commands
from bot.discord.cogs.member import add_member_commands
from bot.discord.delivery import Delivery, JobMessage
from bot.discord.gate import InteractionGate, check_guilds
from bot.discord.permissions import missing_for_delivery, refusal_text
from bot.discord.views.buttons import Fits, JobButton, UiAction, UiButton, cancel_view
from generation.contract import MAX_SEED, Sampler
from generation.prompt import MAX_INPUT_CHARS, ImagineOptions

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])

ASPECT_CHOICES = ["1:1", "3:2", "2:3", "4:3", "3:4", "16:9", "9:16", "21:9", "9:21"]
# Discord caps a message at 2000 characters; longer replies are cut with a marker.
MESSAGE_LIMIT = 2000


# Sharded from the start: with one shard it is the same as a plain Bot, and a bot that grows
# past Discord's guild limit per shard needs no change.
class ImagineBot(commands.AutoShardedBot):
    def __init__(
        self,
        config: Config,
        *,
        clock: Clock = system_clock,
        core_options: dict[str, Any] | None = None,
        fetch_policy: FetchPolicy | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        **options: Any,
    ) -> None:
        super().__init__(
            command_prefix=commands.when_mentioned,
            intents=discord.Intents.default(),
            # Nothing a prompt contains may ping anyone; only the job owner is ever mentioned.
            allowed_mentions=discord.AllowedMentions.none(),
            help_command=None,
            **options,
        )
        self.config = config
        self.clock = clock
        self.core_options = core_options or {}
        # Where members' pictures may come from; tests pass one that allows the fake's CDN.
        self.fetch_policy = fetch_policy or policy_from_config(config.images)
        self.nsfw_channels: set[int] = set()
        # Every interaction passes the gate first: unlisted servers and cooled-down members
        # are answered there and go no further (bot/discord/gate.py).
        self.refusals = RefusalLimiter(
            config.discord.refusal_limit, config.discord.refusal_window_s, monotonic=monotonic
        )
        self.gate = InteractionGate(config.discord, self.refusals)
        self.gate.install(self._connection)
        # admin_user_ids, and the application's owner or team once setup_hook has asked.
        self.owner_ids: frozenset[int] = config.discord.admin_user_ids
        self._recovered: list[Job] = []
        self.core: Core
        self.app: ImagineApp
        self.delivery: Delivery
        self.health: HealthServer | None = None

    # ----- start-up and shutdown -------------------------------------------------------------

    async def setup_hook(self) -> None:
        await self.learn_owners()
        self.core = await open_core(
            self.config, self.is_nsfw_channel, clock=self.clock, **self.core_options
        )
        self.app = ImagineApp(
            self.config, self.core, pictures=pictures.picture_inputs(self, self.fetch_policy)
        )
        self.delivery = Delivery(
            self.core.scheduler,
            self.core.jobs,
            data_dir=self.config.data_dir,
            progress_edit_interval_s=self.config.discord.progress_edit_interval_s,
            find_channel=self.find_channel,
            open_dm=self.open_dm,
            message_at=self.message_at,
            own_user_id=lambda: self.user.id if self.user is not None else None,
            is_flagged=self.flagged,
            fits_for=self.fits_for,
        )
        self.health = await start_health_server(
            self.config.metrics, self.core, {"gateway": self.gateway_check}
        )
        snapshot = await self.core.scheduler.snapshot()
        self._recovered = [active.job for active in (*snapshot.running, *snapshot.queued)]
        self.add_dynamic_items(JobButton, UiButton)
        add_commands(self)
        add_member_commands(self)
        await self.sync_commands()

    async def learn_owners(self) -> None:
        """The application's owner (or its team's members) are owners too: they hold the
        token and the developer portal anyway."""
        try:
            # Read at login; asked again only if that did not happen.
            info = self.application or await self.application_info()
        except discord.HTTPException as exc:
            log.warning("could not read the application's owner (%s); owners: admin_user_ids", exc)
            return
        found = {m.id for m in info.team.members} if info.team else {info.owner.id}
        self.owner_ids = self.config.discord.admin_user_ids | found
        self.gate.owner_ids = self.owner_ids

    async def sync_commands(self) -> None:
        if self.config.discord.guild_ids:
            for guild_id in self.config.discord.guild_ids:
                guild = discord.Object(guild_id)
                self.tree.copy_global_to(guild=guild)
                await self.tree.sync(guild=guild)
            # Commands an older setup registered globally would still show in every server
            # and in DMs (where the gate refuses them); the served servers have their copies.
            self.tree.clear_commands(guild=None)
            await self.tree.sync()
        else:
            await self.tree.sync()

    async def on_ready(self) -> None:
        log.info("connected as %s to %d guild(s)", self.user, len(self.guilds))
        await check_guilds(self.config.discord, self.guilds)
        # Work left from before this start: results that finished while the bot was away (or
        # whose message was never sent), and jobs recovered into the queue. Their status
        # messages are edited with the bot token; a job without one gets a channel message.
        recovered, self._recovered = self._recovered, []
        for job in await self.core.jobs.undelivered():
            await self.delivery.deliver(job, await self.delivery.recovered(job))
        for job in recovered:
            self.delivery.track(await self.delivery.recovered(job))

    async def on_guild_join(self, guild: discord.Guild) -> None:
        await check_guilds(self.config.discord, [guild])

    async def gateway_check(self) -> str | None:
        if self.is_closed() or not self.is_ready():
            return "not connected to the Discord gateway"
        down = [shard_id for shard_id, shard in self.shards.items() if shard.is_closed()]
        if down:
            return f"shard(s) {', '.join(map(str, down))} disconnected"
        return None

    async def close(self) -> None:
        if self.health is not None:
            await self.health.close()
        if hasattr(self, "delivery"):
            await self.delivery.close()
        if hasattr(self, "core"):
            await self.core.close()
        await super().close()

    # ----- helpers for handlers --------------------------------------------------------------

    def actor(self, interaction: discord.Interaction[Any]) -> Actor:
        user = interaction.user
        roles = tuple(r.id for r in getattr(user, "roles", ()) if r.id != interaction.guild_id)
        channel = interaction.channel
        if channel is not None and getattr(channel, "is_nsfw", lambda: False)():
            self.nsfw_channels.add(channel.id)
        scope = self.admin_scope(interaction)
        return Actor(
            user_id=user.id,
            guild_id=interaction.guild_id,
            channel_id=interaction.channel_id,
            role_ids=roles,
            is_admin=scope is not AdminScope.NONE,
            is_owner=scope is AdminScope.OWNER,
        )

    def is_nsfw_channel(self, channel_id: int | None) -> bool:
        """Discord's age-restricted flag, from the gateway's channel cache, or as seen on an
        interaction (threads and channels the cache lacks)."""
        channel = self.get_channel(channel_id) if channel_id is not None else None
        is_nsfw = getattr(channel, "is_nsfw", None)
        if is_nsfw is not None:
            return bool(is_nsfw())
        return channel_id in self.nsfw_channels

    def admin_scope(self, interaction: discord.Interaction[Any]) -> AdminScope:
        """Checked here, in the bot: Discord's default_permissions can be overridden by a
        server, and Manage Server counts only in a server the bot serves (bot/app/access.py)."""
        guild_id = interaction.guild_id
        return access.admin_scope(
            self.config.discord,
            user_id=interaction.user.id,
            guild_id=guild_id,
            role_ids=[role.id for role in getattr(interaction.user, "roles", ())],
            manage_guild=guild_id is not None and interaction.permissions.manage_guild,
            owner_ids=self.owner_ids,
        )

    def is_admin(self, interaction: discord.Interaction[Any]) -> bool:
        return self.admin_scope(interaction) is not AdminScope.NONE

    async def find_channel(self, channel_id: int) -> discord.abc.Messageable | None:
        """A channel the bot can post to; None if it is gone or hidden from the bot. Other
        errors (a Discord outage) are raised: they are worth retrying."""
        channel = self.get_channel(channel_id)
        if channel is None:
            try:
                channel = await self.fetch_channel(channel_id)
            except (discord.NotFound, discord.Forbidden):
                return None
        return channel if isinstance(channel, discord.abc.Messageable) else None

    async def open_dm(self, user_id: int) -> discord.abc.Messageable:
        user = self.get_user(user_id) or await self.fetch_user(user_id)
        return await user.create_dm()

    def message_at(
        self, guild_id: int | None, channel_id: int, message_id: int
    ) -> discord.PartialMessage:
        channel = self.get_partial_messageable(channel_id, guild_id=guild_id)
        return channel.get_partial_message(message_id)

    def fits_for(self, job: Job) -> Fits:
        """Which buttons under this job's images can work on this server."""
        return after_grid.fits_for(self.app)(job)

    async def flagged(self, job: Job) -> bool:
        """Whether the job's images are to be posted behind a spoiler (safety filter)."""
        return bool(await flagged_indices(self.config.data_dir, job))

    # ----- buttons ---------------------------------------------------------------------------

    async def on_job_button(
        self, interaction: discord.Interaction[Any], action: Action, job_id: int, index: int
    ) -> None:
        try:
            if action is Action.UPSCALE:
                # U1–U4 separate an image: free, no job (the candidates are full size).
                await after_grid.separate(self, interaction, job_id, index)
                return
            if await after_grid.wants_remix(self, interaction.user.id, action):
                # A form must be the first answer; the member's settings are in memory.
                await after_grid.open_form(self, interaction, action, job_id, index)
                return
            # Acknowledged before any database read, image decoding or transaction: Discord
            # allows 3 seconds, which a busy bot may need for those. The grid is left as it
            # is; refusals come as private follow-ups, the new job gets its own message.
            await interaction.response.defer()
            await self._job_button(interaction, action, job_id, index)
        except Exception as exc:
            await report_error(interaction, exc)

    async def on_ui_button(
        self, interaction: discord.Interaction[Any], what: UiAction, job_id: int, index: int
    ) -> None:
        try:
            if what is UiAction.DELETE:
                await interaction.response.defer()
                await after_grid.delete_result(self, interaction, interaction.message)
            else:
                await after_grid.open_form(self, interaction, what, job_id, index)
        except Exception as exc:
            await report_error(interaction, exc)

    async def on_interaction(self, interaction: discord.Interaction[Any]) -> None:
        # A form opened before a restart has no live Modal behind it; it is still answered.
        try:
            await after_grid.submit_orphan_form(self, interaction)
        except Exception as exc:
            await report_error(interaction, exc)

    async def _job_button(
        self, interaction: discord.Interaction[Any], action: Action, job_id: int, index: int
    ) -> None:
        actor = self.actor(interaction)
        if action is Action.CANCEL:
            job = await self.app.cancel(actor, job_id)
            await reply(interaction, f"Cancelling job {job.id} — its credits are refunded.")
            return
        missing = missing_for_delivery(interaction)
        if missing:
            raise UserError(refusal_text(missing))
        await self.post_status(interaction, await self.app.press(actor, job_id, action, index))

    async def post_status(
        self, interaction: discord.Interaction[Any], submitted: Submitted
    ) -> None:
        """The status message of a job started from a button or a form: a reply to the
        message it was pressed on, edited until the result lands in it."""
        job = submitted.job
        channel = interaction.channel
        message: discord.Message | None = None
        try:
            assert channel is not None and interaction.message is not None
            message = await channel.send(  # type: ignore[union-attr]
                render.queued_text(job, submitted.position, submitted.notes),
                view=cancel_view(job.id),
                reference=interaction.message.to_reference(fail_if_not_exists=False),
            )
        except discord.HTTPException as exc:
            # The job is accepted and paid for: without a status message its result still
            # goes to the channel when it is ready.
            log.info("job %s: status message not posted (%s)", job.id, exc)
        shown = submitted.position if message is not None else None
        target = JobMessage(job, submitted.notes, message=message, shown_position=shown)
        target.last_edit = time.monotonic()
        await self.delivery.remember(target)
        self.delivery.track(target)

    async def acknowledge(
        self, interaction: discord.Interaction[Any], jobs: Sequence[Job], actor: Actor
    ) -> int | None:
        """Acknowledge a command whose jobs are already queued; returns the id of the response
        message. If Discord no longer takes the acknowledgement, the jobs are cancelled and
        refunded rather than run unseen."""
        try:
            response = await interaction.response.defer(thinking=True)
            return response.message_id if response is not None else None
        except discord.HTTPException:
            for job in jobs:
                if not await self.core.scheduler.cancel(job.id, actor.user_id):
                    # Too late to cancel (it already finished): the result goes to the channel.
                    self.delivery.track(JobMessage(job))
            raise

    async def follow_up(self, interaction: discord.Interaction[Any], submitted: Submitted) -> None:
        """A further job of one /imagine: its status message is a follow-up of the command
        (edited through the interaction token while it lives, then with the bot token)."""
        job = submitted.job
        content = clip(render.queued_text(job, submitted.position, submitted.notes))
        try:
            message = await interaction.followup.send(content, view=cancel_view(job.id), wait=True)
        except discord.HTTPException as exc:
            # The job is accepted and paid for: without a status message its result still
            # goes to the channel when it is ready.
            log.info("job %s: status message not posted (%s)", job.id, exc)
            self.delivery.track(JobMessage(job, submitted.notes))
            return
        target = JobMessage(
            job,
            submitted.notes,
            interaction=interaction,
            followup_id=message.id,
            message=self.delivery.status_message(job, message.id),
            shown_position=submitted.position,
        )
        target.last_edit = time.monotonic()
        await self.delivery.remember(target)
        self.delivery.track(target)


# ----- errors --------------------------------------------------------------------------------


async def report_error(interaction: discord.Interaction[Any], error: BaseException) -> None:
    """The one place errors meet users: short and specific for theirs, generic for ours."""
    if isinstance(error, app_commands.CommandInvokeError):
        error = error.original
    core = getattr(interaction.client, "core", None)
    if isinstance(error, discord.HTTPException) and isinstance(core, Core):
        core.scheduler.metrics.discord_error(error.code)
    refusals = getattr(interaction.client, "refusals", None)
    if isinstance(refusals, RefusalLimiter) and isinstance(
        error, UserError | app_commands.CheckFailure
    ):
        refusals.record(interaction.user.id)
    if isinstance(error, UserError):
        message = str(error)
    elif isinstance(error, app_commands.CheckFailure):
        message = str(error) or "You can't use this command here."
    elif (
        isinstance(error, ValueError)
        and interaction.command
        and interaction.command.qualified_name.startswith("admin")
    ):
        message = f"Not done: {error}"
    else:
        log.error(
            "unexpected error in %s by user %s in channel %s",
            interaction.command.qualified_name if interaction.command else interaction.data,
            interaction.user.id,
            interaction.channel_id,
            exc_info=error,
        )
        message = "Something went wrong on our side; nothing was charged. Please try again."
    await reply(interaction, message, ephemeral=True)


async def reply(
    interaction: discord.Interaction[Any], content: str, *, ephemeral: bool = True, **options: Any
) -> None:
    content = clip(content)
    try:
        if interaction.response.is_done():
            await interaction.followup.send(content, ephemeral=ephemeral, **options)
        else:
            await interaction.response.send_message(content, ephemeral=ephemeral, **options)
    except discord.HTTPException as exc:
        log.warning("could not reply to interaction %s: %s", interaction.id, exc)


def clip(text: str, limit: int = MESSAGE_LIMIT) -> str:
    return text if len(text) <= limit else text[: limit - 2] + " …"


# ----- commands ------------------------------------------------------------------------------


def add_commands(bot: ImagineBot) -> None:
    tree = bot.tree
    tree.on_error = report_error  # type: ignore[method-assign]
    config = bot.config

    @tree.command(name="imagine", description="Make images from a text prompt")
    @app_commands.describe(
        prompt="What to draw; Midjourney-style flags like --ar 3:2 --seed 7 --no text work too",
        negative="What to keep out of the image (same as --no)",
        aspect="Aspect ratio (same as --ar)",
        seed="Seed for reproducible results (same as --seed)",
        steps="Denoising steps: more is slower and finer (same as --steps)",
        guidance="How closely to follow the prompt, CFG scale (same as --cfg)",
        sampler="Sampling method (same as --sampler)",
        model="Which model to use (see /models; same as --model)",
        lora="LoRAs to add: NAME or NAME:0.8, several with commas (same as --lora; see /models)",
        control_image="The picture a --cn ControlNet follows (its edges, depth …)",
        image="A picture to start from (an image prompt; --iw 0-3 sets how strongly it steers)",
        image2="A second image prompt",
    )
    @app_commands.choices(
        aspect=[app_commands.Choice(name=a, value=a) for a in ASPECT_CHOICES],
        sampler=[app_commands.Choice(name=s.a1111_name, value=s.value) for s in Sampler],
    )
    # The server's configured maximum, so Discord's client refuses more before anyone waits.
    @_annotate(steps=app_commands.Range[int, 1, config.engine.max_steps] | None)
    async def imagine(
        interaction: discord.Interaction[Any],
        prompt: app_commands.Range[str, 1, MAX_INPUT_CHARS],
        negative: app_commands.Range[str, 1, 1000] | None = None,
        aspect: str | None = None,
        seed: app_commands.Range[int, 0, MAX_SEED] | None = None,
        steps: int | None = None,
        guidance: app_commands.Range[float, 0.0, 30.0] | None = None,
        sampler: str | None = None,
        model: str | None = None,
        lora: app_commands.Range[str, 1, 200] | None = None,
        control_image: discord.Attachment | None = None,
        image: discord.Attachment | None = None,
        image2: discord.Attachment | None = None,
    ) -> None:
        missing = missing_for_delivery(interaction)
        if missing:
            raise UserError(refusal_text(missing))
        if pictures.wants_pictures(prompt, image, image2, control_image):
            # Fetching may outlast Discord's 3 s: acknowledged first, privately (cogs/pictures.py).
            await interaction.response.defer(ephemeral=True, thinking=True)
        options = ImagineOptions(negative, aspect, seed, steps, guidance, sampler, lora)
        if interaction.response.is_done():
            await pictures.imagine_with_pictures(
                bot, interaction, prompt, options, model, (image, image2), control_image
            )
            return
        actor = bot.actor(interaction)
        batch = await bot.app.imagine(actor, prompt, options, model)
        first = batch[0]
        message_id = await bot.acknowledge(interaction, [s.job for s in batch], actor)
        target = JobMessage(
            first.job,
            first.notes,
            interaction=interaction,
            message=bot.delivery.status_message(first.job, message_id),
        )
        answered = False
        try:
            await interaction.edit_original_response(
                content=clip(render.queued_text(first.job, first.position, first.notes)),
                view=cancel_view(first.job.id),
            )
            target.shown_position = first.position
            answered = True
        except discord.HTTPException as exc:
            log.info("job %s: first edit refused (%s)", first.job.id, exc)
        target.last_edit = time.monotonic()
        await bot.delivery.remember(target)
        bot.delivery.track(target)
        # Each further job of a permutation or --repeat prompt gets a message of its own. While
        # the response still shows "thinking…", Discord would turn the first follow-up into it,
        # so then they go without one: their results are posted to the channel.
        for submitted in batch[1:]:
            if answered:
                await bot.follow_up(interaction, submitted)
            else:
                bot.delivery.track(JobMessage(submitted.job, submitted.notes))

    @tree.command(
        name="balance", description="Your credits, today's free allowance and recent activity"
    )
    async def balance(interaction: discord.Interaction[Any]) -> None:
        actor = bot.actor(interaction)
        current = await bot.core.credits.balance(actor.user_id, actor.role_ids)
        entries = await bot.core.credits.ledger(actor.user_id, 5)
        await reply(interaction, render.balance_text(current, entries, bot.clock()))

    @tree.command(name="jobs", description="Your queued and running jobs")
    async def jobs(interaction: discord.Interaction[Any]) -> None:
        active = await bot.core.scheduler.user_jobs(interaction.user.id)
        await reply(interaction, render.jobs_text(active))

    @tree.command(
        name="help", description="What this bot does, the flags it understands, and costs"
    )
    async def help_(interaction: discord.Interaction[Any]) -> None:
        text = render.help_text(config)
        embeds = [
            discord.Embed(description=chunk, colour=discord.Colour.blurple())
            for chunk in _chunks(text, 4000)
        ]
        await interaction.response.send_message(embeds=embeds[:10], ephemeral=True)

    tree.add_command(AdminCommands(bot))
    pictures.add_picture_commands(bot)
    add_catalog_commands(bot, imagine)


def _annotate(**annotations: Any) -> Callable[[F], F]:
    """Give parameters annotations known only once the config is loaded (discord.py reads
    them when the command is built, so they can't be written in the signature)."""

    def apply(function: F) -> F:
        function.__annotations__.update(annotations)
        return function

    return apply


def _chunks(text: str, size: int) -> list[str]:
    chunks: list[str] = []
    current = ""
    for line in text.splitlines():
        if len(current) + len(line) + 1 > size:
            chunks.append(current)
            current = ""
        current += line + "\n"
    return [*chunks, current] if current else chunks


async def run_discord(config: Config, token: str) -> None:
    bot = ImagineBot(config)
    loop = asyncio.get_running_loop()
    # SIGTERM (docker stop, systemd) drains: running jobs finish or are handed back.
    loop.add_signal_handler(signal.SIGTERM, lambda: asyncio.ensure_future(bot.close()))
    async with bot:
        await bot.start(token)
