"""Personalization for members, whatever the front end: `--p` on a prompt (or on by default in
/settings), the U1-U4 picks that teach it, /rank's rounds, and erasing one's profile.

The taste itself (pairs, profiles, the fit) is bot/core/taste.py; the ranking that uses it is
generation/taste.py, in the worker. A `--p` that cannot be honoured for lack of ratings still
runs, ranked as usual, with a note saying how many more are needed; a code that names no
profile refuses the whole prompt before anything is queued or charged.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path

from PIL import Image

from bot.app.actions import Actor, UserError
from bot.app.inputs import row_png
from bot.app.moderation import flagged_indices
from bot.core.models import ImageExpired, Job, JobState
from bot.core.service import Core
from bot.core.taste import MIN_PAIRS, Profile, Ref, TasteStore
from generation.contract import MAX_CANDIDATES, Personalization
from generation.prompt import ParsedPrompt

log = logging.getLogger(__name__)

# /rank shows the two images side by side, each scaled to this height.
RANK_SIDE_PX = 384
RATINGS_HOW = "press U1–U4 on the images you like best, or use /rank"


class Choice(StrEnum):
    LEFT = "left"
    RIGHT = "right"
    SKIP = "skip"


@dataclass(frozen=True)
class RankRound:
    """Two of the member's images to compare, and the picture showing them side by side."""

    left: Ref
    right: Ref
    png: bytes
    ratings: int
    # What the previous answer did, for the message ("Recorded: left over right").
    note: str = ""


class Personalize:
    def __init__(self, core: Core, store: TasteStore) -> None:
        self.core = core
        self.store = store

    # ----- --p -------------------------------------------------------------------------

    async def apply(
        self, actor: Actor, jobs: Sequence[ParsedPrompt], by_default: bool
    ) -> tuple[list[ParsedPrompt], tuple[str, ...]]:
        """The jobs with `request.personalize` set where `--p` (or the /settings default)
        asks and the profile is ready, and the notes to show. Raises UserError for a code
        that names no profile: nothing is queued."""
        resolved: dict[tuple[str, ...], tuple[Personalization | None, str]] = {}
        out: list[ParsedPrompt] = []
        notes: list[str] = []
        for job in jobs:
            codes = job.personalize
            if codes is None and not by_default:
                out.append(job)
                continue
            key = codes or ()
            if key not in resolved:
                resolved[key] = await self._resolve(actor, key, asked=codes is not None)
            taste, note = resolved[key]
            if note and note not in notes:
                notes.append(note)
            if taste is not None:
                job = replace(job, request=job.request.with_changes(personalize=taste))
            out.append(job)
        return out, tuple(notes)

    async def _resolve(
        self, actor: Actor, codes: tuple[str, ...], asked: bool
    ) -> tuple[Personalization | None, str]:
        how = "--p" if asked else "personalization (on in /settings)"
        if not codes:
            profiles = [await self.store.profile(actor.user_id)]
        else:
            profiles = []
            for code in codes:
                found = await self.store.by_code(code)
                if found is None:
                    raise UserError(
                        f"--p: no profile has the code `{code}` (your own code is in /info; a "
                        "profile that was erased takes its code with it). Nothing was queued."
                    )
                profiles.append(found)
        ready = [p for p in profiles if p.ready]
        short = [p for p in profiles if not p.ready]
        if not ready:
            return None, f"{how}: {_short_text(short, actor.user_id)}; ranked as usual"
        taste = await self.store.personalization(ready)
        if taste is None:
            if not any([await self.store.has_direction(p) for p in ready]):
                return None, (
                    f"{how}: the ratings so far show no preference (the images rated look "
                    "alike to the ranker); ranked as usual"
                )
            return None, f"{how}: the profile was made with another ranker; ranked as usual"
        whose = ", ".join(
            "your taste" if p.user_id == actor.user_id else f"profile `{p.code}`" for p in ready
        )
        pairs = sum(p.pairs for p in ready)
        note = f"{how}: ranked by {whose} ({pairs} ratings) as well as the prompt"
        if short:
            note += f"; {_short_text(short, actor.user_id)}, left out"
        return taste, note

    # ----- signals ---------------------------------------------------------------------

    async def picked(self, actor: Actor, job: Job, position: int) -> None:
        """U1-U4 on the member's own grid: that image preferred over the job's other
        candidates. Someone else's press (an admin's) says nothing about the owner's taste."""
        if job.result is None or actor.user_id != job.owner.user_id:
            return
        if not 0 <= position < len(job.result.candidate_indices):
            return
        candidate = job.result.candidate_indices[position]
        try:
            added = await self.store.record_pick(actor.user_id, job.id, candidate)
        except Exception:
            # The picture is what the member asked for; a lost rating must not withhold it.
            log.exception("taste: could not record the pick of job %d", job.id)
            return
        if added:
            log.info(
                "taste: member %d picked job %d #%d (%d pairs)",
                actor.user_id,
                job.id,
                candidate,
                added,
            )

    # ----- /rank -----------------------------------------------------------------------

    async def next_round(self, actor: Actor, note: str = "") -> RankRound:
        shown = await self._shown_to(
            actor, await self.store.rank_candidates(actor.user_id, actor.guild_id)
        )
        pair = await self.store.next_pair(actor.user_id, random.Random(), shown=shown)
        if pair is None:
            raise UserError(
                "Nothing to compare yet: /rank shows two of your own images (or of this "
                "server's Explore), and there are fewer than two still kept. Make some with "
                "/imagine first."
            )
        (left, left_pos), (right, right_pos) = pair
        paths = [
            await self._image_path(left.job_id, left_pos),
            await self._image_path(right.job_id, right_pos),
        ]
        png = await asyncio.to_thread(side_by_side, paths)
        profile = await self.store.profile(actor.user_id)
        return RankRound(left, right, png, profile.pairs, note)

    async def answer(self, actor: Actor, left: Ref, right: Ref, choice: Choice) -> RankRound:
        """Record a /rank answer (after checking both images are the member's own), then
        the next round."""
        if left == right:
            raise UserError("/rank compares two different images; run /rank again.")
        for ref in (left, right):
            await self._own_candidate(actor, ref)
        note = "Skipped."
        if choice is not Choice.SKIP:
            winner, loser = (left, right) if choice is Choice.LEFT else (right, left)
            if await self.store.record_choice(actor.user_id, winner, loser):
                note = f"Recorded: {choice.value} preferred."
            else:
                note = "Those images have expired; nothing recorded."
        return await self.next_round(actor, note)

    async def profile(self, actor: Actor) -> Profile:
        return await self.store.profile(actor.user_id)

    async def erase(self, actor: Actor) -> int:
        return await self.store.erase(actor.user_id)

    # ----- internals -------------------------------------------------------------------

    async def _own_candidate(self, actor: Actor, ref: Ref) -> Job:
        """A candidate named by a button (hostile until checked): a job of this member's (or
        of this server's Explore), kept, with that candidate among its shown images."""
        job = await self.core.jobs.get(ref.job_id) if ref.storable else None
        if job is None or (
            job.owner.user_id != actor.user_id
            and not await self.store.in_explore(job.id, actor.guild_id)
        ):
            raise UserError("/rank compares your own images (and this server's Explore) only.")
        if job.state is not JobState.SUCCEEDED or job.result is None or job.pruned_at:
            raise UserError("That image has expired; run /rank again.")
        if ref.candidate not in job.result.candidate_indices:
            raise UserError("/rank: that image isn't one of the job's.")
        return job

    async def _shown_to(
        self, actor: Actor, candidates: Sequence[tuple[Ref, int]]
    ) -> list[tuple[Ref, int]]:
        """Without other members' images the safety filter flagged: Discord shows those
        behind a spoiler and the web home's Explore not at all (their owner still sees them)."""
        hidden: dict[int, set[int]] = {}
        for ref, _ in candidates:
            if ref.job_id in hidden:
                continue
            job = await self.core.jobs.get(ref.job_id)
            if job is None:
                hidden[ref.job_id] = set(range(MAX_CANDIDATES))
            elif job.owner.user_id == actor.user_id:
                hidden[ref.job_id] = set()
            else:
                hidden[ref.job_id] = await flagged_indices(self.core.jobs.data_dir, job)
        return [(ref, pos) for ref, pos in candidates if pos not in hidden[ref.job_id]]

    async def _image_path(self, job_id: int, position: int) -> Path:
        job = await self.core.jobs.require(job_id)
        try:
            return job.image_path(self.core.jobs.data_dir, position)
        except ImageExpired as exc:
            raise UserError(str(exc)) from None


