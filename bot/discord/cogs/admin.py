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
from bot.app.admin import (
    AdminDesk,
    AdminOp,
    AdminRefused,
    AdminSeat,
)
from bot.core.clock import Clock
from bot.discord.actors import Actors
from bot.discord.interactions import reply


class AdminCommands(app_commands.Group):
    """`/admin …`; every subcommand passes `interaction_check` first, in the bot, and the desk
    (bot/app/admin.py) checks the same rights again, as it does for the web."""

    def __init__(self, desk: AdminDesk, actors: Actors, clock: Clock) -> None:
        super().__init__(
            name="admin",
            description="Manage credits, quotas, bans and the queue",
            default_permissions=discord.Permissions(manage_guild=True),
            guild_only=True,
        )
        self.desk = desk
        self.actors = actors
        self.clock = clock

    async def interaction_check(self, interaction: discord.Interaction[Any]) -> bool:
        command = interaction.command.qualified_name if interaction.command else ""
        seat = self._seat(interaction)
        try:
            self.desk.require_admin(seat, "/admin")
            self.desk.authorize(seat, AdminOp(command.removeprefix("admin ")), f"/{command}")
        except AdminRefused as exc:
            raise app_commands.CheckFailure(str(exc)) from None
        return True

    def _seat(self, interaction: discord.Interaction[Any]) -> AdminSeat:
        return AdminSeat(
            interaction.user.id, self.actors.admin_scope(interaction), interaction.guild_id
        )

    def _check_member(self, interaction: discord.Interaction[Any], user: discord.abc.User) -> None:
        """A server admin may look only at members of their own server."""
        seat = self._seat(interaction)
        is_member = isinstance(user, discord.Member) and user.guild.id == seat.guild_id
        self.desk.check_member(seat, is_member, user.mention)

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
        balance = await self.desk.grant(self._seat(interaction), user.id, amount, reason)
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
        balance = await self.desk.set_balance(self._seat(interaction), user.id, amount, reason)
        await reply(interaction, f"{user.mention}'s granted balance is now {balance.granted}.")

    @credits.command(name="revoke", description="Take granted credits back from a member")
    @app_commands.describe(
        user="From whom", amount="How many credits", reason="Shown in the ledger"
    )
    async def credits_revoke(
        self,
        interaction: discord.Interaction[Any],
        user: discord.User,
        amount: app_commands.Range[int, 1, 1_000_000],
        reason: app_commands.Range[str, 0, 200] = "",
    ) -> None:
        balance = await self.desk.revoke(self._seat(interaction), user.id, amount, reason)
        await reply(
            interaction,
            f"Took {amount} credits back from {user.mention}; granted balance now "
            f"{balance.granted}.",
        )

    @credits.command(name="show", description="Show a member's balance")
    @app_commands.describe(user="Whose balance")
    async def credits_show(self, interaction: discord.Interaction[Any], user: discord.User) -> None:
        self._check_member(interaction, user)
        roles = tuple(r.id for r in getattr(user, "roles", ()) if r.id != interaction.guild_id)
        credits = await self.desk.member_credits(self._seat(interaction), user.id, roles, 5)
        await reply(
            interaction,
            f"{user.mention}:\n"
            + render.balance_text(credits.balance, credits.ledger.items, self.clock()),
        )

    @quota.command(name="user", description="Set a member's daily free allowance (empty = default)")
    @app_commands.describe(user="Whose allowance", amount="Credits per UTC day; leave out to reset")
    async def quota_user(
        self,
        interaction: discord.Interaction[Any],
        user: discord.User,
        amount: app_commands.Range[int, 0, 1_000_000] | None = None,
    ) -> None:
        await self.desk.set_user_allowance(self._seat(interaction), user.id, amount)
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
        await self.desk.set_role_allowance(self._seat(interaction), role.id, amount)
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
        cancelled = await self.desk.ban(self._seat(interaction), user.id, reason)
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
        await self.desk.unban(self._seat(interaction), user.id, reason)
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
        page = await self.desk.ledger(self._seat(interaction), user.id, limit)
        lines = [render.ledger_line(e) for e in page.items] or ["No ledger entries."]
        await reply(interaction, f"Ledger of {user.mention}:\n" + "\n".join(lines))

    @app_commands.command(name="audit", description="Recent refusals and flagged images")
    @app_commands.describe(limit="How many entries")
    async def audit(
        self, interaction: discord.Interaction[Any], limit: app_commands.Range[int, 1, 25] = 10
    ) -> None:
        page = await self.desk.audit(self._seat(interaction), limit)
        await reply(interaction, render.audit_text(page.items))

    @queue.command(name="show", description="Show running and queued jobs")
    async def queue_show(self, interaction: discord.Interaction[Any]) -> None:
        await reply(interaction, render.queue_text(await self.desk.queue(self._seat(interaction))))

    @queue.command(name="pause", description="Stop starting new jobs (running ones finish)")
    async def queue_pause(self, interaction: discord.Interaction[Any]) -> None:
        await self.desk.pause(self._seat(interaction))
        await reply(interaction, "The queue is paused; new submissions are refused until resumed.")

    @queue.command(name="resume", description="Start jobs again")
    async def queue_resume(self, interaction: discord.Interaction[Any]) -> None:
        await self.desk.resume(self._seat(interaction))
        await reply(interaction, "The queue is running again.")

    @app_commands.command(
        name="workers", description="Workers: node, GPU, loaded models and current job"
    )
    async def workers(self, interaction: discord.Interaction[Any]) -> None:
        await reply(interaction, render.workers_text(self.desk.workers(self._seat(interaction))))
