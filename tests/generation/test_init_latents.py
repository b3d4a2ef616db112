"""A job's starting picture is VAE-encoded once, whatever the number of candidates: counted
with a spy around the real pipeline's real VAE encoder, for variations, image-prompt starts
and every kind of edit on both inpainting paths."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from generation import requests
from generation.contract import GenerationRequest, PanDirection, Region
from generation.settings import EngineSettings, ModelSpec
from tests.generation.helpers import assert_same_picture, imagine

PLAIN = "tiny"
DEDICATED = "tiny-inpainting"


@pytest.fixture(scope="module")
def engine(tiny_cache: Path) -> Any:
    from generation.engine import create_engine

    settings = EngineSettings(
        models=(
            ModelSpec(name=PLAIN, source="tiny", base_resolution=128),
            ModelSpec(
                name=DEDICATED, source="tiny", base_resolution=128, inpaint_source="tiny-inpaint"
            ),
        ),
        cache_dir=tiny_cache,
        device="cpu",
        local_files_only=True,
        max_pixels=128 * 128,
    )
    return create_engine(settings)


def picture(size: tuple[int, int] = (64, 64)) -> Image.Image:
    rng = np.random.default_rng(5)
    cells = rng.integers(0, 256, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    return Image.fromarray(cells).resize(size, Image.Resampling.BILINEAR)


def parent(model: str) -> GenerationRequest:
    return imagine(model=model, steps=3, seed=7)


class EncodeSpy:
    """Wraps the VAE's real `encode`, recording the batch size of every call."""

    def __init__(self, vae: Any) -> None:
        self.real = vae.encode
        self.batches: list[int] = []

    def __call__(self, pixels: Any, *args: Any, **kwargs: Any) -> Any:
        self.batches.append(int(pixels.shape[0]))
        return self.real(pixels, *args, **kwargs)


def encodes(engine: Any, monkeypatch: pytest.MonkeyPatch, request: GenerationRequest) -> list[int]:
    text2img, _ = engine.pipelines(request.model)
    spy = EncodeSpy(text2img.vae)
    # Every pipeline of a model shares this VAE (img2img and inpainting come from from_pipe).
    monkeypatch.setattr(text2img.vae, "encode", spy)
    result = engine.generate(request)
    monkeypatch.undo()
    assert len(result.images) == request.num_kept
    return spy.batches


def edits(model: str) -> dict[str, GenerationRequest]:
    source = picture()
    return {
        "zoom": requests.zoom_request(parent(model), source, factor=2.0, seed=3),
        "pan": requests.pan_request(
            parent(model), source, direction=PanDirection.UP, seed=3, max_pixels=128 * 128
        ),
        "region": requests.region_request(parent(model), source, seed=3, regions={Region.LEFT}),
    }


@pytest.mark.parametrize("candidates", [1, 4])
def test_a_variation_encodes_its_picture_once(
    engine: Any, monkeypatch: pytest.MonkeyPatch, candidates: int
) -> None:
    request = requests.variation_request(parent(PLAIN), picture(), strength=0.6, seed=3)
    request = request.with_changes(num_candidates=candidates, num_kept=1)
    assert encodes(engine, monkeypatch, request) == [1]


@pytest.mark.parametrize("model", [PLAIN, DEDICATED])
@pytest.mark.parametrize("kind", ["zoom", "pan", "region"])
def test_an_edit_encodes_its_canvas_once(
    engine: Any, monkeypatch: pytest.MonkeyPatch, model: str, kind: str
) -> None:
    request = edits(model)[kind].with_changes(num_candidates=4, num_kept=2)
    # 4-channel: the canvas alone; 9-channel at full strength: the masked canvas alone.
    assert encodes(engine, monkeypatch, request) == [1]


def test_a_variation_candidate_is_the_same_alone_or_in_a_batch(engine: Any) -> None:
    request = requests.variation_request(parent(PLAIN), picture(), strength=0.6, seed=20)
    batch = engine.generate(request.with_changes(num_candidates=3, num_kept=3))
    index = batch.seeds.index(21)
    alone = engine.generate(request.with_changes(seed=21, num_candidates=1, num_kept=1))
    assert_same_picture(alone.images[0], batch.images[index])