def _short_text(profiles: Sequence[Profile], user_id: int) -> str:
    parts = [
        (
            f"your taste needs {p.missing} more rating{'s' if p.missing != 1 else ''} "
            f"({p.pairs} of {MIN_PAIRS}; {RATINGS_HOW})"
            if p.user_id == user_id
            else f"profile `{p.code}` has only {p.pairs} of the {MIN_PAIRS} ratings needed"
        )
        for p in profiles
    ]
    return "; ".join(parts)


def side_by_side(paths: Sequence[Path]) -> bytes:
    """The images next to each other at one height, with a gap, as PNG (runs off the loop)."""
    images = []
    for path in paths:
        with Image.open(path) as opened:
            image = opened.convert("RGB")
        scale = RANK_SIDE_PX / image.height
        images.append(image.resize((max(1, round(image.width * scale)), RANK_SIDE_PX)))
    return row_png(images, gap=16)


def rank_text(round_: RankRound) -> str:
    """/rank's message: what the two pictures are for, and how far the member has come."""
    lines = [f"✅ {round_.note}"] if round_.note else []
    lines.append("**Which of these two do you like better?**")
    progress = (
        f"{round_.ratings} ratings: `--p` ranks by your taste"
        if round_.ratings >= MIN_PAIRS
        else f"{round_.ratings} of the {MIN_PAIRS} ratings `--p` needs"
    )
    lines.append(
        f"Your answers (and your U1–U4 picks) teach `--p` your taste — {progress}. "
        "Answer as many as you like."
    )
    return "\n".join(lines)


def taste_line(profile: Profile) -> str:
    """/info's line about the member's taste profile."""
    state = (
        "`--p` ranks by it"
        if profile.ready
        else f"`--p` needs {profile.missing} more ({RATINGS_HOW})"
    )
    return (
        f"**Taste profile** (`--p`): code `{profile.code}`, {profile.pairs} ratings — {state}. "
        f"Others use it with `--p {profile.code}`; erase it in /settings."
    )


PERSONALIZATION_HELP = (
    "**Personalization** (`--p`): every candidate's CLIP picture embedding is kept (compact, "
    "about 2 KB a job, deleted with the job), and each U1–U4 you press says you prefer that "
    "image to the grid's other candidates; `/rank` asks you to pick the better of two of your "
    f"images, as many rounds as you like. From {MIN_PAIRS} such ratings on, `--p` (or "
    "`--personalize`) ranks each candidate by your taste as well as by the prompt, and the "
    "result says *Personalized*; below that it ranks as usual and says how many more are "
    "needed. `--p CODE` uses another member's shared profile (`/info` shows your code and "
    "ratings); `/settings` turns `--p` on by default, and *Erase taste profile* deletes your "
    "ratings and code."
)
