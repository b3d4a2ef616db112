"""Zoom Out, Pan, Make Square and Vary (Region) through the real engine and tiny models: the
canvas each makes, that what the member kept is kept, that the rest is painted, the masks of
every preset region and of uploaded masks, the tiny 9-channel inpainting UNet, and previews."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from generation import outpaint, requests
from generation.canvas import (
    check_mask,
    pan_canvas,
    place,
    placement,
    read_mask,
    region_box,
    region_mask,
    square_canvas,
)
from generation.contract import (
    GenerationRequest,
    InputImage,
    InputRole,
    JobKind,
    PanDirection,
    Progress,
    Region,
    UpscaleMode,
)
from generation.images import a1111_parameters, parse_a1111_parameters
from generation.preview import Previewer, latents_to_images
from generation.settings import EngineSettings, ModelSpec
from tests.generation.helpers import assert_same_picture, imagine, pixels

PLAIN = "tiny"  # masked latent blending on the model's own 4-channel UNet
DEDICATED = "tiny-inpainting"  # the tiny 9-channel inpainting checkpoint
MAX_PIXELS = 128 * 128


@pytest.fixture(scope="module")
def edit_engine(tiny_cache: Path) -> Any:
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
        max_pixels=MAX_PIXELS,
        preview_interval_s=0.0,
    )
    return create_engine(settings)


def source_image(size: tuple[int, int] = (64, 64)) -> Image.Image:
    """A picture with structure everywhere (gradients and a grid), so that a pixel kept or
    changed is told apart from a flat colour."""
    width, height = size
    x = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height)[:, None].repeat(width, 1)
    grid = ((np.arange(width)[None, :] // 8 + np.arange(height)[:, None] // 8) % 2) * 60
    rgb = np.stack([x, y, 255 - x * 0.5 + grid * 0], axis=2) + grid[..., None]
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))


def parent(model: str = PLAIN, size: tuple[int, int] = (64, 64)) -> GenerationRequest:
    return imagine(model=model, width=size[0], height=size[1], steps=2, seed=7)


def painted_and_kept(result: Image.Image, canvas: outpaint.Canvas) -> tuple[np.ndarray, np.ndarray]:
    """The painted area, and the kept pixels beyond the seam's feather (those within it blend
    the model's repaint of the kept image into the kept pixels)."""
    mask = np.asarray(canvas.mask) > 0
    return mask, ~beyond_feather(canvas.mask, canvas.feather_px)


def beyond_feather(mask: Image.Image, feather_px: int) -> np.ndarray:
    """The mask grown by the feather: pixels outside it are kept exactly."""
    from scipy import ndimage

    return ndimage.binary_dilation(
        np.asarray(mask) > 0, structure=np.ones((3, 3)), iterations=feather_px
    )


def check_edit(result: Image.Image, request: GenerationRequest, source: Image.Image) -> None:
    """Output size; kept pixels equal the source as placed (same resize); painted pixels
    differ from what the model was given there."""
    assert result.size == (request.width, request.height)
    canvas = outpaint.prepare(request.with_changes(init_image=source))
    painted, kept = painted_and_kept(result, canvas)
    assert painted.any() and kept.any()
    box = placement(
        source.size,
        result.size,
        zoom_factor=request.zoom_factor,
        pan_direction=request.pan_direction,
    )
    expected = np.zeros((result.height, result.width, 3), dtype=np.int16)
    expected[box[1] : box[1] + box[3], box[0] : box[0] + box[2]] = pixels(place(source, box))
    out = pixels(result)
    assert np.abs(out[kept] - expected[kept]).max() <= 1
    given = pixels(canvas.image)
    assert np.abs(out[painted] - given[painted]).mean() > 8


@pytest.mark.parametrize("model", [PLAIN, DEDICATED])
def test_zoom_out_shrinks_the_image_into_the_middle_and_paints_the_border(
    edit_engine: Any, model: str
) -> None:
    source = source_image()
    request = requests.zoom_request(parent(model), source, factor=2.0, seed=3)
    assert (request.width, request.height, request.strength) == (64, 64, 1.0)
    assert placement(source.size, (64, 64), zoom_factor=2.0) == (16, 16, 32, 32)
    result = edit_engine.generate(request)
    assert len(result.images) == request.num_kept
    for image in result.images:
        check_edit(image, request, source)


