"""What members do with a finished job's images, whatever the front end: the buttons under a
grid or an image (U1-U4, V1-V4, 🔄, Vary, Upscale, Zoom Out, Pan, Make Square), Remix's edited
prompt, Custom Zoom and Vary (Region), and whether each button can work on this server.

`AfterGrid` is the part of `ImagineApp` (bot/app/application.py) these presses call; the
checks every command shares (whose job, the prompt filter, submitting) are the app's.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import math
from collections.abc import Callable, Iterable
from pathlib import Path

from PIL import Image

from bot.app import catalog, edits
from bot.app.actions import Action, Actor, Submitted, UserError
from bot.app.personalize import Personalize
from bot.config import Config
from bot.core.models import EXPIRED_MESSAGE, ImageExpired, Job, JobKind, JobState, Mode
from bot.core.preferences import PreferenceStore
from bot.core.service import Core
from generation.contract import GenerationRequest, PanDirection, Region, UpscaleMode
from generation.contract import JobKind as GenerationKind
from generation.draft import enhance_request
from generation.prompt import PromptError
from generation.requests import variation_request

_ZOOMS = {Action.ZOOM_OUT_2: 2.0, Action.ZOOM_OUT_1_5: 1.5}

_PANS = {
    Action.PAN_LEFT: PanDirection.LEFT,
    Action.PAN_RIGHT: PanDirection.RIGHT,
    Action.PAN_UP: PanDirection.UP,
    Action.PAN_DOWN: PanDirection.DOWN,
}

_UPSCALES = {
    Action.UPSCALE: UpscaleMode.SUBTLE,
    Action.UPSCALE_AGAIN: UpscaleMode.SUBTLE,
    Action.UPSCALE_SUBTLE: UpscaleMode.SUBTLE,
    Action.UPSCALE_CREATIVE: UpscaleMode.CREATIVE,
}

# The core's job kind of each edit's request kind.
_EDIT_KINDS = {
    GenerationKind.ZOOM: JobKind.ZOOM,
    GenerationKind.PAN: JobKind.PAN,
    GenerationKind.SQUARE: JobKind.SQUARE,
    GenerationKind.REGION: JobKind.REGION,
}


class AfterGrid:
    """The presses on a finished job. What it uses of the app is declared here."""

    config: Config
    core: Core
    preferences: PreferenceStore
    personal: Personalize
    _seed_source: Callable[[], int]

    async def _job_for(self, actor: Actor, job_id: int, must_own: bool = True) -> Job:
        raise NotImplementedError

    async def _check_prompt(self, actor: Actor, typed: str, prompt: str) -> None:
        raise NotImplementedError

    async def _submit_one(
        self,
        actor: Actor,
        request: GenerationRequest,
        kind: JobKind,
        parent: tuple[int, int | None],
        notes: tuple[str, ...] = (),
        mode: Mode | None = None,
    ) -> Submitted:
        raise NotImplementedError

    async def press(
        self,
        actor: Actor,
        job_id: int,
        action: Action,
        index: int = 0,
        prompt: str | None = None,
    ) -> Submitted:
        """A button press on job `job_id`; `index` is 1-based for U#/V# and for the buttons under
        one image (0 there: the job's only image). `prompt` is Remix mode's edited prompt, for
        the actions that take one (`Action.takes_prompt`)."""
        job = await self._job_for(actor, job_id)
        if action is Action.CANCEL:
            raise ValueError("action: use cancel() for the cancel button")
        if prompt is not None and not action.takes_prompt:
            raise UserError("prompt: this button doesn't take a new prompt.")
        if job.state is not JobState.SUCCEEDED or job.result is None:
            raise UserError(f"Job {job.id} has no images to work from ({job.state.value}).")
        if prompt is not None:
            prompt = await self._edited_prompt(actor, prompt)
        try:
            request, kind, parent, remix_notes, speed = await self._derived_request(
                job, action, index, prompt
            )
        except ImageExpired as exc:  # deleted by the [storage] retention policy
            raise UserError(str(exc)) from None
        except ValueError as exc:  # the edit doesn't fit, or the edited prompt is wrong
            raise UserError(str(exc)) from None
        if prompt is not None:
            await self._check_prompt(actor, prompt, request.prompt)
        notes = (*remix_notes, *catalog.edit_notes(job.request_data, request))
        return await self._submit_one(actor, request, kind, parent, notes, _mode(speed))

    async def custom_zoom(
        self, actor: Actor, job_id: int, index: int, *, prompt: str, factor: float | str
    ) -> Submitted:
        """Custom Zoom: image `index` (1-based; 0 = the only one) shrunk by `factor` (1.0–2.0,
        as typed in the modal) into a canvas the shape of the prompt's `--ar`, or its own."""
        try:
            zoom = edits.zoom_factor(factor)
        except ValueError as exc:
            raise UserError(str(exc)) from None
        job, position, parent, image = await self._edit_source(actor, job_id, index)
        prompt = await self._edited_prompt(actor, prompt)
        try:
            remix = edits.parse_remix(prompt, parent, image.size, self.config.engine)
            request = edits.zoom(
                parent,
                image,
                factor=zoom,
                seed=self._seed_source(),
                settings=self.config.engine,
                remix=remix,
            )
        except ValueError as exc:
            raise UserError(str(exc)) from None
        await self._check_prompt(actor, prompt, request.prompt)
        notes = (*remix.notes, *catalog.edit_notes(job.request_data, request))
        return await self._submit_one(
            actor, request, JobKind.ZOOM, (job.id, position), notes, _mode(remix.speed)
        )

    async def vary_region(
        self,
        actor: Actor,
        job_id: int,
        index: int,
        *,
        prompt: str | None = None,
        regions: Iterable[Region | str] = (),
        mask: Image.Image | bytes | None = None,
        mask_name: str = "",
    ) -> Submitted:
        """Vary (Region): repaint the chosen preset `regions` (select-menu values) or the white
        of an uploaded black-and-white `mask` (its bytes, or an image) of image `index`, with
        the region's `prompt` (None keeps the job's)."""
        try:
            chosen = edits.regions_from(regions)
            # Decoding, hashing and resizing a mask of up to 4096² is pixel work: off the loop.
            mask_input = (
                None if mask is None else await asyncio.to_thread(edits.mask_input, mask, mask_name)
            )
        except ValueError as exc:
            raise UserError(str(exc)) from None
        job, position, parent, image = await self._edit_source(actor, job_id, index)
        try:
            remix = None
            if prompt is not None:
                prompt = await self._edited_prompt(actor, prompt)
                remix = edits.parse_remix(prompt, parent, image.size, self.config.engine)
            request = await asyncio.to_thread(
                functools.partial(
                    edits.region,
                    parent,
                    image,
                    seed=self._seed_source(),
                    settings=self.config.engine,
                    regions=chosen,
                    mask=mask_input,
                    remix=remix,
                )
            )
        except ValueError as exc:
            raise UserError(str(exc)) from None
        if prompt is not None:
            await self._check_prompt(actor, prompt, request.prompt)
        remix_notes = remix.notes if remix is not None else ()
        notes = (*remix_notes, *catalog.edit_notes(job.request_data, request))
        speed = remix.speed if remix is not None else None
        return await self._submit_one(
            actor, request, JobKind.REGION, (job.id, position), notes, _mode(speed)
        )

    async def _edited_prompt(self, actor: Actor, prompt: str) -> str:
        """A prompt edited in a form with the member's /prefer shortcuts expanded, as /imagine
        expands them (not the suffix: the form showed the job's prompt, which has it)."""
        try:
            return (await self.preferences.get(actor.user_id)).expand_shortcuts(prompt)
        except PromptError as exc:
            raise UserError(str(exc)) from None

    async def separate(self, actor: Actor, job_id: int, index: int) -> Path:
        """U1–U4: the file of image `index` (1-based) at full size, to post as it is. No job, no
        GPU, nothing charged: the candidates are already full size."""
        job = await self._job_for(actor, job_id)
        if job.state is not JobState.SUCCEEDED or job.result is None:
            raise UserError(f"Job {job.id} has no images to work from ({job.state.value}).")
        position = self._position(job, index, required=True)
        try:
            path = job.image_path(self.core.jobs.data_dir, position)
        except ImageExpired as exc:
            raise UserError(str(exc)) from None
        if not await asyncio.to_thread(path.is_file):
            raise UserError(EXPIRED_MESSAGE)
        # The pick teaches the member's taste (--p): this image over the grid's others.
        await self.personal.picked(actor, job, position)
        return path

    async def _edit_source(
        self, actor: Actor, job_id: int, index: int
    ) -> tuple[Job, int, GenerationRequest, Image.Image]:
        """The job, the 0-based position, the request and the image an edit starts from."""
        job = await self._job_for(actor, job_id)
        if job.state is not JobState.SUCCEEDED or job.result is None:
            raise UserError(f"Job {job.id} has no images to work from ({job.state.value}).")
        position = self._position(job, index)
        try:
            parent = await self.core.jobs.request(job)
            image = await self.core.jobs.image(job.id, position)
        except ImageExpired as exc:
            raise UserError(str(exc)) from None
        return job, position, parent, image

    def _position(self, job: Job, index: int, required: bool = False) -> int:
        """The 0-based position of image `index` (1-based; 0 means a one-image job's image)."""
        assert job.result is not None
        count = len(job.result.image_paths)
        if index == 0 and count == 1 and not required:
            return 0
        if not 1 <= index <= count:
            raise UserError(f"Image {index} doesn't exist in job {job.id}.")
        return index - 1

    def can_upscale(self, job: Job, mode: UpscaleMode = UpscaleMode.SUBTLE) -> bool:
        """Whether a 2x upscale (subtle or creative) of this job's images stays inside the pixel
        budget."""
        if job.result is None:
            return False
        return job.result.width * job.result.height * 4 <= self.config.engine.max_pixels

    def can_pan(self, job: Job, index: int, direction: PanDirection) -> bool:
        """Whether image `index` can pan that way inside the pixel budget (all images of a job
        share one size, so `index` only says which button row asks)."""
        size = self._edit_size(job)
        return size is not None and edits.can_pan(size, direction, self.config.engine)

    def can_make_square(self, job: Job, index: int) -> bool:
        """Whether Make Square applies (the image is not square) and fits."""
        size = self._edit_size(job)
        return size is not None and edits.can_make_square(size, self.config.engine)

    def can_zoom(self, job: Job, index: int) -> bool:
        """Zoom Out keeps the canvas size, so it fits whenever the job has images."""
        return self._edit_size(job) is not None

    def _edit_size(self, job: Job) -> tuple[int, int] | None:
        if job.result is None or not job.result.width:
            return None
        size = (job.result.width, job.result.height)
        return edits.working_size(GenerationKind(job.request_data["kind"]), size)

    async def check_delete(self, actor: Actor, job_id: int) -> Job:
        """The job whose result message `actor` wants deleted: their own, or anyone's for an
        admin. Only the message goes; the files follow the retention rules, because other
        jobs' buttons may still work from them."""
        job = await self._job_for(actor, job_id)
        if not job.state.terminal:
            raise UserError(f"Job {job.id} is still {job.state.value}; use its Cancel button.")
        return job

    def _enhance(
        self, job: Job, parent: GenerationRequest, index: int
    ) -> tuple[GenerationRequest, JobKind, tuple[int, int | None], tuple[str, ...]]:
        """✨ Enhance: image `index` of a draft at full quality, from its seed and prompt. The
        parent is the draft job itself (not its image): the render starts from noise, or from
        the draft's own source picture for a draft variation, as the draft did."""
        assert job.result is not None
        position = self._position(job, index, required=True)
        if parent.draft is None:
            raise ValueError(f"Job {job.id} is not a draft; only a draft's images are enhanced.")
        request = enhance_request(parent, job.result.seeds[position])
        note = (
            f"✨ image {index} of draft job {job.id} at full quality: {request.steps} steps with "
            f"{request.sampler.a1111_name}, seed {request.seed}"
        )
        return request, JobKind.ENHANCE, (job.id, None), (note,)

    async def _derived_request(
        self, job: Job, action: Action, index: int, prompt: str | None = None
    ) -> tuple[GenerationRequest, JobKind, tuple[int, int | None], tuple[str, ...], str | None]:
        """The request a press makes, with the notes on its edited prompt for the reply and
        the speed mode the edited prompt asks for (None: none); ValueError (written for the
        member) when it can't."""
        assert job.result is not None
        settings = self.config.engine
        parent = await self.core.jobs.request(job)
        if action is Action.ENHANCE:
            return (*self._enhance(job, parent, index), None)
        if action is not Action.REROLL:
            # img2img runs steps x strength steps; a short parent job must still get at least
            # one, whatever strength this action uses.
            weakest = min(
                settings.upscale_strength,
                settings.variation_strength_subtle,
                settings.variation_strength_strong,
            )
            steps = max(parent.steps, math.ceil(1 / weakest))
            # A draft's full render is raised with it: a draft never runs more steps than the
            # render it stands in for (and its price is a share of that render's).
            draft = parent.draft
            if draft is not None and draft.steps < steps:
                draft = dataclasses.replace(draft, steps=steps)
            parent = parent.with_changes(steps=steps, draft=draft)
        if action is Action.REROLL:
            request = parent.with_changes(seed=self._seed_source())
            if prompt is None:
                return request, JobKind.REROLL, (job.id, None), (), None
            size = (job.result.width, job.result.height)
            reroll_remix = edits.parse_remix(prompt, parent, size, settings)
            applied = reroll_remix.apply(request)
            return applied, JobKind.REROLL, (job.id, None), reroll_remix.notes, reroll_remix.speed

        if action.needs_index:
            position = self._position(job, index, required=True)
        elif action in (Action.VARY_SUBTLE, Action.VARY_STRONG, Action.UPSCALE_AGAIN):
            # Under an upscale (one image) or, since U1–U4 separate, a grid image.
            position = self._position(job, index) if index else 0
        else:
            position = self._position(job, index)
        image = await self.core.jobs.image(job.id, position)
        remix = None if prompt is None else edits.parse_remix(prompt, parent, image.size, settings)
        notes = remix.notes if remix is not None else ()
        speed = remix.speed if remix is not None else None

        if action in _UPSCALES:
            seed = job.result.seeds[position]
            request = edits.upscale(
                parent, image, mode=_UPSCALES[action], seed=seed, settings=settings
            )
            return request, JobKind.UPSCALE, (job.id, position), notes, speed
        if action in _ZOOMS or action in _PANS or action is Action.MAKE_SQUARE:
            seed = self._seed_source()
            if action in _ZOOMS:
                request = edits.zoom(
                    parent, image, factor=_ZOOMS[action], seed=seed, settings=settings, remix=remix
                )
            elif action in _PANS:
                direction = _PANS[action]
                request = edits.pan(
                    parent, image, direction=direction, seed=seed, settings=settings, remix=remix
                )
            else:
                request = edits.square(parent, image, seed=seed, settings=settings)
            return request, _EDIT_KINDS[request.kind], (job.id, position), notes, speed
        if remix is not None:
            parent = remix.apply(parent)

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
        return request, JobKind.VARIATION, (job.id, position), notes, speed


def _mode(speed: str | None) -> Mode | None:
    """The mode a speed flag in an edited prompt asks for; None leaves the member's."""
    return None if speed is None else Mode(speed)
