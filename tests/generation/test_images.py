"""Grids, AUTOMATIC1111 metadata and encoding under an upload limit."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from generation.contract import GenerationRequest, JobKind, Sampler
from generation.images import (
    a1111_parameters,
    encode_for_upload,
    grid_shape,
    make_grid,
    parse_a1111_parameters,
    png_bytes,
    read_parameters,
    save_png,
)
from generation.requests import variation_request
from tests.generation.helpers import imagine

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]


def _solid(size: tuple[int, int], colour: tuple[int, int, int]) -> Image.Image:
    return Image.new("RGB", size, colour)


@pytest.mark.parametrize("size", [(64, 64), (96, 64), (64, 96)], ids=["1:1", "3:2", "2:3"])
def test_grid_of_four_places_each_image_in_its_cell(size: tuple[int, int]) -> None:
    width, height = size
    grid = make_grid([_solid(size, c) for c in COLOURS])
    assert grid.size == (2 * width, 2 * height)
    # Same aspect ratio as the images: a 3:2 job gives a 3:2 grid.
    assert grid.width * height == grid.height * width
    cells = [(0, 0), (1, 0), (0, 1), (1, 1)]  # left-right, then top-bottom
    for (column, row), colour in zip(cells, COLOURS, strict=True):
        for dx, dy in ((1, 1), (width - 2, height - 2), (width // 2, height // 2)):
            assert grid.getpixel((column * width + dx, row * height + dy)) == colour


def test_grid_of_fewer_images() -> None:
    one = make_grid([_solid((96, 64), COLOURS[0])])
    assert one.size == (96, 64)
    two = make_grid([_solid((96, 64), c) for c in COLOURS[:2]])
    assert two.size == (192, 64)
    assert two.getpixel((150, 30)) == COLOURS[1]
    three = make_grid([_solid((96, 64), c) for c in COLOURS[:3]])
    assert three.size == (192, 128)
    assert three.getpixel((10, 100)) == COLOURS[2]
    assert three.getpixel((150, 100)) == (0, 0, 0)  # the empty cell


def test_grid_shape_and_errors() -> None:
    assert [grid_shape(n) for n in (1, 2, 3, 4, 8)] == [(1, 1), (2, 1), (2, 2), (2, 2), (3, 3)]
    with pytest.raises(ValueError, match=r"^images"):
        make_grid([])
    with pytest.raises(ValueError, match=r"^images"):
        make_grid([_solid((64, 64), COLOURS[0]), _solid((64, 96), COLOURS[1])])


def test_parameters_use_automatic1111s_format() -> None:
    request = GenerationRequest(
        kind=JobKind.IMAGINE,
        prompt="a lighthouse at dusk, oil painting",
        negative_prompt="blurry, text",
        width=512,
        height=768,
        steps=30,
        guidance=7.0,
        sampler=Sampler.DPMPP_2M_KARRAS,
        seed=123,
    )
    text = a1111_parameters(request, seed=124, model_name="sd15")
    assert text == (
        "a lighthouse at dusk, oil painting\n"
        "Negative prompt: blurry, text\n"
        "Steps: 30, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 124, Size: 512x768, Model: sd15"
    )
    no_negative = a1111_parameters(request.with_changes(negative_prompt=""), 1, "sd15")
    assert "Negative prompt" not in no_negative
    assert no_negative.count("\n") == 1


def test_parameters_round_trip_through_a_png(tmp_path: Path) -> None:
    parent = imagine(
        prompt="a café at night,\nneon: pink",
        negative_prompt="people",
        guidance=7.5,
        sampler=Sampler.EULER_A,
        tile=True,
    )
    source = _solid((64, 64), COLOURS[0])
    request = variation_request(parent, source, strength=0.35, seed=77)
    text = a1111_parameters(request, seed=78, model_name="my:model, v2")
    path = save_png(source, tmp_path / "out.png", text)
    assert read_parameters(path) == text
    with Image.open(path) as reopened:
        assert reopened.info["parameters"] == text
    parsed = parse_a1111_parameters(text)
    assert parsed["Prompt"] == "a café at night,\nneon: pink"
    assert parsed["Negative prompt"] == "people"
    assert parsed["Steps"] == "4"
    assert parsed["Sampler"] == "Euler a"
    assert parsed["CFG scale"] == "7.5"
    assert parsed["Seed"] == "78"
    assert (parsed["Size-1"], parsed["Size-2"]) == ("64", "64")
    assert parsed["Model"] == "my:model, v2"  # quoted because of the comma and colon
    assert parsed["Denoising strength"] == "0.35"
    assert parsed["Tiling"] == "True"
    assert Sampler.parse(parsed["Sampler"]) is Sampler.EULER_A


def test_png_without_parameters_has_none() -> None:
    data = png_bytes(_solid((8, 8), COLOURS[1]))
    assert read_parameters(data) is None
    assert Image.open(io.BytesIO(data)).size == (8, 8)


def _noisy(size: tuple[int, int]) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def test_encode_for_upload_keeps_png_when_it_fits() -> None:
    image = _solid((256, 256), COLOURS[2])
    data, name = encode_for_upload(
        image, 10 * 1024 * 1024, parameters="x\nSteps: 1, Seed: 2, Size: 1x1"
    )
    assert name == "image.png"
    assert read_parameters(data) == "x\nSteps: 1, Seed: 2, Size: 1x1"


def test_encode_for_upload_shrinks_under_the_limit() -> None:
    image = _noisy((512, 512))  # noise barely compresses: ~790 KB as PNG
    assert len(png_bytes(image)) > 200_000
    text = "a lighthouse\nSteps: 30, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512"
    data, name = encode_for_upload(image, 200_000, parameters=text, stem="grid")
    assert len(data) <= 200_000
    assert name.startswith("grid.") and name.split(".")[1] in {"webp", "jpg"}
    decoded = Image.open(io.BytesIO(data))
    assert decoded.size == (512, 512)
    assert read_parameters(data) == text

    tiny_limit = 20_000
    data, name = encode_for_upload(image, tiny_limit)
    assert len(data) <= tiny_limit
    # Even the lowest quality did not fit at full size, so the image was scaled down.
    assert Image.open(io.BytesIO(data)).size[0] < 512


def test_encode_for_upload_rejects_a_silly_limit() -> None:
    with pytest.raises(ValueError, match=r"^limit_bytes"):
        encode_for_upload(_solid((8, 8), COLOURS[0]), 10)
