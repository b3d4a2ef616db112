"""What users can do, whatever front end they use: Discord or the console.

Both front ends call these methods and only render what comes back, so the rules (who may press
which button, what a U2 or a reroll means, rate limits, prompt filtering) live in one place.
Nothing here imports discord. The presses on a finished job's images are `AfterGrid`'s
(bot/app/after_grid.py), which `ImagineApp` builds on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import Any

from PIL import Image

from bot.app import catalog, render
from bot.app.actions import Actor, MemberInfo, Submitted, UserError
from bot.app.after_grid import AfterGrid
from bot.app.drafts import draft_notes
from bot.app.fetch import FetchedImage, FetchPolicy, FetchRefused, policy_from_config
from bot.app.inputs import (
    BlendShape,
    InputScreen,
    Picture,
    PictureInputs,
    as_input,
    attachment_sources,
    blend_request,
)
from bot.app.moderation import PromptFilter, audit_refusal, make_output_check
from bot.app.modes import ModeDesk, speed_mode
from bot.app.personalize import Personalize
from bot.app.shorten import Shortening
from bot.config import Config
from bot.core.clock import system_clock
from bot.core.models import (
    EXPIRED_MESSAGE,
    CancelNotSaved,
    ImageExpired,
    Job,
    JobKind,
    JobState,
    Mode,
    Refused,
)
from bot.core.preferences import PreferenceStore
from bot.core.service import Core
from bot.core.taste import TasteStore
from generation.conditioning import check_inputs
from generation.contract import MAX_PIXELS, MAX_SEED, GenerationRequest, InputImage, InputRole
from generation.prompt import (
    ImagineOptions,
    ParsedPrompt,
    PromptDefaults,
    PromptError,
    control_link,
    parse_jobs,
    size_for_aspect,
)
from generation.requests import describe_request

log = logging.getLogger(__name__)

# New seeds leave room for seed + i of every candidate.
_SEED_LIMIT = MAX_SEED - 16
# SQLite's INTEGER is 64-bit: a larger id (a forged button) names no job and can't be looked up.
MAX_JOB_ID = 2**63 - 1


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


def picture_inputs(
    config: Config, screen: InputScreen, policy: FetchPolicy | None = None
) -> PictureInputs:
    """Members' pictures fetched under the configured limits (and policy, unless given)."""
    images = config.images
    return PictureInputs(
        policy or policy_from_config(images),
        screen,
        max_fetches=images.max_fetches,
        max_fetches_per_member=images.max_fetches_per_member,
    )


def random_seed() -> int:
    return secrets.randbelow(_SEED_LIMIT + 1)


