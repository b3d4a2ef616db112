"""The generation bench's compute figures: counted from the modules' shapes, they must match the
published SD 1.5 costs (0.80 TFLOP per latent per UNet pass at 512², 2.5 TFLOP per decode)."""

from pathlib import Path

import pytest

from bench.bench_generation import (
    SD15_UNET,
    SD_VAE,
    component_tflop,
    job_tflop,
)
from bench.clip_l14 import CLIP_L14_VISION
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


def test_model_source_times_every_job_kind(tmp_path: Path, tiny_models: Path) -> None:
    """`--model-source DIR` on a diffusers folder (the tiny model here, real weights on a GPU):
    every kind is run through the engine, warmed up, timed `--repeats` times."""
    import json

    from bench.bench_generation import main
    from bench.real_weights import KINDS
    from generation.tiny import ensure_tiny_clip, ensure_tiny_inpaint, ensure_tiny_sd

    out = tmp_path / "figures.json"
    # The run's tiny models, not built again.
    argv = [
        "--model-source",
        str(ensure_tiny_sd(tiny_models)),
        "--clip-model",
        str(ensure_tiny_clip(tiny_models)),
        "--inpaint-source",
        str(ensure_tiny_inpaint(tiny_models)),
        "--size",
        "64",
        "--steps",
        "4",
        "--candidates",
        "1",
        "--repeats",
        "2",
        "--cache-dir",
        str(tmp_path),
        "--json",
        str(out),
    ]
    assert main(argv) == 0
    (figures,) = json.loads(out.read_text())
    assert figures["family"] == "sd" and figures["size"] == "64x64"
    assert list(figures["kinds"]) == list(KINDS)
    sizes = {kind: f["size"] for kind, f in figures["kinds"].items()}
    assert sizes["upscale"] == "128x128" and sizes["pan"] == "96x64"
    for kind, f in figures["kinds"].items():
        assert f["runs"] == 2, kind
        assert 0 < f["p50_s"] <= f["p90_s"] <= f["max_s"], kind
