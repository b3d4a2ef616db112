"""`/admin …`: credits, allowances, bans, the queue, the workers and the audit log.

Who may run which (bot/app/access.py): every subcommand needs an admin, checked here in the bot
(a server can override Discord's default_permissions). What every server shares (credits and
allowances, bans, pausing the queue, the workers) changes only by an owner's hand. A server
admin sees only their own server: the audit log's and the queue's rows of that server, and the
balance and ledger of that server's members (their jobs there and the owners' grants).
"""

from __future__ import annotations

from typing import Any

import discord
from discord import app_commands

from bot.app import render
from bot.app.access import AdminScope
from bot.core.clock import Clock
from bot.core.service import AdminService
from bot.discord.actors import Actors
from bot.discord.interactions import reply

# Subcommands that change what every server the bot serves shares.
OWNER_ONLY = frozenset(
    {
        "admin credits grant",
        "admin credits set",
        "admin quota user",
        "admin quota role",
        "admin ban",
        "admin unban",
        "admin queue pause",
        "admin queue resume",
        "admin workers",
    }
)


class NotAdmin(app_commands.CheckFailure):
    def __init__(self) -> None:
        super().__init__(
            "Only this server's managers (Manage Server) or the bot's owners can use /admin."
        )


class NotOwner(app_commands.CheckFailure):
    def __init__(self, command: str) -> None:
        super().__init__(
            f"/{command} changes what every server the bot serves shares (credits, "
            "allowances, bans, the queue, the workers): only the bot's owners (admin_user_ids "
            "in its config) can use it. Nothing was changed."
        )


class NotHere(app_commands.CheckFailure):
    def __init__(self, user: discord.abc.User) -> None:
        super().__init__(
            f"{user.mention} isn't a member of this server: as a server admin you see only "
            "this server's members."
        )


