"""Which buttons under a job's image can work on this server (an upscale past max_pixels, a pan
that can't grow any more, a Make Square of a square image are not shown)."""

from __future__ import annotations

from collections.abc import Callable

from bot.app.actions import Action
from bot.app.application import ImagineApp
from bot.app.drafts import is_draft
from bot.core.models import Job
from bot.discord.views.buttons import Fits
from generation.contract import PanDirection, UpscaleMode

_PANS = {
    Action.PAN_LEFT: PanDirection.LEFT,
    Action.PAN_RIGHT: PanDirection.RIGHT,
    Action.PAN_UP: PanDirection.UP,
    Action.PAN_DOWN: PanDirection.DOWN,
}


_ON_DRAFTS = frozenset({Action.ENHANCE, Action.VARY_SUBTLE, Action.VARY_STRONG})


def fits_for(app: ImagineApp) -> Callable[[Job], Fits]:
    """`job -> Fits`: whether each button under a job's image can work on this server."""

    def for_job(job: Job) -> Fits:
        def fits(action: Action, index: int) -> bool:
            return action_fits(app, job, action, index)

        return fits

    return for_job


def action_fits(app: ImagineApp, job: Job, action: Action, index: int) -> bool:
    if job.result is None:
        return False
    if is_draft(job):
        # A draft's image is enhanced or varied; upscales and edits come after Enhance.
        return action in _ON_DRAFTS
    if action is Action.ENHANCE:
        return False
    if action is Action.UPSCALE_SUBTLE:
        return app.can_upscale(job, UpscaleMode.SUBTLE)
    if action is Action.UPSCALE_CREATIVE:
        return app.can_upscale(job, UpscaleMode.CREATIVE)
    if action in _PANS:
        return app.can_pan(job, index, _PANS[action])
    if action is Action.MAKE_SQUARE:
        return app.can_make_square(job, index)
    return True