def test_custom_zoom_to_another_shape_and_factor(edit_engine: Any) -> None:
    source = source_image()
    request = requests.zoom_request(parent(), source, factor=1.5, seed=3, size=(96, 64))
    box = placement(source.size, (96, 64), zoom_factor=1.5)
    assert box == (26, 10, 43, 43)
    check_edit(edit_engine.generate(request).images[0], request, source)
    with pytest.raises(ValueError, match=r"^factor"):
        requests.zoom_request(parent(), source, factor=2.5, seed=3)
    with pytest.raises(ValueError, match=r"^factor"):
        requests.zoom_request(parent(), source, factor=0.9, seed=3)
    with pytest.raises(ValueError, match=r"^factor: .*nothing to paint"):
        requests.zoom_request(parent(), source, factor=1.0, seed=3)


@pytest.mark.parametrize("direction", list(PanDirection))
def test_pan_grows_the_canvas_by_half_and_keeps_the_old_pixels_in_place(
    direction: PanDirection,
) -> None:
    source = source_image()
    request = requests.pan_request(
        parent(DEDICATED), source, direction=direction, seed=5, max_pixels=MAX_PIXELS
    )
    wide = direction in (PanDirection.LEFT, PanDirection.RIGHT)
    assert (request.width, request.height) == ((96, 64) if wide else (64, 96))
    box = placement(source.size, (request.width, request.height), pan_direction=direction)
    # The new strip is on the side panned to; the source is not resized.
    assert box[2:] == (64, 64)
    assert box[:2] == {"left": (32, 0), "right": (0, 0), "up": (0, 32), "down": (0, 0)}[direction]
    # The composite step alone (the engine's run is below, for one direction): whatever the
    # model paints, the old pixels come back exactly.
    canvas = outpaint.prepare(request)
    noise = np.random.default_rng(1).integers(0, 256, (request.height, request.width, 3))
    check_edit(outpaint.composite(canvas, Image.fromarray(noise.astype(np.uint8))), request, source)


def test_pan_through_the_engine(edit_engine: Any) -> None:
    source = source_image()
    request = requests.pan_request(
        parent(DEDICATED), source, direction=PanDirection.LEFT, seed=5, max_pixels=MAX_PIXELS
    )
    result = edit_engine.generate(request.with_changes(num_candidates=1, num_kept=1))
    check_edit(result.images[0], request, source)


def test_pan_past_the_pixel_budget_is_refused_by_name() -> None:
    assert pan_canvas((64, 64), PanDirection.UP, MAX_PIXELS) == (64, 96)
    with pytest.raises(ValueError, match=r"^direction: panning left .* 192x128"):
        requests.pan_request(
            parent(size=(128, 128)),
            source_image((128, 128)),
            direction=PanDirection.LEFT,
            seed=1,
            max_pixels=MAX_PIXELS,
        )


def test_make_square_outpaints_the_short_side(edit_engine: Any) -> None:
    source = source_image((96, 64))
    request = requests.square_request(parent(size=(96, 64)), source, seed=9, max_pixels=MAX_PIXELS)
    assert (request.width, request.height) == (96, 96)
    check_edit(edit_engine.generate(request).images[0], request, source)
    # Past the budget the square is smaller and the source shrinks to fit it.
    assert square_canvas((192, 64), MAX_PIXELS) == (128, 128)
    with pytest.raises(ValueError, match=r"^image: it is already square"):
        square_canvas((64, 64), MAX_PIXELS)


