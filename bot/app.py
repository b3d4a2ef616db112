"""What users can do, whatever front end they use: Discord or the console.

Both front ends call these methods and only render what comes back, so the rules (who may press
which button, what a U2 or a reroll means, rate limits, prompt filtering) live in one place.
Nothing here imports discord.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from bot import render
from bot.config import Config
from bot.core.clock import system_clock
from bot.core.models import ActiveJob, Balance, ImageExpired, Job, JobKind, JobState, Owner, Refused
from bot.core.preferences import Preferences, PreferenceStore
from bot.core.service import Core
from bot.moderation import PromptFilter, audit_refusal, make_output_check
from generation.contract import MAX_SEED, GenerationRequest, upscale_request, variation_request
from generation.prompt import (
    ImagineOptions,
    ParsedPrompt,
    PromptDefaults,
    PromptError,
    parse_jobs,
)

log = logging.getLogger(__name__)

# New seeds leave room for seed + i of every candidate.
_SEED_LIMIT = MAX_SEED - 16


class UserError(Exception):
    """A refusal or mistake whose message is written for the user and shown as is."""


class Action(StrEnum):
    """What a button asks for; the value is what its custom_id carries."""

    UPSCALE = "U"  # U1–U4 on a grid
    VARY = "V"  # V1–V4 on a grid
    REROLL = "R"  # 🔄 on a grid
    VARY_SUBTLE = "VS"  # on an upscaled image
    VARY_STRONG = "VX"  # on an upscaled image
    UPSCALE_AGAIN = "UP"  # "Upscale (2x)" on an upscaled image
    CANCEL = "X"  # while a job waits or runs

    @property
    def needs_index(self) -> bool:
        return self in (Action.UPSCALE, Action.VARY)


@dataclass(frozen=True)
class Actor:
    """Who is asking, as the front end knows them."""

    user_id: int
    guild_id: int | None = None
    channel_id: int | None = None
    role_ids: tuple[int, ...] = ()
    is_admin: bool = False

    @property
    def owner(self) -> Owner:
        return Owner(self.user_id, self.guild_id, self.channel_id, self.role_ids)


@dataclass(frozen=True)
class MemberInfo:
    """What /info shows a member about themselves."""

    balance: Balance
    jobs: tuple[ActiveJob, ...]
    preferences: Preferences


@dataclass(frozen=True)
class Submitted:
    job: Job
    notes: tuple[str, ...] = ()
    position: int | None = None


async def open_core(
    config: Config, is_nsfw_channel: Callable[[int | None], bool], **options: Any
) -> Core:
    """The core with the image safety check every front end uses."""
    output_check = make_output_check(config.moderation, config.data_dir, is_nsfw_channel)
    if config.moderation.nsfw_check:
        # Fail at start if the classifier can't load, not on every user's first job.
        await asyncio.to_thread(output_check.safety.load)
    core = await Core.open(config, output_check=output_check, **options)
    # The audit log only exists once the core is open, and the core needs the check to open.
    output_check.audit = core.audit
    return core


def random_seed() -> int:
    return secrets.randbelow(_SEED_LIMIT + 1)


class ImagineApp:
    def __init__(
        self,
        config: Config,
        core: Core,
        *,
        seed_source: Callable[[], int] = random_seed,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.core = core
        self.prompt_filter = PromptFilter(config.moderation)
        self._seed_source = seed_source
        self._monotonic = monotonic
        self._last_submit: dict[int, float] = {}
        self.preferences = PreferenceStore(core.db, config.engine, system_clock)

    # ----- creating jobs ---------------------------------------------------------------------

    def parse_jobs(
        self,
        text: str,
        options: ImagineOptions | None = None,
        model: str | None = None,
        defaults: PromptDefaults | None = None,
    ) -> list[ParsedPrompt]:
        """Every job a prompt asks for ({…} permutations, --repeat), parsed without queueing
        anything (pure; raises UserError for the whole prompt)."""
        try:
            return parse_jobs(
                text,
                self.config.engine,
                model=model,
                options=options,
                max_jobs=self.config.scheduler.max_jobs_per_prompt,
                seed_source=self._seed_source,
                defaults=defaults,
            )
        except PromptError as exc:
            raise UserError(str(exc)) from None

    async def imagine(
        self,
        actor: Actor,
        text: str,
        options: ImagineOptions | None = None,
        model: str | None = None,
    ) -> list[Submitted]:
        """Queue every job the prompt asks for, all or none; one for a plain prompt. Several
        jobs each carry a note saying which of how many they are (the first: at what cost)."""
        self._check_cooldown(actor)
        # The member's /prefer shortcuts and suffix, and their /settings defaults under
        # whatever was typed.
        prefs = await self.preferences.get(actor.user_id)
        defaults = prefs.prompt_defaults(self.config.engine)
        parsed = self.parse_jobs(prefs.expand(text), options, model, defaults)
        # Only what is asked for is filtered: "--no gore" steers away from what it names.
        for prompt in dict.fromkeys(job.request.prompt for job in parsed):
            await self._check_prompt(actor, text, prompt)
        jobs = await self._submit(actor, [job.request for job in parsed], JobKind.IMAGINE, None)
        return [
            Submitted(
                job,
                (*render.batch_notes(jobs, index), *parsed_job.notes),
                self.core.scheduler.queue_position(job.id),
            )
            for index, (job, parsed_job) in enumerate(zip(jobs, parsed, strict=True))
        ]

    async def press(self, actor: Actor, job_id: int, action: Action, index: int = 0) -> Submitted:
        """A button press on job `job_id`; `index` is 1-based for U#/V#."""
        job = await self._job_for(actor, job_id)
        if action is Action.CANCEL:
            raise ValueError("action: use cancel() for the cancel button")
        if job.state is not JobState.SUCCEEDED or job.result is None:
            raise UserError(f"Job {job.id} has no images to work from ({job.state.value}).")
        try:
            request, kind, parent = await self._derived_request(job, action, index)
        except ImageExpired as exc:  # deleted by the [storage] retention policy
            raise UserError(str(exc)) from None
        (submitted,) = await self._submit(actor, [request], kind, parent)
        return Submitted(submitted, (), self.core.scheduler.queue_position(submitted.id))

    async def cancel(self, actor: Actor, job_id: int) -> Job:
        job = await self._job_for(actor, job_id)
        if job.state.terminal:
            raise UserError(f"Job {job.id} has already {_past_tense(job.state)}.")
        await self.core.scheduler.cancel(job.id, actor.user_id)
        return await self.core.jobs.require(job.id)

    def can_upscale(self, job: Job) -> bool:
        """Whether a 2x upscale of this job's images stays inside the pixel budget."""
        if job.result is None:
            return False
        return job.result.width * job.result.height * 4 <= self.config.engine.max_pixels

    async def check_delete(self, actor: Actor, job_id: int) -> Job:
        """The job whose result message `actor` wants deleted: their own, or anyone's for an
        admin. Only the message goes; the files follow the retention rules, because other
        jobs' buttons may still work from them."""
        job = await self._job_for(actor, job_id)
        if not job.state.terminal:
            raise UserError(f"Job {job.id} is still {job.state.value}; use its Cancel button.")
        return job

    # ----- reading ---------------------------------------------------------------------------

    async def info(self, actor: Actor) -> MemberInfo:
        balance = await self.core.credits.balance(actor.user_id, actor.role_ids)
        jobs = await self.core.scheduler.user_jobs(actor.user_id)
        return MemberInfo(balance, tuple(jobs), await self.preferences.get(actor.user_id))

    async def job(self, actor: Actor, job_id: int) -> Job:
        return await self._job_for(actor, job_id, must_own=False)

    # ----- internals -------------------------------------------------------------------------

    async def _job_for(self, actor: Actor, job_id: int, must_own: bool = True) -> Job:
        job = await self.core.jobs.get(job_id)
        if job is None:
            raise UserError(f"Job {job_id} doesn't exist (any more).")
        if must_own and job.owner.user_id != actor.user_id and not actor.is_admin:
            raise UserError("This isn't your job — use /imagine to start your own.")
        return job

    def _check_cooldown(self, actor: Actor) -> None:
        cooldown_s = self.config.discord.command_cooldown_s
        if cooldown_s <= 0 or actor.is_admin:
            return
        last = self._last_submit.get(actor.user_id)
        if last is not None and self._monotonic() - last < cooldown_s:
            wait_s = math.ceil(cooldown_s - (self._monotonic() - last))
            raise UserError(f"Slow down a little — try again in {max(1, wait_s)} s.")

    async def _check_prompt(self, actor: Actor, typed: str, prompt: str) -> None:
        refusal = self.prompt_filter.check(prompt)
        if refusal is None:
            return
        await audit_refusal(
            self.core.audit,
            user_id=actor.user_id,
            guild_id=actor.guild_id,
            channel_id=actor.channel_id,
            prompt=typed,
            reason=refusal.reason,
        )
        raise UserError(refusal.reason)

    async def _submit(
        self,
        actor: Actor,
        requests: list[GenerationRequest],
        kind: JobKind,
        parent: tuple[int, int | None] | None,
    ) -> list[Job]:
        # The cooldown is for /imagine only: pressing U1–U4 of a grid one after the other is
        # the normal way to work. One /imagine counts once, however many jobs it makes. It is
        # taken before the first await so that two commands sent at the same moment can't both
        # pass the check; a refusal gives it back, so fixing a typo or topping up credits is
        # never held back.
        cooled = kind is JobKind.IMAGINE
        previous = self._last_submit.get(actor.user_id)
        if cooled:
            self._check_cooldown(actor)
            self._last_submit[actor.user_id] = self._monotonic()
        try:
            return await self.core.scheduler.submit_many(actor.owner, requests, kind, parent)
        except BaseException as exc:
            if cooled and previous is None:
                self._last_submit.pop(actor.user_id, None)
            elif cooled and previous is not None:
                self._last_submit[actor.user_id] = previous
            if isinstance(exc, Refused):
                raise UserError(exc.reason) from None
            raise

    async def _derived_request(
        self, job: Job, action: Action, index: int
    ) -> tuple[GenerationRequest, JobKind, tuple[int, int | None]]:
        assert job.result is not None
        settings = self.config.engine
        parent = await self.core.jobs.request(job)
        if action is not Action.REROLL:
            # img2img runs steps x strength steps; a short parent job must still get at least
            # one, whatever strength this action uses.
            weakest = min(
                settings.upscale_strength,
                settings.variation_strength_subtle,
                settings.variation_strength_strong,
            )
            parent = parent.with_changes(steps=max(parent.steps, math.ceil(1 / weakest)))
        if action is Action.REROLL:
            return parent.with_changes(seed=self._seed_source()), JobKind.REROLL, (job.id, None)

        if action.needs_index:
            if not 1 <= index <= len(job.result.image_paths):
                raise UserError(f"Image {index} doesn't exist in job {job.id}.")
            position = index - 1
        else:
            position = 0
        image = await self.core.jobs.image(job.id, position)

        if action in (Action.UPSCALE, Action.UPSCALE_AGAIN):
            if image.width * image.height * 4 > settings.max_pixels:
                raise UserError("This image is already as large as this server allows.")
            request = upscale_request(
                parent,
                image,
                strength=settings.upscale_strength,
                seed=job.result.seeds[position],
            )
            return request, JobKind.UPSCALE, (job.id, position)

        strength = (
            settings.variation_strength_subtle
            if action is Action.VARY_SUBTLE
            else settings.variation_strength_strong
        )
        if parent.kind.value == "upscale":
            # Vary an upscaled image at the size it was generated at: varying at 2x would cost
            # four times as much for a result the user then upscales again anyway.
            origin = await self.core.jobs.require(job.parent_job_id) if job.parent_job_id else None
            width = origin.result.width if origin and origin.result else image.width // 2
            height = origin.result.height if origin and origin.result else image.height // 2
            image = image.resize((width, height))
            parent = parent.with_changes(
                num_candidates=settings.num_candidates, num_kept=settings.num_kept
            )
        request = variation_request(parent, image, strength=strength, seed=self._seed_source())
        return request, JobKind.VARIATION, (job.id, position)


def _past_tense(state: JobState) -> str:
    return {
        JobState.SUCCEEDED: "finished",
        JobState.FAILED: "failed",
        JobState.CANCELLED: "been cancelled",
        JobState.REFUSED: "been refused",
    }.get(state, state.value)
