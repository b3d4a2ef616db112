"""Half precision as on a GPU, run on the CPU: every sampler, with and without `--stop`, in SD
and SDXL shapes, and variations. Each float16 image is checked against the float32 one of the
same seed, so a dtype slip that decodes to black or noise fails, not only one that raises."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from generation.contract import GenerationResult, Progress, Sampler
from generation.engine import DiffusersEngine, create_engine
from generation.requests import variation_request
from generation.samplers import make_scheduler
from generation.settings import EngineSettings, ModelSpec
from tests.generation.helpers import imagine, pixels

MODELS = (
    ModelSpec("tiny", "tiny", base_resolution=128),
    ModelSpec("xl", "tiny-sdxl", base_resolution=128, family="sdxl"),
)
STEPS = 3
# float16 rounding moves a pixel by a level or two; a broken decode moves it by tens.
MEAN_DIFF_LIMIT = 10.0
# The Karras variants run the same scheduler code with other sigmas.
ONE_PER_SCHEDULER = [s for s in Sampler if not s.value.endswith("_karras")]
STRENGTH = 0.75


def _engine(cache: Path, dtype: str) -> DiffusersEngine:
    from generation.tiny import ensure_tiny_sdxl

    ensure_tiny_sdxl(cache)
    return create_engine(
        EngineSettings(
            models=MODELS,
            cache_dir=cache,
            device="cpu",
            dtype=dtype,
            local_files_only=True,
        )
    )


@pytest.fixture(scope="module")
def half(tiny_cache: Path) -> DiffusersEngine:
    return _engine(tiny_cache, "float16")


@pytest.fixture(scope="module")
def full(tiny_cache: Path) -> DiffusersEngine:
    return _engine(tiny_cache, "float32")


def _close(half: GenerationResult, full: GenerationResult) -> None:
    # Compared seed by seed: the two precisions may rank the candidates differently.
    assert sorted(half.seeds) == sorted(full.seeds)
    by_seed = dict(zip(full.seeds, full.images, strict=True))
    for seed, image in zip(half.seeds, half.images, strict=True):
        a, b = pixels(image), pixels(by_seed[seed])
        assert a.std() > 5, "float16 image is blank"
        assert np.abs(a - b).mean() < MEAN_DIFF_LIMIT


@pytest.mark.parametrize("stop", [100, 25])
@pytest.mark.parametrize("sampler", list(Sampler))
@pytest.mark.parametrize("model", ["tiny", "xl"])
def test_every_sampler_in_float16(
    half: DiffusersEngine, full: DiffusersEngine, model: str, sampler: Sampler, stop: int
) -> None:
    request = imagine(
        model=model, sampler=sampler, steps=STEPS, stop_percent=stop, num_candidates=1, num_kept=1
    )
    seen: list[Progress] = []
    result = half.generate(request, progress=seen.append)
    assert half.pipelines(model)[0].unet.dtype == half.dtype
    assert result.images[0].size == (64, 64)
    assert seen[-1].step == seen[-1].total
    if stop == 100:
        assert pixels(result.images[0]).std() > 5, "float16 image is blank"
    else:
        # The stop swaps in the x0 estimate: compared with float32 where a dtype slip would show.
        assert seen[-1].total < STEPS
        _close(result, full.generate(request))


@pytest.mark.parametrize("sampler", ONE_PER_SCHEDULER)
@pytest.mark.parametrize("model", ["tiny", "xl"])
def test_variations_inherit_stop_in_float16(
    half: DiffusersEngine, full: DiffusersEngine, model: str, sampler: Sampler
) -> None:
    parent = imagine(
        model=model, sampler=sampler, steps=STEPS, stop_percent=50, num_candidates=1, num_kept=1
    )
    source = full.generate(parent).images[0]
    request = variation_request(parent, source, strength=STRENGTH, seed=7)
    assert request.stop_percent == 50
    seen: list[Progress] = []
    varied = half.generate(request, progress=seen.append)
    assert [image.size for image in varied.images] == [(64, 64)]
    # img2img denoises int(steps x strength) steps, 2n - 1 model calls for a second-order
    # sampler (Heun, DPM2, DPM++ SDE); --stop 50 keeps half of them, rounded up.
    denoised = int(STEPS * STRENGTH)
    order = make_scheduler(sampler, half.pipelines(model)[0].scheduler.config).order
    assert seen[-1].total == math.ceil((denoised * order - (order - 1)) / 2)
    _close(varied, full.generate(request))


def _count_unet_calls(engine: DiffusersEngine, model: str, monkeypatch: pytest.MonkeyPatch):
    unet = engine.pipelines(model)[0].unet
    forward = unet.forward
    calls: list[int] = []

    def counted(sample: torch.Tensor, *args: object, **kwargs: object) -> object:
        calls.append(sample.shape[0])
        return forward(sample, *args, **kwargs)

    monkeypatch.setattr(unet, "forward", counted)
    return calls


@pytest.mark.parametrize("model", ["tiny", "xl"])
def test_out_of_memory_while_decoding_redoes_only_the_decode(
    half: DiffusersEngine, model: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    request = imagine(model=model, steps=3, seed=11)
    clean = half.generate(request)
    vae = half.pipelines(model)[0].vae
    decode = vae.decode
    failures: list[torch.dtype] = []

    def short_of_memory_once(*args: object, **kwargs: object) -> object:
        if not failures:
            failures.append(vae.dtype)
            raise torch.OutOfMemoryError("CUDA out of memory (simulated, while decoding)")
        return decode(*args, **kwargs)

    monkeypatch.setattr(vae, "decode", short_of_memory_once)
    calls = _count_unet_calls(half, model, monkeypatch)
    retried = half.generate(request)
    # One batched UNet call per step (2 candidates x the guidance pair), never a second round.
    assert calls == [4] * 3
    # SDXL's stock VAE is moved to float32 to decode; it must come back to float16.
    assert failures == [torch.float32 if model == "xl" else torch.float16]
    assert vae.dtype == torch.float16
    assert retried.seeds == clean.seeds
    for a, b in zip(retried.images, clean.images, strict=True):
        assert np.abs(pixels(a) - pixels(b)).max() <= 2
    monkeypatch.undo()
    after = half.generate(request.with_changes(seed=12))
    assert vae.dtype == torch.float16
    assert len(after.images) == 2


def test_a_batch_is_decoded_one_image_at_a_time(
    half: DiffusersEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    vae = half.pipelines("xl")[0].vae
    inner = vae._decode
    batches: list[int] = []

    def spy(latents: torch.Tensor, *args: object, **kwargs: object) -> object:
        batches.append(latents.shape[0])
        return inner(latents, *args, **kwargs)

    monkeypatch.setattr(vae, "_decode", spy)
    half.generate(imagine(model="xl", steps=2, num_candidates=3, num_kept=2))
    assert batches == [1, 1, 1]