@pytest.mark.parametrize("model", [PLAIN, DEDICATED])
def test_vary_region_changes_only_the_chosen_region(edit_engine: Any, model: str) -> None:
    source = source_image()
    request = requests.region_request(
        parent(model), source, seed=11, regions={Region.TOP_RIGHT, Region.BOTTOM}
    )
    assert request.regions == (Region.BOTTOM, Region.TOP_RIGHT)
    result = edit_engine.generate(request).images[0]
    assert result.size == source.size
    mask = np.asarray(region_mask(request.regions, source.size)) > 0
    out, original = pixels(result), pixels(source)
    near = beyond_feather(region_mask(request.regions, source.size), 2)  # 2 px at 64 px
    assert outpaint.prepare(request).feather_px == 2
    assert np.array_equal(out[~near], original[~near])
    assert np.abs(out[mask] - original[mask]).mean() > 8


def test_vary_region_with_an_uploaded_mask(edit_engine: Any) -> None:
    source = source_image()
    drawn = Image.new("L", (128, 128), 0)  # twice the image's size, same shape
    drawn.paste(255, (20, 30, 90, 100))
    mask = InputImage(InputRole.MASK, drawn, source="mask.png", sha256="ab" * 32)
    request = requests.region_request(parent(), source, seed=2, mask=mask)
    stored = request.inputs_for(InputRole.MASK)[0].image
    assert stored.size == (64, 64) and set(np.unique(np.asarray(stored))) == {0, 255}
    result = edit_engine.generate(request).images[0]
    white = np.asarray(stored) > 0
    out, original = pixels(result), pixels(source)
    near = beyond_feather(stored, outpaint.prepare(request).feather_px)
    assert np.array_equal(out[~near], original[~near])
    assert np.abs(out[white] - original[white]).mean() > 8
    text = a1111_parameters(request, 2, "tiny")
    assert parse_a1111_parameters(text)["Vary region"] == "mask mask.png"


def test_the_dedicated_inpainting_unet_has_nine_channels_and_loads_with_from_pretrained(
    edit_engine: Any, tiny_cache: Path
) -> None:
    from diffusers import UNet2DConditionModel

    from generation.tiny import ensure_tiny_inpaint

    folder = ensure_tiny_inpaint(tiny_cache)
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", local_files_only=True)
    assert (unet.config.in_channels, unet.config.out_channels) == (9, 4)
    source = source_image()
    plain = edit_engine.generate(requests.zoom_request(parent(PLAIN), source, factor=2.0, seed=3))
    dedicated = edit_engine.generate(
        requests.zoom_request(parent(DEDICATED), source, factor=2.0, seed=3)
    )
    # Same seed, same canvas: only the UNet differs.
    assert not np.array_equal(pixels(plain.images[0]), pixels(dedicated.images[0]))
    channels = {
        name: loaded.inpaint.unet.config.in_channels
        for name, loaded in edit_engine._loaded.items()
        if loaded.inpaint is not None
    }
    assert channels == {PLAIN: 4, DEDICATED: 9}


def test_cpu_offload_hooks_the_dedicated_inpainting_unet_too(
    edit_engine: Any, tiny_cache: Path
) -> None:
    """With cpu_offload the model's hooks cover only its own modules: the separately loaded
    9-channel UNet gets one of its own (moved to the device when it runs, the text encoder
    sent back before it) and paints exactly what it paints without offloading. No GPU here, so
    the CPU stands in as the device offloading moves modules to."""
    from generation.engine import create_engine

    engine = create_engine(edit_engine.settings)
    engine.cpu_offload = True
    request = requests.zoom_request(parent(DEDICATED), source_image(), factor=2.0, seed=3)
    offloaded = engine.generate(request)
    plain = edit_engine.generate(request)
    loaded = engine._loaded[DEDICATED]
    unet = loaded.inpaint.unet
    assert unet.config.in_channels == 9
    assert loaded.inpaint_offload is not None and loaded.inpaint_offload.model is unet
    hook = unet._hf_hook
    assert str(hook.execution_device) == "cpu"
    assert hook.prev_module_hook.model is loaded.text2img.text_encoder
    assert_same_picture(offloaded.images[0], plain.images[0])


