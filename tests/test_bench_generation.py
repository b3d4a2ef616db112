"""The generation bench's compute figures: counted from the modules' shapes, they must match the
published SD 1.5 costs (0.80 TFLOP per latent per UNet pass at 512², 2.5 TFLOP per decode)."""

import pytest

from bench.bench_generation import (
    CLIP_L14_VISION,
    SD15_UNET,
    SD_VAE,
    component_tflop,
    job_tflop,
)
from generation.contract import GenerationRequest, JobKind


def test_sd15_costs_match_the_published_figures() -> None:
    per = component_tflop(SD15_UNET, SD_VAE, CLIP_L14_VISION, 512)
    assert per["unet_pass"] == pytest.approx(0.80, abs=0.01)
    assert per["vae_decode"] == pytest.approx(2.5, abs=0.05)
    assert per["clip_image"] == pytest.approx(0.16, abs=0.01)
    request = GenerationRequest(
        kind=JobKind.IMAGINE, prompt="x", steps=30, guidance=7.0, num_candidates=8, num_kept=4
    )
    # A guidance pair is two passes: 1.61 TFLOP a step, 30 steps, 8 candidates, then decodes.
    expected = 8 * (30 * 2 * per["unet_pass"] + per["vae_decode"] + per["clip_image"])
    assert job_tflop(per, request) == pytest.approx(expected)
    assert 2 * per["unet_pass"] == pytest.approx(1.61, abs=0.01)
    unguided = GenerationRequest(kind=JobKind.IMAGINE, prompt="x", steps=30, guidance=1.0)
    assert job_tflop(per, unguided) < job_tflop(per, request) / 1.9
