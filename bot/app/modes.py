"""Relax, Fast and Turbo as members and server admins meet them: choosing one's mode (/fast,
/relax, /turbo), a server's relax switch, which mode a job runs in (a --fast/--relax/--turbo
flag, else the member's choice), and the lines the replies show (the mode and the expected
wait under a queued job, relax use in /balance, the modes and their costs in /help).

The core decides what each mode costs and when it runs (bot/core/mode_queue.py,
bot/core/modes.py, credits.mode_cost); this module only asks it and words the answers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from bot.app.actions import Actor, UserError
from bot.config import ModesConfig
from bot.core.models import Job, Mode
from bot.core.modes import RelaxUse, relax_off_text
from bot.core.service import Core

MODE_ICONS = {Mode.TURBO: "🚀", Mode.FAST: "⚡", Mode.RELAX: "🐢"}


def speed_mode(speeds: Sequence[str | None]) -> Mode | None:
    """The one mode the --fast/--relax/--turbo flags of a prompt's jobs ask for (None: none
    asked); a prompt whose permutations ask for two is refused, as all its jobs share one
    submit."""
    asked = {speed for speed in speeds if speed is not None}
    if len(asked) > 1:
        shown = " and ".join(f"--{speed}" for speed in sorted(asked))
        raise UserError(f"{shown}: one speed mode per prompt, please.")
    return Mode(asked.pop()) if asked else None


def cost_words(mode: Mode, config: ModesConfig) -> str:
    if mode is Mode.RELAX:
        if config.relax_cost_percent == 0:
            return "free"
        return f"{config.relax_cost_percent} % of the fast cost, rounded down"
    if mode is Mode.TURBO:
        return f"{config.turbo_cost_percent} % of the fast cost, rounded up"
    return "the credits /help lists"


def wait_words(wait_s: float) -> str:
    if not wait_s < 86_400:
        # Also inf and nan: a long average run times many jobs ahead can overflow.
        return "in more than a day"
    if wait_s < 60:
        return "within a minute"
    if wait_s < 3600:
        return f"in about {math.ceil(wait_s / 60)} min"
    return f"in about {math.ceil(wait_s / 3600)} h"


def modes_help(config: ModesConfig) -> str:
    """The modes and their costs, for /help and the README's words."""
    return "\n".join(
        [
            "**Speed modes** — `/fast`, `/relax`, `/turbo` set yours; `--fast`, `--relax` or "
            "`--turbo` in a prompt (a Remix prompt too) sets that job's. Buttons under an image "
            "use your mode.",
            f"• {MODE_ICONS[Mode.FAST]} Fast (the default): the job's credits; starts before "
            "every relax job.",
            f"• {MODE_ICONS[Mode.RELAX]} Relax: {cost_words(Mode.RELAX, config)}; starts only when "
            "no fast or turbo job can use a GPU, fair among relax members; "
            f"{config.relax_max_queued_per_user} waiting and {config.relax_max_per_day} a day per "
            "member (failed jobs don't count); a server may switch it off. No credits needed.",
            f"• {MODE_ICONS[Mode.TURBO]} Turbo: {cost_words(Mode.TURBO, config)}; starts before "
            "every fast job (the same GPUs, first in line); a job free in fast mode runs as fast.",
        ]
    )


class ModeDesk:
    """What a member or an admin does with modes, whatever the front end."""

    def __init__(self, core: Core) -> None:
        self._scheduler = core.scheduler
        self._store = core.scheduler.modes
        self.config = core.scheduler.modes.config

    async def mode_for(self, actor: Actor, asked: Mode | None = None) -> Mode:
        """The mode a job of this member runs in: the one its flags asked, else theirs."""
        return asked if asked is not None else await self._store.member_mode(actor.user_id)

    async def choose(self, actor: Actor, mode: Mode) -> str:
        """/fast, /relax, /turbo: the member's mode from now on (jobs already queued keep
        theirs). Relax is refused where the server switched it off; nothing is saved then."""
        mode = Mode(mode)
        if mode is Mode.RELAX and not await self._store.relax_enabled(actor.guild_id):
            raise UserError(relax_off_text(actor.guild_id))
        await self._store.set_member_mode(actor.user_id, mode)
        icon = MODE_ICONS[mode]
        if mode is Mode.RELAX:
            use = await self._store.relax_use(actor.user_id, actor.guild_id)
            return (
                f"{icon} Relax mode on: your jobs cost {cost_words(mode, self.config)} and start "
                "when no fast job needs a GPU (fair among relax members). "
                f"Today {use.today} of {use.per_day} relax jobs used; at most {use.max_queued} "
                "waiting at once. /fast goes back."
            )
        if mode is Mode.TURBO:
            return (
                f"{icon} Turbo mode on: your jobs start ahead of every fast job and cost "
                f"{cost_words(mode, self.config)}. /fast goes back."
            )
        return f"{icon} Fast mode on: your jobs cost their credits and start before relax jobs."

    async def set_server_relax(self, actor: Actor, enabled: bool) -> str:
        """A server's relax switch, by an admin of that server or an owner of the bot (the
        rules of bot/app/access.py). Relax jobs already queued there still run."""
        if actor.guild_id is None:
            raise UserError("Relax is switched per server: use this in the server.")
        if not (actor.is_admin or actor.is_owner):
            raise UserError(
                "Only this server's managers (Manage Server) or the bot's owners can switch "
                "relax mode here."
            )
        await self._store.set_relax_enabled(actor.guild_id, enabled, actor.user_id)
        if enabled:
            return "Relax mode is on in this server: members may use /relax and --relax."
        return (
            "Relax mode is off in this server: /relax and --relax are refused here (relax jobs "
            "already waiting still run)."
        )

    async def balance_lines(self, actor: Actor) -> list[str]:
        """What /balance adds: the member's mode and their relax use today."""
        mode = await self._store.member_mode(actor.user_id)
        use: RelaxUse = await self._store.relax_use(actor.user_id, actor.guild_id)
        relax = f"{use.today} of {use.per_day} relax jobs used today"
        if use.queued:
            relax += f", {use.queued} waiting"
        if not use.open_here:
            relax += " (relax is switched off here)"
        return [f"• Mode: {MODE_ICONS[mode]} {mode.value} (/fast, /relax, /turbo)", f"• {relax}"]

    def queue_note(self, job: Job) -> str:
        """The mode a queued job runs in and about when it starts."""
        icon = MODE_ICONS[job.mode]
        head = f"{icon} {job.mode.value.capitalize()} mode"
        if job.mode is not Mode.FAST:
            cost = cost_words(job.mode, self.config)
            credits = "credit" if job.cost == 1 else "credits"
            head += " (free)" if cost == "free" else f" ({cost}: {job.cost} {credits})"
        wait_s = self._scheduler.expected_wait_s(job.id)
        if wait_s is None:  # picked already
            return f"{head}: starting now"
        when = f"expected to start {wait_words(wait_s)}"
        if job.mode is Mode.RELAX:
            when += ", later if fast jobs arrive"
        return f"{head}: {when}"
