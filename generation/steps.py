"""What runs between a pipeline's denoising steps: progress reports (with previews), cancelling,
and Midjourney's `--stop`, which ends a job part-way on the model's estimate of the clean image."""

from __future__ import annotations

import functools
import logging
import math
import threading
from dataclasses import dataclass, field
from typing import Any

from generation.contract import GenerationCancelled, Progress, ProgressCallback
from generation.preview import Previewer

log = logging.getLogger(__name__)


@dataclass
class StepState:
    """What the per-step callback needs; one per pipeline call."""

    progress: ProgressCallback | None
    cancel: threading.Event | None
    stop_percent: int
    offset: int
    calls: int
    stop_at: int | None = None
    total: int = 0
    steps_done: int = 0
    denoised: Any = None
    stopped: bool = field(default=False)
    preview: Previewer | None = None


def check_cancel(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise GenerationCancelled("cancelled")


def record_denoised(scheduler: Any, state: StepState) -> None:
    """Keep the scheduler's latest estimate of the clean image, for stopping early and for
    previews.

    Midjourney's `--stop` shows the image as it stands part-way: decoding the partly noised
    latents would show noise instead, so the last x0 estimate is decoded; a preview shows it
    for the same reason. Euler/DDIM report it in
    their step output, the multistep solvers (DPM++, UniPC) keep it in `model_outputs`.
    """
    original = scheduler.step

    # `wraps` keeps step's signature visible: diffusers inspects it to decide whether to pass
    # the generator (ancestral samplers need it to stay reproducible).
    @functools.wraps(original)
    def step(*args: Any, **kwargs: Any) -> Any:
        kwargs["return_dict"] = True
        output = original(*args, **kwargs)
        denoised = getattr(output, "pred_original_sample", None)
        if denoised is None:
            outputs = getattr(scheduler, "model_outputs", None)
            denoised = outputs[-1] if outputs else None
        state.denoised = denoised
        return (output.prev_sample,)

    scheduler.step = step


def on_step_end(pipe: Any, index: int, timestep: Any, tensors: dict[str, Any], *, state: StepState):
    if state.stopped:
        return {}
    if state.total == 0:
        timesteps = int(getattr(pipe, "num_timesteps", 0) or 0)
        if state.stop_percent < 100 and timesteps:
            state.stop_at = max(1, math.ceil(timesteps * state.stop_percent / 100))
        state.total = state.stop_at or timesteps
    state.steps_done = index + 1
    # Cancel between steps: the exception unwinds out of the pipeline call and the job.
    check_cancel(state.cancel)
    if state.progress is not None:
        total = state.total * state.calls
        step = state.offset * state.total + state.steps_done
        try:
            preview = None
            if state.preview is not None:
                # The estimate of the clean image (x0), not the latents as they stand: those
                # are mostly noise for the first half of a job.
                shown = state.denoised if state.denoised is not None else tensors["latents"]
                preview = state.preview.maybe(shown, step, total)
            state.progress(Progress(step=step, total=total, preview_png=preview))
        except GenerationCancelled:
            raise
        except Exception:
            # A failing progress display (say, a message edit that hit a rate limit) must not
            # throw away minutes of GPU work.
            log.exception("progress callback failed at step %d/%d; generation goes on", step, total)
    if state.stop_at is not None and state.steps_done >= state.stop_at:
        state.stopped = True
        pipe._interrupt = True
        if state.denoised is not None:
            # Euler's estimate is computed in float32 whatever the model's dtype.
            return {"latents": state.denoised.to(tensors["latents"].dtype)}
    return {}