@pytest.mark.parametrize("region", list(Region))
def test_every_preset_region_masks_its_part(region: Region) -> None:
    size = (96, 60)
    mask = np.asarray(region_mask([region], size)) > 0
    left, top, right, bottom = region_box(region, size)
    expected = np.zeros((size[1], size[0]), dtype=bool)
    expected[top:bottom, left:right] = True
    assert np.array_equal(mask, expected)
    area = mask.mean()
    if region in (Region.LEFT, Region.RIGHT, Region.TOP, Region.BOTTOM, Region.CENTRE):
        assert area == pytest.approx(0.25 if region is Region.CENTRE else 0.5, abs=0.02)
    else:
        assert area == pytest.approx(1 / 9, abs=0.02)


def test_preset_regions_refused_when_none_or_everything() -> None:
    with pytest.raises(ValueError, match=r"^regions: choose at least one"):
        region_mask([], (64, 64))
    with pytest.raises(ValueError, match=r"^regions: .*whole image"):
        region_mask([Region.LEFT, Region.RIGHT], (64, 64))
    cells = [r for r in Region if "_" in r.value]
    with pytest.raises(ValueError, match=r"^regions: .*whole image"):
        region_mask(cells, (64, 64))
    with pytest.raises(ValueError, match=r"^regions"):
        requests.region_request(parent(), source_image(), seed=1)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_uploaded_masks_are_checked() -> None:
    good = Image.new("L", (64, 64), 0)
    good.paste(255, (0, 0, 32, 64))
    assert np.array_equal(np.asarray(check_mask(good, (64, 64))), np.asarray(good))
    # The same shape at another size is resized; a transparent PNG's clear part is black.
    rgba = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    rgba.paste((255, 255, 255, 255), (0, 0, 16, 32))
    resized = check_mask(rgba, (64, 64))
    assert resized.size == (64, 64) and np.asarray(resized)[:, :32].all()
    assert not np.asarray(resized)[:, 32:].any()
    refusals = {
        "not the shape": Image.new("L", (64, 32), 255),
        "black and white": source_image(),
        "all black": Image.new("L", (64, 64), 0),
        "all white": Image.new("L", (64, 64), 255),
    }
    for words, mask in refusals.items():
        with pytest.raises(ValueError, match=rf"^mask: .*{words}"):
            check_mask(mask, (64, 64))
    with pytest.raises(ValueError, match=r"^mask: notes.pdf is not a picture"):
        read_mask(b"%PDF-1.4 definitely not a picture", "notes.pdf")
    # A huge picture is refused from its header, before it is decoded.
    huge = _png(Image.new("1", (5000, 4000), 0))
    with pytest.raises(ValueError, match=r"^mask: it is 5000x4000; at most 4096x4096 pixels"):
        read_mask(huge)
    assert read_mask(_png(good)).size == (64, 64)


def test_previews_come_with_the_progress_only_when_asked(edit_engine: Any) -> None:
    updates: list[Progress] = []
    # 4 steps at the 4-channel path's edit_strength 0.8: 3 denoising steps.
    request = requests.zoom_request(parent(), source_image(), factor=2.0, seed=3).with_changes(
        steps=4
    )
    edit_engine.generate(request.with_changes(preview=True), progress=updates.append)
    previews = [u.preview_png for u in updates if u.preview_png is not None]
    # Every step but the last (the interval is 0 here): the result follows at once.
    assert len(previews) == len(updates) - 1 >= 2
    grid = Image.open(io.BytesIO(previews[0]))
    # Two 64x64 candidates: two latent-sized cells, doubled, side by side.
    assert grid.size == (2 * 16, 16)
    updates.clear()
    edit_engine.generate(request, progress=updates.append)
    assert updates and all(u.preview_png is None for u in updates)