class AdminCommands(app_commands.Group):
    """`/admin …`; every subcommand passes `interaction_check` first, in the bot."""

    def __init__(self, admin: AdminService, actors: Actors, clock: Clock) -> None:
        super().__init__(
            name="admin",
            description="Manage credits, quotas, bans and the queue",
            default_permissions=discord.Permissions(manage_guild=True),
            guild_only=True,
        )
        self.admin = admin
        self.actors = actors
        self.clock = clock

    async def interaction_check(self, interaction: discord.Interaction[Any]) -> bool:
        scope = self.actors.admin_scope(interaction)
        if scope is AdminScope.NONE:
            raise NotAdmin()
        command = interaction.command.qualified_name if interaction.command else ""
        if command in OWNER_ONLY and scope is not AdminScope.OWNER:
            raise NotOwner(command)
        return True

    def _server(self, interaction: discord.Interaction[Any]) -> int | None:
        """The server a view is limited to: the admin's own, unless they are an owner."""
        if self.actors.admin_scope(interaction) is AdminScope.OWNER:
            return None
        return interaction.guild_id

    def _check_member(self, interaction: discord.Interaction[Any], user: discord.abc.User) -> None:
        """A server admin may look only at members of their own server."""
        server = self._server(interaction)
        if server is None:
            return
        if not (isinstance(user, discord.Member) and user.guild.id == server):
            raise NotHere(user)

    credits = app_commands.Group(name="credits", description="Granted credits of a member")
    quota = app_commands.Group(name="quota", description="Daily free allowance")
    queue = app_commands.Group(name="queue", description="The job queue")

    @credits.command(name="grant", description="Add credits to a member's balance")
    @app_commands.describe(
        user="Who gets them", amount="How many credits", reason="Shown in the ledger"
    )
    async def credits_grant(
        self,
        interaction: discord.Interaction[Any],
        user: discord.User,
        amount: app_commands.Range[int, 1, 1_000_000],
        reason: app_commands.Range[str, 0, 200] = "",
    ) -> None:
        balance = await self.admin.grant(user.id, amount, interaction.user.id, reason)
        await reply(
            interaction,
            f"Granted {amount} credits to {user.mention}; granted balance now {balance.granted}.",
        )

    @credits.command(name="set", description="Set a member's granted balance")
    @app_commands.describe(
        user="Whose balance", amount="The new granted balance", reason="Shown in the ledger"
    )
    async def credits_set(
        self,
        interaction: discord.Interaction[Any],
        user: discord.User,
        amount: app_commands.Range[int, 0, 1_000_000],
        reason: app_commands.Range[str, 0, 200] = "",
    ) -> None:
        balance = await self.admin.set_balance(user.id, amount, interaction.user.id, reason)
        await reply(interaction, f"{user.mention}'s granted balance is now {balance.granted}.")

    @credits.command(name="show", description="Show a member's balance")
    @app_commands.describe(user="Whose balance")
    async def credits_show(self, interaction: discord.Interaction[Any], user: discord.User) -> None:
        self._check_member(interaction, user)
        roles = tuple(r.id for r in getattr(user, "roles", ()) if r.id != interaction.guild_id)
        balance = await self.admin.balance(user.id, roles)
        entries = await self.admin.ledger(user.id, 5, self._server(interaction))
        await reply(
            interaction,
            f"{user.mention}:\n" + render.balance_text(balance, entries, self.clock()),
        )

    @quota.command(name="user", description="Set a member's daily free allowance (empty = default)")
    @app_commands.describe(user="Whose allowance", amount="Credits per UTC day; leave out to reset")
    async def quota_user(
        self,
        interaction: discord.Interaction[Any],
        user: discord.User,
        amount: app_commands.Range[int, 0, 1_000_000] | None = None,
    ) -> None:
        await self.admin.set_user_allowance(user.id, amount, interaction.user.id)
        what = f"{amount} credits a day" if amount is not None else "the default allowance"
        await reply(interaction, f"{user.mention} now gets {what}.")

    @quota.command(
        name="role", description="Set the daily free allowance of a role (empty = remove)"
    )
    @app_commands.describe(role="Which role", amount="Credits per UTC day; leave out to remove")
    async def quota_role(
        self,
        interaction: discord.Interaction[Any],
        role: discord.Role,
        amount: app_commands.Range[int, 0, 1_000_000] | None = None,
    ) -> None:
        await self.admin.set_role_allowance(role.id, amount, interaction.user.id)
        what = f"{amount} credits a day" if amount is not None else "no role allowance"
        await reply(interaction, f"Members with {role.mention} now get {what}.")

    @app_commands.command(name="ban", description="Stop a member from using the bot")
    @app_commands.describe(user="Who", reason="Why (kept in the audit log)")
    async def ban(
        self,
        interaction: discord.Interaction[Any],
        user: discord.User,
        reason: app_commands.Range[str, 0, 200] = "",
    ) -> None:
        cancelled = await self.admin.ban(user.id, interaction.user.id, reason)
        await reply(
            interaction,
            f"{user.mention} is banned; {cancelled} queued job(s) cancelled and refunded.",
        )

    @app_commands.command(name="unban", description="Let a banned member use the bot again")
    @app_commands.describe(user="Who", reason="Why (kept in the audit log)")
    async def unban(
        self,
        interaction: discord.Interaction[Any],
        user: discord.User,
        reason: app_commands.Range[str, 0, 200] = "",
    ) -> None:
        await self.admin.unban(user.id, interaction.user.id, reason)
        await reply(interaction, f"{user.mention} may use the bot again.")

    @app_commands.command(name="ledger", description="A member's recent credit movements")
    @app_commands.describe(user="Whose ledger", limit="How many entries")
    async def ledger(
        self,
        interaction: discord.Interaction[Any],
        user: discord.User,
        limit: app_commands.Range[int, 1, 25] = 10,
    ) -> None:
        self._check_member(interaction, user)
        entries = await self.admin.ledger(user.id, limit, self._server(interaction))
        lines = [render.ledger_line(e) for e in entries] or ["No ledger entries."]
        await reply(interaction, f"Ledger of {user.mention}:\n" + "\n".join(lines))

    @app_commands.command(name="audit", description="Recent refusals and flagged images")
    @app_commands.describe(limit="How many entries")
    async def audit(
        self, interaction: discord.Interaction[Any], limit: app_commands.Range[int, 1, 25] = 10
    ) -> None:
        entries = await self.admin.audit(limit, guild_id=self._server(interaction))
        await reply(interaction, render.audit_text(entries))

    @queue.command(name="show", description="Show running and queued jobs")
    async def queue_show(self, interaction: discord.Interaction[Any]) -> None:
        await reply(
            interaction, render.queue_text(await self.admin.queue(self._server(interaction)))
        )

    @queue.command(name="pause", description="Stop starting new jobs (running ones finish)")
    async def queue_pause(self, interaction: discord.Interaction[Any]) -> None:
        await self.admin.pause(interaction.user.id)
        await reply(interaction, "The queue is paused; new submissions are refused until resumed.")

    @queue.command(name="resume", description="Start jobs again")
    async def queue_resume(self, interaction: discord.Interaction[Any]) -> None:
        await self.admin.resume(interaction.user.id)
        await reply(interaction, "The queue is running again.")

    @app_commands.command(
        name="workers", description="Workers: node, GPU, loaded models and current job"
    )
    async def workers(self, interaction: discord.Interaction[Any]) -> None:
        await reply(interaction, render.workers_text(self.admin.workers()))