class ImagineApp(AfterGrid, Shortening):
    def __init__(
        self,
        config: Config,
        core: Core,
        *,
        seed_source: Callable[[], int] = random_seed,
        monotonic: Callable[[], float] = time.monotonic,
        pictures: PictureInputs | None = None,
    ) -> None:
        self.config = config
        self.core = core
        # Members' pictures; a front end that knows age-restricted channels passes its own.
        self.pictures = pictures or picture_inputs(
            config, InputScreen(config.moderation, lambda _channel: False, core.audit)
        )
        self.prompt_filter = PromptFilter(config.moderation)
        self._seed_source = seed_source
        self._monotonic = monotonic
        self._last_submit: dict[int, float] = {}
        self.preferences = PreferenceStore(core.db, config.engine, system_clock)
        # Relax, Fast and Turbo (bot/app/modes.py).
        self.modes = ModeDesk(core)
        self.personal = Personalize(core, TasteStore(core.db, system_clock))

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
        attachments: Sequence[Picture] = (),
        control_image: Picture | None = None,
    ) -> list[Submitted]:
        """Queue every job the prompt asks for, all or none; one for a plain prompt. Several
        jobs each carry a note saying which of how many they are (the first: at what cost).
        `attachments` are the command's image options and `control_image` the picture a --cn
        ControlNet follows (Discord attachments, or pictures already fetched).

        Everything that can refuse the command cheaply comes first: the cooldown (taken on
        entry, so commands sent together can't all pass it), the prompt, the blocked words,
        the queue limits and the credits. Only then are the member's pictures fetched,
        decoded and screened (within the fetch limits of bot/app/inputs.py)."""
        with self._cooling(actor):
            # The member's /prefer shortcuts and suffix, and their /settings defaults under
            # whatever was typed.
            prefs = await self.preferences.get(actor.user_id)
            defaults = prefs.prompt_defaults(self.config.engine)
            try:
                expanded = prefs.expand(text)
            except PromptError as exc:
                raise UserError(str(exc)) from None
            options = options or ImagineOptions()
            if attachments:
                options = replace(options, images=tuple(attachment_sources(attachments)))
            link = control_link(expanded) if control_image is None else None
            stand_in = _control_stand_in(control_image, link)
            parsed = self.parse_jobs(
                expanded, replace(options, control_image=stand_in), model, defaults
            )
            # Only what is asked for is filtered: "--no gore" steers away from what it names.
            # (A blend's placeholder, in a prompt of pictures only, is not the member's.)
            for prompt in dict.fromkeys(job.request.prompt for job in parsed if not job.wordless):
                await self._check_prompt(actor, text, prompt)
            if any(job.image_refs for job in parsed):
                # What the model can do with the pictures' roles (a reference needs an image
                # adapter) needs only their roles.
                for job in parsed:
                    self._check_inputs(job.with_pictures(_stand_ins(job)).request)
            elif attachments:
                raise UserError("image: these pictures were not used by the prompt.")
            # --fast/--relax/--turbo, else the member's mode: it sets the cost and the queue.
            mode = await self.modes.mode_for(actor, speed_mode([job.speed for job in parsed]))
            await self._check_submit(actor, [job.request for job in parsed], mode)
            # --p (or the /settings default), once the command may go ahead (a refit is CPU
            # work): a code naming no profile refuses here, free.
            parsed, taste_notes = await self.personal.apply(actor, parsed, prefs.personalize)
            parsed = await self._fetch_pictures(actor, parsed, attachments, control_image, link)
            jobs = await self._submit(
                actor, [job.request for job in parsed], JobKind.IMAGINE, None, False, mode
            )
        return [
            Submitted(
                job,
                (
                    *render.batch_notes(jobs, index),
                    self.modes.queue_note(job),
                    *parsed_job.notes,
                    *draft_notes(job, parsed_job.request, self.config.credits, self.config.modes),
                    *taste_notes,
                    *catalog.control_notes(parsed_job.request, self.config.engine.controlnet_fit),
                ),
                self.core.scheduler.queue_position(job.id),
            )
            for index, (job, parsed_job) in enumerate(zip(jobs, parsed, strict=True))
        ]

    # ----- pictures: image prompts, /blend, /describe (bot/app/inputs.py) -----------------------

    async def blend(
        self,
        actor: Actor,
        pictures: Sequence[Picture],
        shape: BlendShape = BlendShape.SQUARE,
        model: str | None = None,
    ) -> Submitted:
        """One grid mixing 2–5 pictures (an IMAGINE with image prompts and no text). The
        pictures are fetched once the command may go ahead, as /imagine's."""
        with self._cooling(actor):
            try:
                request = blend_request(
                    self.config.engine,
                    [_stand_in(source) for source in attachment_sources(pictures)],
                    shape,
                    self._seed_source(),
                    model,
                )
            except ValueError as exc:
                raise UserError(str(exc)) from None
            self._check_inputs(request)
            await self._check_submit(actor, [request])
            fetched = await self._fetch_attachments(actor, pictures)
            await self._screen(actor, fetched)
            request = request.with_changes(
                inputs=tuple(
                    replace(given, image=picture.image, sha256=picture.sha256)
                    for given, picture in zip(request.inputs, fetched, strict=True)
                )
            )
            (job,) = await self._submit(actor, [request], JobKind.IMAGINE, None, cooled=False)
        return Submitted(
            job, (self.modes.queue_note(job),), self.core.scheduler.queue_position(job.id)
        )

    async def describe(self, actor: Actor, picture: Picture | str) -> Submitted:
        """Four prompt suggestions for a picture (a DESCRIBE job, run by the worker's CLIP):
        an attachment, a link, or a picture already fetched."""
        with self._cooling(actor):
            settings = self.config.engine
            # A describe costs the same whatever the picture: what it costs is checked before
            # the picture is fetched.
            stand_in = describe_request(
                InputImage(InputRole.IMAGE_PROMPT, Image.new("RGB", (1, 1))),
                seed=0,
                model=settings.default_model,
                width=settings.model(None).base_resolution,
                height=settings.model(None).base_resolution,
            )
            await self._check_submit(actor, [stand_in])
            if isinstance(picture, str):
                try:
                    fetched = (await self.pictures.fetch_links([picture], actor.user_id))[picture]
                except FetchRefused as exc:
                    raise UserError(f"Picture not used — {exc.reason}") from None
            else:
                (fetched,) = await self._fetch_attachments(actor, [picture])
            await self._screen(actor, [fetched])
            # The picture's shape at the model's size: what the settings line shows.
            width, height = size_for_aspect(
                fetched.image.width,
                fetched.image.height,
                settings.model(None).base_resolution,
                min(settings.max_pixels, MAX_PIXELS),
            )
            request = describe_request(
                as_input(fetched, InputRole.IMAGE_PROMPT, 1.0),
                seed=self._seed_source(),
                model=settings.default_model,
                width=width,
                height=height,
            )
            (job,) = await self._submit(actor, [request], JobKind.DESCRIBE, None, cooled=False)
        return Submitted(
            job, (self.modes.queue_note(job),), self.core.scheduler.queue_position(job.id)
        )

    async def describe_again(self, actor: Actor, job_id: int) -> Submitted:
        """🔄 under a /describe: the same picture with a new seed, so other phrases."""
        job = await self._job_for(actor, job_id)
        if job.kind is not JobKind.DESCRIBE:
            raise UserError(f"Job {job.id} is not a /describe.")
        try:
            parent = await self.core.jobs.request(job)
        except ImageExpired as exc:
            raise UserError(str(exc)) from None
        request = parent.with_changes(seed=self._seed_source())
        (again,) = await self._submit(
            actor, [request], JobKind.DESCRIBE, (job.id, None), cooled=False
        )
        return Submitted(
            again, (self.modes.queue_note(again),), self.core.scheduler.queue_position(again.id)
        )

    async def imagine_suggestion(self, actor: Actor, job_id: int, index: int) -> list[Submitted]:
        """Buttons 1–4 under a /describe: that suggestion as an ordinary (paid) /imagine."""
        job = await self._job_for(actor, job_id)
        texts = job.result.texts if job.result is not None else ()
        if job.kind is not JobKind.DESCRIBE or job.state is not JobState.SUCCEEDED or not texts:
            raise UserError(f"Job {job.id} has no suggestions to imagine.")
        if not 1 <= index <= len(texts):
            raise UserError(f"Suggestion {index} doesn't exist in job {job.id}.")
        return await self.imagine(actor, texts[index - 1])

    async def _check_submit(
        self, actor: Actor, requests: Sequence[GenerationRequest], mode: Mode | None = None
    ) -> None:
        """The queue limits, the ban and the credits (and relax's switch and caps), looked at
        before anything is fetched (`_submit` checks again, for real). `mode`: the member's
        unless given."""
        try:
            mode = await self.modes.mode_for(actor, mode)
            await self.core.scheduler.check_submit(actor.owner, requests, mode)
        except Refused as exc:
            raise UserError(exc.reason) from None

    async def _fetch_attachments(
        self, actor: Actor, pictures: Sequence[Picture]
    ) -> list[FetchedImage]:
        try:
            return await self.pictures.fetch_attachments(pictures, actor.user_id)
        except FetchRefused as exc:
            raise UserError(f"Picture not used — {exc.reason}") from None

    async def _fetch_pictures(
        self,
        actor: Actor,
        parsed: list[ParsedPrompt],
        attachments: Sequence[Picture],
        control_image: Picture | None,
        link: str | None,
    ) -> list[ParsedPrompt]:
        """The jobs with the member's pictures fetched, screened and in place: the ControlNet's
        instead of its stand-in, the image prompts and references appended."""
        try:
            control = await self.pictures.fetch_control(actor.owner, control_image, link)
        except FetchRefused as exc:
            raise UserError(exc.reason) from None
        if control is not None:
            parsed = [_with_control(job, control) for job in parsed]
        if not any(job.image_refs for job in parsed):
            return parsed
        fetched = await self._fetch_attachments(actor, attachments)
        try:
            attached = await self.pictures.attach(
                actor.owner, parsed, {picture.source: picture for picture in fetched}
            )
        except FetchRefused as exc:
            raise UserError(f"Picture not used — {exc.reason}") from None
        for job in attached:
            self._check_inputs(job.request)
        return attached

    async def _screen(self, actor: Actor, pictures: Sequence[FetchedImage]) -> None:
        try:
            await self.pictures.screen.check(actor.owner, pictures)
        except FetchRefused as exc:
            raise UserError(f"Picture not used — {exc.reason}") from None

    def _check_inputs(self, request: GenerationRequest) -> None:
        """What the model can do with pictures (a reference needs an image adapter), checked
        before anything is charged."""
        try:
            check_inputs(self.config.engine, request)
        except ValueError as exc:
            raise UserError(str(exc)) from None

    async def _submit_one(
        self,
        actor: Actor,
        request: GenerationRequest,
        kind: JobKind,
        parent: tuple[int, int | None],
        notes: tuple[str, ...] = (),
        mode: Mode | None = None,
    ) -> Submitted:
        """`mode`: the one a speed flag in an edited prompt asks for; None: the member's."""
        (submitted,) = await self._submit(actor, [request], kind, parent, mode=mode)
        notes = (*notes, self.modes.queue_note(submitted))
        return Submitted(submitted, notes, self.core.scheduler.queue_position(submitted.id))

    async def cancel(self, actor: Actor, job_id: int) -> Job:
        job = await self._job_for(actor, job_id)
        if job.state.terminal:
            raise UserError(f"Job {job.id} has already {_past_tense(job.state)}.")
        try:
            await self.core.scheduler.cancel(job.id, actor.user_id)
        except CancelNotSaved as exc:
            raise UserError(exc.reason) from None
        return await self.core.jobs.require(job.id)

    # ----- reading ---------------------------------------------------------------------------

    async def info(self, actor: Actor) -> MemberInfo:
        balance = await self.core.credits.balance(actor.user_id, actor.role_ids)
        jobs = await self.core.scheduler.user_jobs(actor.user_id)
        return MemberInfo(
            balance,
            tuple(jobs),
            await self.preferences.get(actor.user_id),
            await self.personal.profile(actor),
        )

    async def job(self, actor: Actor, job_id: int) -> Job:
        return await self._job_for(actor, job_id, must_own=False)

    # ----- internals -------------------------------------------------------------------------

    async def _job_for(self, actor: Actor, job_id: int, must_own: bool = True) -> Job:
        if not 1 <= job_id <= MAX_JOB_ID:
            raise UserError(f"Job {job_id} doesn't exist.")
        job = await self.core.jobs.get(job_id)
        if job is None:
            raise UserError(f"Job {job_id} doesn't exist (any more).")
        if must_own and not actor.may_manage(job.owner):
            raise UserError("This isn't your job — use /imagine to start your own.")
        if job.pruned_at is not None:  # its content was erased by the retention policy
            raise UserError(EXPIRED_MESSAGE)
        return job

    @contextlib.contextmanager
    def _cooling(self, actor: Actor) -> Iterator[None]:
        """A command's cooldown: checked and taken on entry, before the first await, so that
        commands sent at the same moment can't all pass it while the first one still works; a
        refusal gives it back, so fixing a typo or topping up credits is never held back."""
        cooldown_s = self.config.discord.command_cooldown_s
        # Owners only: a server admin's commands still fill the queue every server shares.
        if cooldown_s <= 0 or actor.is_owner:
            yield
            return
        self._check_cooldown(actor)
        previous = self._last_submit.get(actor.user_id)
        taken = self._monotonic()
        self._last_submit[actor.user_id] = taken
        try:
            yield
        except BaseException:
            if self._last_submit.get(actor.user_id) == taken:
                if previous is None:
                    self._last_submit.pop(actor.user_id, None)
                else:
                    self._last_submit[actor.user_id] = previous
            raise

    def _check_cooldown(self, actor: Actor) -> None:
        cooldown_s = self.config.discord.command_cooldown_s
        if cooldown_s <= 0 or actor.is_owner:
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
        cooled: bool | None = None,
        mode: Mode | None = None,
    ) -> list[Job]:
        """`mode`: the member's (/fast, /relax, /turbo) unless a flag asked for one."""
        # The cooldown is for commands only: pressing U1–U4 of a grid one after the other is
        # the normal way to work. One /imagine counts once, however many jobs it makes. It is
        # taken before the first await so that two commands sent at the same moment can't both
        # pass the check; a refusal gives it back, so fixing a typo or topping up credits is
        # never held back. `cooled` says it for kinds that are both (a /describe and its 🔄).
        cooled = kind is JobKind.IMAGINE if cooled is None else cooled
        previous = self._last_submit.get(actor.user_id)
        if cooled:
            self._check_cooldown(actor)
            self._last_submit[actor.user_id] = self._monotonic()
        try:
            # Live previews as the member has them in /settings now (a press or a reroll
            # follows today's setting, not the parent job's).
            show = (await self.preferences.get(actor.user_id)).previews
            requests = [r if r.preview is show else r.with_changes(preview=show) for r in requests]
            mode = await self.modes.mode_for(actor, mode)
            return await self.core.scheduler.submit_many(actor.owner, requests, kind, parent, mode)
        except BaseException as exc:
            if cooled and previous is None:
                self._last_submit.pop(actor.user_id, None)
            elif cooled and previous is not None:
                self._last_submit[actor.user_id] = previous
            if isinstance(exc, Refused):
                raise UserError(exc.reason) from None
            raise