def test_a_preview_decoder_replaces_the_linear_map(edit_engine: Any, tiny_cache: Path) -> None:
    """A model naming a tiny VAE decoder (AutoencoderTiny, built with random weights and
    loaded with from_pretrained) previews through it: full-size decodes shrunk to a cell, not
    latent-sized cells. One that can't be loaded leaves the linear map, and the job runs."""
    from generation.engine import create_engine
    from generation.tiny import ensure_tiny_taesd

    def previews_of(preview_decoder: str) -> list[bytes]:
        spec = ModelSpec(
            name=PLAIN, source="tiny", base_resolution=128, preview_decoder=preview_decoder
        )
        engine = create_engine(dataclasses.replace(edit_engine.settings, models=(spec,)))
        updates: list[Progress] = []
        request = imagine(model=PLAIN, width=64, height=64, steps=3, seed=4, preview=True)
        result = engine.generate(request.with_changes(num_candidates=2, num_kept=2), updates.append)
        assert len(result.images) == 2
        return [u.preview_png for u in updates if u.preview_png is not None]

    decoded = previews_of(str(ensure_tiny_taesd(tiny_cache)))
    assert len(decoded) == 2  # every step but the last
    grid = Image.open(io.BytesIO(decoded[0]))
    # Two 64x64 candidates decoded at full size, side by side (the linear map: 2 x 16x16).
    assert grid.size == (2 * 64, 64)
    # The decoder sees the latents change from step to step.
    assert np.asarray(grid).std() > 0 and decoded[0] != decoded[1]
    linear = previews_of(str(tiny_cache / "no-such-decoder"))
    assert len(linear) == 2
    assert Image.open(io.BytesIO(linear[0])).size == (2 * 16, 16)


def test_previews_are_throttled_and_follow_the_latent_family() -> None:
    import torch

    now = [0.0]
    previewer = Previewer("sd", interval_s=2.0, monotonic=lambda: now[0])
    latents = torch.zeros(5, 4, 8, 8)
    shown = []
    for step in range(1, 11):
        now[0] += 0.5
        shown.append(previewer.maybe(latents, step, 10) is not None)
    assert shown == [True, False, False, False, True, False, False, False, True, False]
    # A preview shows at most four candidates.
    assert len(latents_to_images(latents, "sd")) == 4
    channel = torch.zeros(1, 4, 2, 2)
    channel[:, 0] = 1.0
    sd = np.asarray(latents_to_images(channel, "sd")[0])[0, 0]
    sdxl = np.asarray(latents_to_images(channel, "sdxl")[0])[0, 0]
    assert tuple(sd) != tuple(sdxl)
    with pytest.raises(ValueError, match=r"^family"):
        latents_to_images(channel, "flux")


def test_edits_round_trip_as_json_and_say_what_they_did_in_the_metadata() -> None:
    source = source_image()
    edits = {
        "Zoom out": requests.zoom_request(parent(), source, factor=1.5, seed=1),
        "Pan": requests.pan_request(
            parent(), source, direction=PanDirection.DOWN, seed=1, max_pixels=MAX_PIXELS
        ),
        "Outpaint": requests.square_request(
            parent(size=(64, 96)), source_image((64, 96)), seed=1, max_pixels=MAX_PIXELS
        ),
        "Vary region": requests.region_request(parent(), source, seed=1, regions={Region.CENTRE}),
        "Upscale": requests.upscale_request(
            parent(), source, strength=0.6, seed=1, mode=UpscaleMode.CREATIVE
        ),
    }
    shown = {
        "Zoom out": "1.5",
        "Pan": "down",
        "Outpaint": "square",
        "Vary region": "centre",
        "Upscale": "creative",
    }
    for key, request in edits.items():
        back = GenerationRequest.from_json(request.to_json(), init_image=source)
        assert back == request
        assert parse_a1111_parameters(a1111_parameters(request, 1, "tiny"))[key] == shown[key]
    # A variation or zoom of an edit's result is not that edit again.
    zoomed = edits["Zoom out"]
    again = requests.pan_request(
        zoomed, source, direction=PanDirection.UP, seed=2, max_pixels=MAX_PIXELS
    )
    assert (again.kind, again.zoom_factor) == (JobKind.PAN, 1.0)
    with pytest.raises(ValueError, match=r"^zoom_factor"):
        dataclasses.replace(zoomed, kind=JobKind.PAN, pan_direction=PanDirection.UP)
