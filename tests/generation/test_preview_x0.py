"""Previews show the model's current estimate of the clean image (x0), not the noisy latents.

Oracle: the UNet is replaced by the exact noise predictor for one known clean latent X (given
x_t, the noise that makes x_t out of X), so the right estimate of the clean image is X at every
step and every preview should show X, from the first on. The noisy latents of the first steps
are mostly noise (sigma of 3-14 against X's spread of 1) and show nothing like it.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from generation.contract import Progress, Sampler
from generation.engine import create_engine
from generation.preview import latents_to_images
from tests.generation.helpers import imagine, pixels, tiny_settings

# Mean difference (0-255) allowed between a preview and the linear map of X. Measured: 0 for
# Euler and DDIM, up to 0.1 for DPM++ 2M Karras (its sigmas are rounded to whole timesteps);
# previews of the noisy latents were 53-79 off.
MAX_PREVIEW_ERROR = 2.0


def target_latent() -> Any:
    """X: a clean latent within the linear map's range (no clipping), with structure."""
    import torch

    y, x = torch.meshgrid(torch.linspace(-1, 1, 8), torch.linspace(-1, 1, 8), indexing="ij")
    return torch.stack([0.6 * x, 0.5 * y, -0.4 * x * y, 0.3 * (x + y) / 2])[None] * 1.2


class KnownImageDenoiser:
    """Stands in for the UNet's forward: the noise prediction whose clean image is X."""

    def __init__(self, alphas_cumprod: Any, target: Any) -> None:
        self.alphas_cumprod = np.asarray(alphas_cumprod, dtype=np.float64)
        self.target = target

    def __call__(self, sample: Any, timestep: Any, *args: Any, **kwargs: Any) -> Any:
        alpha_bar = float(
            np.interp(float(timestep), np.arange(len(self.alphas_cumprod)), self.alphas_cumprod)
        )
        eps = (sample - np.sqrt(alpha_bar) * self.target) / np.sqrt(1.0 - alpha_bar)
        if kwargs.get("return_dict", True):
            from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

            return UNet2DConditionOutput(sample=eps)
        return (eps,)


@pytest.fixture(scope="module")
def engine(tiny_cache: Path) -> Any:
    return create_engine(tiny_settings(tiny_cache, preview_interval_s=0.0))


@pytest.mark.parametrize("sampler", [Sampler.EULER, Sampler.DDIM, Sampler.DPMPP_2M_KARRAS])
def test_every_preview_shows_the_clean_image_estimate(
    engine: Any, monkeypatch: pytest.MonkeyPatch, sampler: Sampler
) -> None:
    text2img, _ = engine.pipelines("tiny")
    target = target_latent()
    monkeypatch.setattr(
        text2img.unet, "forward", KnownImageDenoiser(text2img.scheduler.alphas_cumprod, target)
    )
    updates: list[Progress] = []
    request = imagine(
        width=64, height=64, steps=6, sampler=sampler, preview=True, num_candidates=1, num_kept=1
    )
    engine.generate(request, progress=updates.append)
    previews = [u.preview_png for u in updates if u.preview_png is not None]
    assert len(previews) == 5  # every step but the last
    expected = pixels(latents_to_images(target, "sd")[0])
    errors = [
        float(np.abs(pixels(Image.open(io.BytesIO(png))) - expected).mean()) for png in previews
    ]
    assert max(errors) <= MAX_PREVIEW_ERROR, errors
