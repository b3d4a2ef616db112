"""The seam of an edit, with a perfect painter: an oracle whose answer is known.

Tiny random-weight models paint noise, so a blurred band beside the kept image would be
invisible in their results. Here the "model" returns the ground truth itself (a picture whose
kept part is exactly the kept image): whatever the composite does to a perfect painting is the
composite's own error, measured in bands of distance from the kept image, for every edit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from generation import outpaint, requests
from generation.canvas import place, placement
from generation.contract import GenerationRequest, PanDirection, Region
from generation.settings import EngineSettings, ModelSpec
from tests.generation.helpers import imagine, pixels

MAX_PIXELS = 512 * 512
# Mean error allowed in every band, in 0-255 steps: rounding, nothing visible.
MAX_BAND_ERROR = 2.0
BANDS = ((1, 10), (11, 20), (21, 30), (31, 40))


def scene(size: tuple[int, int], variant: int = 0) -> Image.Image:
    """A picture with detail at every scale (gradients, stripes, fine noise), so that a pixel
    from anywhere else, or a blurred one, is far from the right one; `variant` draws another."""
    width, height = size
    if variant:
        x_flip = scene(size).transpose(Image.Transpose.ROTATE_180)
        return Image.fromarray(255 - np.asarray(x_flip))
    x = np.arange(width)[None, :].repeat(height, 0).astype(np.float64)
    y = np.arange(height)[:, None].repeat(width, 1).astype(np.float64)
    fine = np.random.default_rng(0).integers(-40, 41, (height, width, 3))
    rgb = np.stack(
        [
            128 + 80 * np.sin(x / 9.0) * np.cos(y / 13.0),
            255 * x / width,
            128 + 100 * np.sin((x + y) / 5.0),
        ],
        axis=2,
    )
    return Image.fromarray(np.clip(rgb + fine, 0, 255).astype(np.uint8))


def parent(size: tuple[int, int]) -> GenerationRequest:
    return imagine(width=size[0], height=size[1], steps=2, seed=7)


def edit_and_truth(kind: str) -> tuple[GenerationRequest, Image.Image]:
    """An edit request and the picture a perfect painter returns for it: the scene, with the
    kept image (the source as the edit places it) where it is kept."""
    if kind == "region":
        source = scene((256, 256))
        request = requests.region_request(
            parent((256, 256)), source, seed=1, regions={Region.CENTRE}
        )
        # The region is painted anew: the truth there is another picture.
        mask = outpaint.prepare(request).mask
        return request, Image.composite(scene((256, 256), variant=1), source, mask)
    if kind == "zoom":
        canvas = (256, 256)
        world = scene(canvas)
        box = placement(canvas, canvas, zoom_factor=2.0)
        # The parent image is what the scene shows inside the box, at the parent's size.
        source = world.crop((box[0], box[1], box[0] + box[2], box[1] + box[3])).resize(canvas)
        request = requests.zoom_request(parent(canvas), source, factor=2.0, seed=1)
    elif kind == "square":
        canvas = (256, 256)
        world = scene(canvas)
        box = placement((256, 128), canvas)
        source = world.crop((box[0], box[1], box[0] + box[2], box[1] + box[3]))
        request = requests.square_request(parent((256, 128)), source, seed=1, max_pixels=MAX_PIXELS)
    else:
        direction = PanDirection(kind.removeprefix("pan_"))
        wide = direction in (PanDirection.LEFT, PanDirection.RIGHT)
        canvas = (384, 256) if wide else (256, 384)
        world = scene(canvas)
        box = placement((256, 256), canvas, pan_direction=direction)
        source = world.crop((box[0], box[1], box[0] + box[2], box[1] + box[3]))
        request = requests.pan_request(
            parent((256, 256)), source, direction=direction, seed=1, max_pixels=MAX_PIXELS
        )
    assert (request.width, request.height) == canvas
    assert request.init_image is not None
    box = placement(
        request.init_image.size,
        canvas,
        zoom_factor=request.zoom_factor,
        pan_direction=request.pan_direction,
    )
    truth = world.copy()
    truth.paste(place(request.init_image, box), box[:2])
    return request, truth


KINDS = ["zoom", "square", "region", *(f"pan_{d.value}" for d in PanDirection)]


def band_errors(result: Image.Image, truth: Image.Image, mask: Image.Image) -> dict[str, float]:
    """Mean absolute error of `result` against `truth` in each band of distance (px) from the
    kept pixels, inside the painted area."""
    painted = np.asarray(mask) > 0
    distance = ndimage.distance_transform_edt(painted)
    error = np.abs(pixels(result) - pixels(truth)).mean(axis=2)
    errors = {}
    for low, high in BANDS:
        band = painted & (distance >= low) & (distance <= high)
        assert band.sum() > 100, f"band {low}-{high} px is (nearly) empty"
        errors[f"{low}-{high}"] = float(error[band].mean())
    return errors


@pytest.mark.parametrize("kind", KINDS)
def test_a_perfect_painting_comes_through_the_composite_at_every_distance(kind: str) -> None:
    request, truth = edit_and_truth(kind)
    canvas = outpaint.prepare(request)
    result = outpaint.composite(canvas, truth)
    errors = band_errors(result, truth, canvas.mask)
    assert all(e <= MAX_BAND_ERROR for e in errors.values()), errors
    # The pre-fill the painter was given is far from the truth there: the bands measure
    # something (a composite that showed the pre-fill would fail them).
    prefill_errors = band_errors(canvas.image, truth, canvas.mask)
    assert min(prefill_errors.values()) > 10 * MAX_BAND_ERROR, prefill_errors
    # Kept pixels farther than the feather from the painted area are the member's own, exactly
    # (here the truth; a painter that painted them otherwise would not change them).
    noise = np.random.default_rng(3).integers(0, 256, (request.height, request.width, 3))
    scrambled = outpaint.composite(canvas, Image.fromarray(noise.astype(np.uint8)))
    near = ndimage.binary_dilation(
        np.asarray(canvas.mask) > 0, structure=np.ones((3, 3)), iterations=canvas.feather_px
    )
    assert np.array_equal(pixels(scrambled)[~near], pixels(canvas.image)[~near])
    assert 2 <= canvas.feather_px <= 8


def test_the_feather_reaches_into_the_kept_side_only() -> None:
    mask = Image.new("L", (40, 10), 0)
    mask.paste(255, (20, 0, 40, 10))
    alpha = outpaint.seam_alpha(mask, 4)
    row = alpha[5]
    assert np.all(row[20:] == 1.0)
    # Four kept pixels take a falling share of the painting, the rest none.
    assert row[16:20] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert np.all(row[:16] == 0.0)


@pytest.fixture(scope="module")
def painter_engine(tiny_cache: Path) -> Any:
    from generation.engine import create_engine

    settings = EngineSettings(
        models=(ModelSpec(name="tiny", source="tiny", base_resolution=128),),
        cache_dir=tiny_cache,
        device="cpu",
        local_files_only=True,
        max_pixels=MAX_PIXELS,
    )
    return create_engine(settings)


@pytest.mark.parametrize("kind", ["zoom", "pan_left", "region"])
def test_the_engine_composites_a_perfect_painting_without_a_seam(
    painter_engine: Any, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """The engine's own edit path (canvas, painting, composite, ranking) with the painting
    step replaced by the perfect painter."""
    request, truth = edit_and_truth(kind)
    request = request.with_changes(num_candidates=2, num_kept=2)

    def perfect_painter(loaded: Any, request: GenerationRequest, seeds: Any, *a: Any, **k: Any):
        assert k["edit"] is not None
        return [truth.copy() for _ in seeds]

    monkeypatch.setattr(painter_engine, "_diffuse", perfect_painter)
    result = painter_engine.generate(request)
    canvas = outpaint.prepare(request)
    for image in result.images:
        errors = band_errors(image, truth, canvas.mask)
        assert all(e <= MAX_BAND_ERROR for e in errors.values()), errors
