"""Whose job a member may see on the web: their own, and in Explore the finished jobs of a
server they belong to whose owners share them. Anything else is a 404, exactly as for an id
that doesn't exist, so changing an id in a URL tells nobody what exists."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable
from pathlib import Path

from aiohttp import web

from bot.app.moderation import FLAGS_FILE, flagged_indices
from bot.core.jobs import output_dir_for
from bot.core.models import Job, JobState
from bot.web.context import context, require_member
from bot.web.errors import not_found
from bot.web.numbers import whole_number
from bot.web.sessions import Member

# Job ids in addresses: digits only, and no longer than SQLite's integers.
MAX_ID_DIGITS = 18


def job_id_in(request: web.Request, name: str = "job_id") -> int:
    job_id = whole_number(request.match_info.get(name, ""), MAX_ID_DIGITS)
    if job_id is None:
        raise not_found()
    return job_id


async def member_guilds(request: web.Request, member: Member) -> list[int]:
    """The served servers the member belongs to, as far as the bot knows: the one their /web
    link came from, and those they made jobs in (owners: all of them)."""
    ctx = context(request)
    served = list(ctx.services.config.discord.guild_ids)
    if member.is_owner:
        return served
    found = set(await ctx.gallery.member_guilds(member.user_id, served))
    if member.guild_id in served:
        found.add(member.guild_id)
    return [guild_id for guild_id in served if guild_id in found]


async def visible_job(request: web.Request) -> tuple[Job, bool]:
    """The job named in the address and whether it is the member's own; 404 otherwise."""
    member = require_member(request)
    ctx = context(request)
    job = await ctx.services.core.jobs.get(job_id_in(request))
    if job is None:
        raise not_found()
    if job.owner.user_id == member.user_id:
        return job, True
    if (
        job.state is JobState.SUCCEEDED
        and not job.images_expired
        and job.owner.guild_id is not None
        and job.owner.guild_id in await member_guilds(request, member)
        and await ctx.store.shares(job.owner.user_id, job.owner.guild_id)
        # Discord shows flagged images behind a spoiler: not in the clear to others here.
        and not await flagged_indices(ctx.services.config.data_dir, job)
    ):
        return job, False
    raise not_found()


def _flagged_on_disk(data_dir: Path, job_ids: Iterable[int]) -> set[int]:
    """Which of these jobs' images the safety filter flagged (their `moderation.json` beside
    the images). A record that exists but can't be read counts as flagged, as in
    bot/app/moderation.py: hiding a safe image is the cheaper mistake."""
    flagged = set()
    for job_id in job_ids:
        try:
            record = json.loads((data_dir / output_dir_for(job_id) / FLAGS_FILE).read_text())
            if record["flagged"]:
                flagged.add(job_id)
        except FileNotFoundError:
            continue
        except (OSError, ValueError, KeyError, TypeError):
            flagged.add(job_id)
    return flagged


async def flagged_jobs(request: web.Request, job_ids: Iterable[int]) -> set[int]:
    data_dir = context(request).services.config.data_dir
    return await asyncio.to_thread(_flagged_on_disk, data_dir, list(job_ids))
