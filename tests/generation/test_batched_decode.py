"""vae_batched_decode: a job's images decoded in one VAE call; out of memory, one at a time.

The GPU's out-of-memory error is injected at the edge, in the VAE's own decode of a batch
(AutoencoderKL._decode), when it is given more than one image: what a card too small for the
whole batch does. The engine must fall back to one image at a time without redoing the steps,
give the same pictures, put the shared VAE back as it was, and remember the load that did not
fit so the next job that large goes one at a time at once.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from generation.engine import DiffusersEngine, create_engine
from generation.settings import EngineSettings
from tests.generation.helpers import assert_same_picture, imagine


@pytest.fixture(scope="module")
def batched(settings: EngineSettings) -> DiffusersEngine:
    return create_engine(dataclasses.replace(settings, vae_batched_decode=True))


def _decoded_batches(
    engine: DiffusersEngine, monkeypatch: pytest.MonkeyPatch, fits: int | None = None
) -> list[tuple[int, bool]]:
    """(images in the call, whether it ran out of memory) for each VAE decode call; with `fits`,
    a call of more images than that runs out of memory."""
    vae = engine.pipelines()[0].vae
    inner = vae._decode
    calls: list[tuple[int, bool]] = []

    def edge(latents: torch.Tensor, *args: object, **kwargs: object) -> object:
        count = int(latents.shape[0])
        if fits is not None and count > fits:
            calls.append((count, True))
            raise torch.OutOfMemoryError("CUDA out of memory (simulated, decoding a batch)")
        calls.append((count, False))
        return inner(latents, *args, **kwargs)

    monkeypatch.setattr(vae, "_decode", edge)
    return calls


def test_a_batch_is_decoded_in_one_call(
    batched: DiffusersEngine, engine: DiffusersEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    request = imagine(num_candidates=3, num_kept=3, seed=21)
    calls = _decoded_batches(batched, monkeypatch)
    result = batched.generate(request)
    assert calls == [(3, False)]
    # At rest the shared VAE still slices (its encoder runs one image at a time too).
    assert batched.pipelines()[0].vae.use_slicing
    for a, b in zip(result.images, engine.generate(request).images, strict=True):
        assert_same_picture(a, b)


def test_out_of_memory_falls_back_to_one_image_at_a_time_and_is_remembered(
    settings: EngineSettings, engine: DiffusersEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    fresh = create_engine(dataclasses.replace(settings, vae_batched_decode=True))
    request = imagine(num_candidates=3, num_kept=3, seed=22)
    steps: list[int] = []
    unet = fresh.pipelines()[0].unet
    forward = unet.forward

    def counted(sample: torch.Tensor, *args: object, **kwargs: object) -> object:
        steps.append(int(sample.shape[0]))
        return forward(sample, *args, **kwargs)

    monkeypatch.setattr(unet, "forward", counted)
    calls = _decoded_batches(fresh, monkeypatch, fits=1)
    result = fresh.generate(request)
    # The batch ran out of memory once; the same latents were decoded one by one, and the
    # denoising was not redone (one UNet call per step, all 3 candidates with guidance).
    assert calls == [(3, True), (1, False), (1, False), (1, False)]
    assert steps == [6] * request.steps
    vae = fresh.pipelines()[0].vae
    assert vae.use_slicing and not vae.use_tiling
    for a, b in zip(result.images, engine.generate(request).images, strict=True):
        assert_same_picture(a, b)

    # As large a job again: one at a time at once. A smaller one still tries its batch.
    calls.clear()
    fresh.generate(request.with_changes(seed=23))
    assert calls == [(1, False)] * 3
    calls.clear()
    fresh.generate(request.with_changes(num_candidates=2, num_kept=2, seed=24))
    assert calls == [(2, True), (1, False), (1, False)]


def test_off_by_default_one_image_at_a_time(
    engine: DiffusersEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert not engine.settings.vae_batched_decode
    calls = _decoded_batches(engine, monkeypatch)
    engine.generate(imagine(num_candidates=3, num_kept=2, seed=25))
    assert calls == [(1, False)] * 3
