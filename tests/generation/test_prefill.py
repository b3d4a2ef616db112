"""On the model's own 4-channel UNet an edit's pre-fill steers what is painted.

From pure noise (strength 1.0) diffusers' masked latent blending never looks at the new area's
starting picture, so a real base checkpoint paints it with no regard for the colours around it
and leaves an outline. At `edit_strength` (0.8) the painting starts from the pre-filled canvas
noised to that strength. Tiny random weights can't show this (their VAE's latents are a few
hundredths wide and their UNet's output swamps them), so the UNet is an oracle here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from generation import outpaint, requests
from generation.contract import Region
from generation.settings import EngineSettings, ModelSpec
from tests.generation.helpers import imagine

# Oracle: the UNet is replaced by the exact noise predictor for unit-Gaussian latents,
# eps = sqrt(1 - alpha_bar_t) x_t. It is pointwise, so nothing leaks between latent cells, and
# the sampler's deterministic flow then carries a change in the starting latents to the end
# scaled by sqrt(alpha_bar) of the first step (the unit-Gaussian probability-flow ODE is
# linear, x_0 = x_t / sqrt(alpha_bar_t + (1 - alpha_bar_t)) = x_t). Starting from the pre-fill
# at strength s that carries sqrt(alpha_bar) x the pre-fill's change into the painted area;
# starting from pure noise, none. Half the prediction is the bar: far above 0, and loose enough
# for the rounding of Karras sigmas to whole timesteps.
MIN_SHARE_OF_PREDICTION = 0.5


@pytest.fixture(scope="module")
def engine(tiny_cache: Path) -> Any:
    from generation.engine import create_engine

    settings = EngineSettings(
        models=(ModelSpec(name="tiny", source="tiny", base_resolution=128),),
        cache_dir=tiny_cache,
        device="cpu",
        local_files_only=True,
        max_pixels=128 * 128,
    )
    return create_engine(settings)


def source() -> Image.Image:
    rng = np.random.default_rng(2)
    cells = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    return Image.fromarray(cells).resize((64, 64), Image.Resampling.BILINEAR)


class GaussianDenoiser:
    """Stands in for the UNet's forward: the optimal noise prediction for latents drawn from a
    unit Gaussian, whatever the prompt. Records the timesteps it is asked about."""

    def __init__(self, alphas_cumprod: Any) -> None:
        self.alphas_cumprod = np.asarray(alphas_cumprod, dtype=np.float64)
        self.timesteps: list[float] = []

    def alpha_bar(self, t: float) -> float:
        return float(np.interp(t, np.arange(len(self.alphas_cumprod)), self.alphas_cumprod))

    def __call__(self, sample: Any, timestep: Any, *args: Any, **kwargs: Any) -> Any:
        t = float(timestep)
        self.timesteps.append(t)
        eps = np.sqrt(1.0 - self.alpha_bar(t)) * sample
        if kwargs.get("return_dict", True):
            from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

            return UNet2DConditionOutput(sample=eps)
        return (eps,)


def negative_prefill(canvas: outpaint.Canvas) -> outpaint.Canvas:
    """The canvas with its painted area (the pre-fill, or a region's old pixels) inverted."""
    negative = Image.fromarray(255 - np.asarray(canvas.image))
    return outpaint.Canvas(
        Image.composite(negative, canvas.image, canvas.mask),
        canvas.mask,
        canvas.box,
        canvas.feather_px,
    )


def run(
    engine: Any, monkeypatch: pytest.MonkeyPatch, request: Any, invert: bool
) -> tuple[np.ndarray, GaussianDenoiser]:
    """The final latents of the request's one candidate (before decoding), painted by the
    Gaussian denoiser; the pre-fill replaced by its negative when `invert`."""
    text2img, _ = engine.pipelines(request.model)
    denoiser = GaussianDenoiser(text2img.scheduler.alphas_cumprod)
    captured: list[Any] = []
    real_decode = engine._decode

    def spy(spec: Any, pipe: Any, latents: Any, tiled: bool) -> Any:
        captured.append(latents.float().clone())
        return real_decode(spec, pipe, latents, tiled)

    real_prepare = outpaint.prepare
    monkeypatch.setattr(text2img.unet, "forward", denoiser)
    monkeypatch.setattr(engine, "_decode", spy)
    if invert:
        monkeypatch.setattr(outpaint, "prepare", lambda r: negative_prefill(real_prepare(r)))
    engine.generate(request)
    monkeypatch.undo()
    (latents,) = captured
    return latents[0].numpy(), denoiser


def painted_cells(canvas: outpaint.Canvas) -> np.ndarray:
    """Latent cells all of whose 8x8 pixels are painted."""
    mask = np.asarray(canvas.mask, dtype=np.float32) / 255
    return mask.reshape(mask.shape[0] // 8, 8, mask.shape[1] // 8, 8).min(axis=(1, 3)) > 0


@pytest.mark.parametrize("kind", ["zoom", "region"])
def test_the_prefill_steers_the_painting_on_the_4_channel_path(
    engine: Any, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    from generation.init_latents import encode_edit

    parent = imagine(model="tiny", steps=10, seed=7)
    if kind == "zoom":
        request = requests.zoom_request(parent, source(), factor=2.0, seed=3)
    else:
        request = requests.region_request(parent, source(), seed=3, regions={Region.LEFT})
    request = request.with_changes(num_candidates=1, num_kept=1)
    plain, denoiser = run(engine, monkeypatch, request, invert=False)
    inverted, _ = run(engine, monkeypatch, request, invert=True)
    # How far apart the two pre-fills are in latent space, as the pipeline gets them.
    canvas = outpaint.prepare(request)
    pipe = engine._loaded["tiny"].inpaint
    start = encode_edit(pipe, canvas.image, canvas.mask, "sd", needs_image=True).image
    start_inverted = encode_edit(
        pipe, negative_prefill(canvas).image, canvas.mask, "sd", needs_image=True
    ).image
    cells = painted_cells(canvas)
    given = np.abs(start[0].numpy() - start_inverted[0].numpy())[:, cells].mean()
    carried = np.abs(plain - inverted)[:, cells].mean() / given
    predicted = np.sqrt(denoiser.alpha_bar(denoiser.timesteps[0]))
    # 0.18 at strength 0.8 of 10 DPM++ 2M Karras steps (from pure noise the first step is
    # t = 999 with 0.07, but carries nothing: measured 0.0 at strength 1.0).
    assert predicted > 0.1
    assert carried > MIN_SHARE_OF_PREDICTION * predicted, (
        f"the pre-fill carried {carried:.4f} of its change, the start {predicted:.4f}"
    )


def test_which_edits_start_from_the_prefill() -> None:
    """The 9-channel UNet (which sees the kept image beside its latents) paints from pure
    noise, and so does a job with too few steps for the configured strength to leave one."""
    assert outpaint.edit_strength(4, 0.8, 10) == 0.8
    assert outpaint.edit_strength(9, 0.8, 10) == 1.0
    assert outpaint.edit_strength(4, 0.8, 1) == 1.0
    assert outpaint.edit_strength(4, 0.5, 2) == 0.5