# Stands in for a member's picture until it is fetched: parsing, the checks and the cost need
# only its role and source.
_STAND_IN = Image.new("RGB", (1, 1))


def _stand_in(source: str) -> FetchedImage:
    return FetchedImage(_STAND_IN, source, "", "PNG")


def _control_stand_in(control_image: Picture | None, link: str | None) -> InputImage | None:
    """The ControlNet's picture as the parser needs it (its source) before it is fetched."""
    if control_image is not None:
        (source,) = attachment_sources([control_image])
    elif link is not None:
        source = link
    else:
        return None
    return InputImage(InputRole.CONTROL, _STAND_IN, source=source)


def _stand_ins(job: ParsedPrompt) -> tuple[InputImage, ...]:
    return tuple(InputImage(r.role, _STAND_IN, r.weight, r.source) for r in job.image_refs)


def _with_control(job: ParsedPrompt, control: FetchedImage) -> ParsedPrompt:
    inputs = tuple(
        replace(given, image=control.image, sha256=control.sha256)
        if given.role is InputRole.CONTROL
        else given
        for given in job.request.inputs
    )
    return replace(job, request=job.request.with_changes(inputs=inputs))


def _past_tense(state: JobState) -> str:
    return {
        JobState.SUCCEEDED: "finished",
        JobState.FAILED: "failed",
        JobState.CANCELLED: "been cancelled",
        JobState.REFUSED: "been refused",
    }.get(state, state.value)
