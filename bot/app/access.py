"""Which servers the bot serves, and whose word counts where: the one statement of both.

Anyone can invite a bot whose "Public Bot" switch is on, and whoever invites it manages the server
it lands in. So nothing a server grants counts by itself:

- The bot serves the servers listed in `[discord] guild_ids`. An interaction from any other
  server gets a short private refusal and nothing else (`gate_refusal`).
- In DMs the bot answers buttons and forms under its own DM messages (results it delivered
  there), never a command: commands are synced to the listed servers only, so a command from a
  DM is one left registered by an older setup.
- Owners (`admin_user_ids`, and the application's owner or team in the developer portal, who
  hold its token anyway) are admins everywhere, over every member's jobs and records, and
  they alone change what is shared by every server: credits and allowances (a balance is spent
  in every server), bans (they hold everywhere), the queue (one for all) and the workers.
- Server admins (Manage Server, or a role in `admin_role_ids`, which belongs to one server) count
  only inside a listed server and only over that server: its members' jobs (cancel, delete a
  result) and what `/admin` shows (the audit log, the queue, a member's balance and ledger).

Nothing here imports discord: the front end passes in what the interaction says.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from enum import StrEnum

from bot.config import DiscordConfig

UNLISTED_SERVER = (
    "This bot isn't set up for this server, so it does nothing here. "
    "(Its owner lists the servers it serves.)"
)
DM_COMMAND = "Commands work in the server, not in DMs. Nothing was done."


class AdminScope(StrEnum):
    """How far a member's admin rights reach."""

    NONE = "none"
    SERVER = "server"  # their own listed server's members, jobs and records
    OWNER = "owner"  # everything, every server


def serves(settings: DiscordConfig, guild_id: int | None) -> bool:
    """Whether the bot serves this server (None, a DM, is not a server)."""
    return guild_id is not None and guild_id in settings.guild_ids


def gate_refusal(settings: DiscordConfig, guild_id: int | None, is_command: bool) -> str | None:
    """None when an interaction may go on to its handler, else what to answer instead.
    `is_command`: a slash or context-menu command, or its autocomplete (not a button/form)."""
    if guild_id is None:
        return DM_COMMAND if is_command else None
    return None if serves(settings, guild_id) else UNLISTED_SERVER


def admin_scope(
    settings: DiscordConfig,
    *,
    user_id: int,
    guild_id: int | None,
    role_ids: Iterable[int] = (),
    manage_guild: bool = False,
    owner_ids: Collection[int] | None = None,
) -> AdminScope:
    """The member's admin rights for an interaction in `guild_id` (None: a DM). `role_ids` and
    `manage_guild` are what the interaction says about them in that server; `owner_ids` the
    owners (default: `admin_user_ids`)."""
    owners = settings.admin_user_ids if owner_ids is None else owner_ids
    if user_id in owners:
        return AdminScope.OWNER
    if not serves(settings, guild_id):
        return AdminScope.NONE
    # The server's @everyone role has the server's id: it would make every member an admin.
    roles = {role for role in role_ids if role != guild_id}
    if manage_guild or roles & settings.admin_role_ids:
        return AdminScope.SERVER
    return AdminScope.NONE


def may_manage(scope: AdminScope, actor_guild_id: int | None, target_guild_id: int | None) -> bool:
    """Whether an admin of `scope`, acting in `actor_guild_id`, may act on something (a job,
    a record) that belongs to `target_guild_id`."""
    if scope is AdminScope.OWNER:
        return True
    return (
        scope is AdminScope.SERVER
        and actor_guild_id is not None
        and target_guild_id == actor_guild_id
    )
