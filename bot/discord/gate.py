"""The door every Discord interaction comes through, before discord.py hands it to a command, a
button, a form or an autocomplete handler.

Two questions are asked there (bot/app/access.py and bot/app/refusals.py say why):
- Does the bot serve where it comes from? From a server not in `[discord] guild_ids`, or a
  command from a DM, it is answered with one short private line and goes no further: no
  handler, no database, no audit row.
- Is the member cooling down after too many refusals? Then the same, with how long to wait.

discord.py offers a check per command tree, per view and per modal, but no single hook before
all of them; one that is missed (a new button, a form left over from before a restart) would be
a way around the allow-list. So the gate wraps the gateway's INTERACTION_CREATE parser
(`ConnectionState.parsers`, the table the gateway reads each event's handler from), which every
interaction passes, once, at start.

It also looks at the servers the bot is in: each one not listed is logged, and with
`[discord] leave_other_guilds` the bot leaves it (at start and whenever it is added to one).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from typing import Any

import discord

from bot.app import access
from bot.app.refusals import RefusalLimiter
from bot.config import DiscordConfig

log = logging.getLogger(__name__)

# Interaction types discord.py routes to the command tree: commands and their autocomplete.
_COMMAND_TYPES = frozenset({2, 4})
_AUTOCOMPLETE = 4
# Unlisted servers already logged, so a flood from one writes one line, not thousands.
_MAX_LOGGED_SERVERS = 1000


class InteractionGate:
    def __init__(self, settings: DiscordConfig, refusals: RefusalLimiter) -> None:
        self.settings = settings
        self.refusals = refusals
        # Never cooled down; the bot adds the application's owners once it knows them.
        self.owner_ids: frozenset[int] = settings.admin_user_ids
        self.refused = 0
        self._logged: set[int] = set()
        self._answers: set[asyncio.Task[None]] = set()

    def install(self, state: Any) -> None:
        """Put the gate in front of `state`'s (the client's ConnectionState) interaction
        parser. Idempotent."""
        parse = state.parsers["INTERACTION_CREATE"]
        if getattr(parse, "__self__", None) is self:
            return

        def gated(data: dict[str, Any]) -> None:
            self.parse(state, data, parse)

        gated.__self__ = self  # type: ignore[attr-defined]
        state.parsers["INTERACTION_CREATE"] = gated

    def verdict(self, data: dict[str, Any]) -> str | None:
        """None to let the interaction through, else the line to answer it with."""
        user_id = _user_id(data)
        owner = user_id in self.owner_ids
        wait_s = 0.0 if owner or user_id is None else self.refusals.cooling(user_id)
        if wait_s > 0:
            return self.refusals.message(wait_s)
        raw_guild = data.get("guild_id")
        guild_id = int(raw_guild) if raw_guild is not None else None
        text = access.gate_refusal(self.settings, guild_id, data.get("type") in _COMMAND_TYPES)
        if text is not None and guild_id is not None and guild_id not in self._logged:
            if len(self._logged) < _MAX_LOGGED_SERVERS:
                self._logged.add(guild_id)
            log.warning(
                "interaction from server %s, which is not in [discord] guild_ids: refused "
                "(further ones from it are refused without a log line)",
                guild_id,
            )
        return text

    def parse(
        self, state: Any, data: dict[str, Any], parse: Callable[[dict[str, Any]], None]
    ) -> None:
        text = self.verdict(data)
        if text is None:
            parse(data)
            return
        self.refused += 1
        user_id = _user_id(data)
        if user_id is not None:
            self.refusals.record(user_id)
        try:
            interaction: discord.Interaction[Any] = discord.Interaction(data=data, state=state)  # type: ignore[arg-type]
        except Exception:  # a payload discord.py can't read: refused all the same, unanswered
            log.exception("could not read refused interaction %s", data.get("id"))
            return
        task = asyncio.create_task(_answer(interaction, text), name="gate-refusal")
        self._answers.add(task)
        task.add_done_callback(self._answers.discard)


async def _answer(interaction: discord.Interaction[Any], text: str) -> None:
    try:
        if interaction.type is discord.InteractionType.autocomplete:
            await interaction.response.autocomplete([])
        else:
            await interaction.response.send_message(text, ephemeral=True)
    except discord.HTTPException as exc:
        log.info("could not answer refused interaction %s: %s", interaction.id, exc)


def _user_id(data: dict[str, Any]) -> int | None:
    user = (data.get("member") or {}).get("user") or data.get("user") or {}
    raw = user.get("id")
    return int(raw) if raw is not None else None


async def check_guilds(settings: DiscordConfig, guilds: Iterable[discord.Guild]) -> list[int]:
    """Log each server the bot is in that is not listed, and leave it when the config says
    so; returns the ids of the servers left."""
    left = []
    for guild in guilds:
        if access.serves(settings, guild.id):
            continue
        if not settings.leave_other_guilds:
            log.warning(
                "the bot is in server %s (%r), which is not in [discord] guild_ids: it answers "
                "nothing there (set leave_other_guilds = true to leave such servers)",
                guild.id,
                guild.name,
            )
            continue
        try:
            await guild.leave()
        except discord.HTTPException as exc:
            log.warning("could not leave unlisted server %s (%r): %s", guild.id, guild.name, exc)
            continue
        log.warning("left server %s (%r): it is not in [discord] guild_ids", guild.id, guild.name)
        left.append(guild.id)
    return left
