"""The Discord client: it opens the core and the app, gives each cog (bot/discord/cogs/) the
services it uses, syncs the commands, hands the persistent buttons' presses to their cogs, and
delivers what finished while it was away.

Thin on purpose: each handler (in a cog) turns the interaction into an `Actor`, calls the app,
and renders. User-facing errors (`UserError`) become short ephemeral replies in one handler
(bot/discord/interactions.py); anything else is logged with context and shown as "something
went wrong".
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable, Sequence
from typing import Any

import discord
from discord.ext import commands

from bot.app.actions import Action
from bot.app.admin import open_desk
from bot.app.application import ImagineApp, open_core, picture_inputs
from bot.app.companions import Companion, Services, StartCompanion, open_services
from bot.app.fetch import FetchPolicy, policy_from_config
from bot.app.health import HealthServer, start_health_server
from bot.app.inputs import InputScreen
from bot.app.moderation import flagged_indices
from bot.app.refusals import RefusalLimiter
from bot.app.sign_in import job_page_url
from bot.config import Config
from bot.config.web import WebSecrets
from bot.core.clock import Clock, system_clock
from bot.core.models import Job
from bot.core.service import Core
from bot.discord.actors import Actors
from bot.discord.cogs.admin import AdminCommands
from bot.discord.cogs.after_grid import AfterGridCog
from bot.discord.cogs.catalog import CatalogCog
from bot.discord.cogs.imagine import ImagineCog
from bot.discord.cogs.member import MemberCog
from bot.discord.cogs.modes import ModesCog
from bot.discord.cogs.pictures import PicturesCog
from bot.discord.cogs.rank import RankCog
from bot.discord.cogs.shorten import ShortenCog
from bot.discord.cogs.web import WebCog
from bot.discord.delivery import Delivery
from bot.discord.gate import InteractionGate, check_guilds
from bot.discord.guild_roles import DiscordGuildRoles
from bot.discord.interactions import report_error
from bot.discord.status import StatusMessages
from bot.discord.views.buttons import JobButton, UiAction, UiButton
from bot.discord.views.describe import DescribeAction, DescribeButton
from bot.discord.views.fits import fits_for
from bot.discord.views.settings import SettingsButton, SettingsSelect
from bot.discord.views.shorten import ShortenButton
from bot.discord.views.taste import EraseButton, RankButton

log = logging.getLogger(__name__)


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
        web_secrets: WebSecrets | None = None,
        companions: Sequence[StartCompanion] = (),
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
        self.actors = Actors(config.discord, self.get_channel)
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
        # Started beside the client once its services are open (the web home); closed first.
        self.web_secrets = web_secrets
        self._starters = tuple(companions)
        self.companions: list[Companion] = []
        self.services: Services
        self._after_grid: AfterGridCog
        self._pictures: PicturesCog
        self._member: MemberCog
        self._shorten: ShortenCog

    # ----- start-up and shutdown -------------------------------------------------------------

    async def setup_hook(self) -> None:
        await self.learn_owners()
        config = self.config
        is_nsfw = self.actors.is_nsfw_channel
        self.core = await open_core(config, is_nsfw, clock=self.clock, **self.core_options)
        # The app's picture handling judges age restriction as the bot sees channels.
        screen = InputScreen(config.moderation, is_nsfw, self.core.audit)
        self.app = ImagineApp(
            config, self.core, pictures=picture_inputs(config, screen, self.fetch_policy)
        )
        self.delivery = Delivery(
            self.core.scheduler,
            self.core.jobs,
            data_dir=config.data_dir,
            progress_edit_interval_s=config.discord.progress_edit_interval_s,
            find_channel=self.find_channel,
            open_dm=self.open_dm,
            message_at=self.message_at,
            own_user_id=self.own_user_id,
            is_flagged=self.flagged,
            fits_for=fits_for(self.app),
            page_url=lambda job: job_page_url(config.web, job.id),
            prompt_refused=lambda text: self.app.prompt_filter.check(text) is not None,
        )
        self.health = await start_health_server(
            config.metrics, self.core, {"gateway": self.gateway_check}
        )
        snapshot = await self.core.scheduler.snapshot()
        self._recovered = [active.job for active in (*snapshot.running, *snapshot.queued)]
        self.services = open_services(
            config,
            self.core,
            self.app,
            self.clock,
            self.web_secrets,
            lambda: self.owner_ids,
            guild_roles=DiscordGuildRoles(self, self.actors),
        )
        await self.add_features()
        for start in self._starters:
            companion = await start(self.services)
            if companion is not None:
                self.companions.append(companion)
        await self.sync_commands()

    async def add_features(self) -> None:
        """Each cog with the services it uses, and the persistent components whose presses
        this client hands to them."""
        status = StatusMessages(self.delivery, self.core.scheduler)
        actors = self.actors
        self.tree.on_error = report_error  # type: ignore[method-assign]
        self.add_dynamic_items(JobButton, UiButton, DescribeButton, SettingsSelect, SettingsButton)
        self.add_dynamic_items(ShortenButton)
        self.add_dynamic_items(RankButton, EraseButton)
        self._after_grid = AfterGridCog(self.app, actors, self.delivery, status, self.own_user_id)
        self._pictures = PicturesCog(self.config, self.app, actors, status)
        self._member = MemberCog(self.config, self.app, self.core, actors, self.clock)
        await self.add_cog(ImagineCog(self.config, self.app, actors, self.delivery, status))
        await self.add_cog(self._after_grid)
        await self.add_cog(self._pictures)
        await self.add_cog(self._member)
        await self.add_cog(CatalogCog(self.config))
        await self.add_cog(RankCog(self.app, actors))
        await self.add_cog(ModesCog(self.app.modes, actors))
        if self.services.sign_in is not None:
            await self.add_cog(WebCog(self.services.sign_in, actors))
        self._shorten = ShortenCog(self.app, actors, status)
        await self.add_cog(self._shorten)
        self.tree.add_command(self._after_grid.delete_menu)
        self.tree.add_command(AdminCommands(open_desk(self.core), actors, self.clock))

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
        self.gate.owner_ids = self.actors.owner_ids = self.owner_ids

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
        companions, self.companions = self.companions, []
        for companion in reversed(companions):
            await companion.close()
        if self.health is not None:
            await self.health.close()
        if hasattr(self, "delivery"):
            await self.delivery.close()
        if hasattr(self, "core"):
            await self.core.close()
        await super().close()

    # ----- what delivery and the cogs are given ------------------------------------------------

    def own_user_id(self) -> int | None:
        return self.user.id if self.user is not None else None

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

    async def flagged(self, job: Job) -> bool:
        """Whether the job's images are to be posted behind a spoiler (safety filter)."""
        return bool(await flagged_indices(self.config.data_dir, job))

    # ----- persistent components: discord.py rebuilds them from their custom_id and calls
    # these (bot/discord/views/), which hand the press to the cog of its feature ---------------

    async def on_job_button(
        self, interaction: discord.Interaction[Any], action: Action, job_id: int, index: int
    ) -> None:
        await self._after_grid.on_job_button(interaction, action, job_id, index)

    async def on_ui_button(
        self, interaction: discord.Interaction[Any], what: UiAction, job_id: int, index: int
    ) -> None:
        await self._after_grid.on_ui_button(interaction, what, job_id, index)

    async def on_describe_button(
        self, interaction: discord.Interaction[Any], action: DescribeAction, job_id: int, index: int
    ) -> None:
        await self._pictures.on_describe_button(interaction, action, job_id, index)

    async def on_shorten_button(
        self, interaction: discord.Interaction[Any], job_id: int, index: int
    ) -> None:
        await self._shorten.on_shorten_button(interaction, job_id, index)

    async def on_settings_change(
        self, interaction: discord.Interaction[Any], field: str, value: object
    ) -> None:
        await self._member.on_settings_change(interaction, field, value)

    async def on_settings_toggle(self, interaction: discord.Interaction[Any], field: str) -> None:
        await self._member.on_settings_toggle(interaction, field)


async def run_discord(
    config: Config,
    token: str,
    *,
    web_secrets: WebSecrets | None = None,
    companions: Sequence[StartCompanion] = (),
) -> None:
    bot = ImagineBot(config, web_secrets=web_secrets, companions=companions)
    loop = asyncio.get_running_loop()
    # SIGTERM (docker stop, systemd) drains: running jobs finish or are handed back.
    loop.add_signal_handler(signal.SIGTERM, lambda: asyncio.ensure_future(bot.close()))
    async with bot:
        await bot.start(token)
