"""ControlNet on the tiny model: a tiny ControlNet and a tiny DPT depth model saved as folders and
loaded through the real path; canny and depth control maps; text-to-image and img2img."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from generation.contract import InputImage, InputRole
from generation.engine import DiffusersEngine, create_engine
from generation.images import a1111_parameters, parse_a1111_parameters
from generation.preprocess import Preprocessors, canny, lineart
from generation.requests import variation_request
from generation.settings import ControlNetSpec, EngineSettings, Preprocessor
from generation.tiny import TINY_SD_DIR, build_tiny_controlnet, build_tiny_depth
from tests.generation.helpers import assert_same_picture, imagine, max_diff, pixels, tiny_settings


def _shapes() -> Image.Image:
    image = Image.new("RGB", (96, 96), "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle((10, 10, 50, 60), fill="black")
    draw.ellipse((45, 40, 90, 85), fill=(200, 30, 30))
    return image


@pytest.fixture(scope="module")
def control_settings(tiny_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> EngineSettings:
    root = tmp_path_factory.mktemp("controlnets")
    controlnet = build_tiny_controlnet(root / "cn", tiny_cache / TINY_SD_DIR)
    depth_model = build_tiny_depth(root / "dpt")
    return tiny_settings(
        tiny_cache,
        controlnets=(
            ControlNetSpec("canny", str(controlnet), preprocessor=Preprocessor.CANNY),
            ControlNetSpec(
                "depth",
                str(controlnet),
                preprocessor=Preprocessor.DEPTH,
                preprocessor_model=str(depth_model),
            ),
            ControlNetSpec("map", str(controlnet), preprocessor=Preprocessor.NONE),
        ),
    )


@pytest.fixture(scope="module")
def control_engine(control_settings: EngineSettings) -> DiffusersEngine:
    return create_engine(control_settings)


def _controlled(name: str, picture: Image.Image, weight: float = 1.0, **changes: object):
    control = InputImage(InputRole.CONTROL, picture, source="shapes.png")
    values: dict[str, object] = {"steps": 2, **changes}
    return imagine(
        num_candidates=1,
        num_kept=1,
        controlnet=name,
        controlnet_weight=weight,
        inputs=(control,),
        **values,
    )


def test_canny_finds_the_edges_of_shapes() -> None:
    edges = pixels(canny(_shapes()))
    assert edges.shape == (96, 96, 3)
    assert set(np.unique(edges)) == {0, 255}
    # The rectangle's left edge is an edge, the flat inside of it is not.
    assert edges[30, 9:12].max() == 255
    assert edges[30, 30].max() == 0
    assert pixels(canny(Image.new("RGB", (64, 64), "grey"))).max() == 0


def test_blank_control_image_and_an_edge_map_give_different_images(
    control_engine: DiffusersEngine,
) -> None:
    blank = control_engine.generate(_controlled("map", Image.new("RGB", (64, 64))))
    edges = control_engine.generate(_controlled("canny", _shapes()))
    assert max_diff(blank.images[0], edges.images[0]) > 15
    # The control map comes back at the output size, for the bot to show.
    assert edges.control_map is not None and edges.control_map.size == (64, 64)
    assert pixels(edges.control_map).max() == 255
    assert pixels(blank.control_map).max() == 0
    # Weight 0 is the model without the ControlNet's steering (same seed, no control).
    off = control_engine.generate(_controlled("canny", _shapes(), weight=0.0))
    plain = control_engine.generate(imagine(num_candidates=1, num_kept=1, steps=2))
    assert max_diff(off.images[0], plain.images[0]) <= 2
    assert plain.control_map is None
    # The plain pipeline is unchanged by ControlNet jobs before it.
    assert type(control_engine.pipelines("tiny")[0]).__name__ == "StableDiffusionPipeline"


def test_controlnet_pipelines_share_the_models_modules(control_engine: DiffusersEngine) -> None:
    control_engine.generate(_controlled("canny", _shapes()))
    text2img, _ = control_engine.pipelines("tiny")
    loaded = control_engine._loaded["tiny"]
    pipe = loaded.controlnet_pipes[("canny", False)]
    assert type(pipe).__name__ == "StableDiffusionControlNetPipeline"
    assert pipe.unet is text2img.unet and pipe.vae is text2img.vae


def test_controlnet_steers_variations_too(control_engine: DiffusersEngine) -> None:
    parent = _controlled("canny", _shapes(), steps=4)
    # Any picture will do as the one varied; the shapes themselves save a generation.
    picture = _shapes().resize((64, 64))
    varied = control_engine.generate(variation_request(parent, picture, strength=0.8, seed=5))
    loaded = control_engine._loaded["tiny"]
    pipe = loaded.controlnet_pipes[("canny", True)]
    assert type(pipe).__name__ == "StableDiffusionControlNetImg2ImgPipeline"
    blank = parent.with_changes(
        inputs=(InputImage(InputRole.CONTROL, Image.new("RGB", (64, 64))),), controlnet="map"
    )
    unsteered = control_engine.generate(variation_request(blank, picture, strength=0.8, seed=5))
    assert varied.control_map is not None
    assert max_diff(varied.images[0], unsteered.images[0]) > 10


def test_depth_map_comes_from_the_depth_model(
    control_engine: DiffusersEngine, control_settings: EngineSettings
) -> None:
    result = control_engine.generate(_controlled("depth", _shapes()))
    depth = pixels(result.control_map)
    assert depth.shape == (64, 64, 3)
    # Normalised to the full range, grey (the three channels equal).
    assert depth.min() == 0 and depth.max() == 255
    assert (depth[..., 0] == depth[..., 1]).all()
    # The same model, called directly, gives the same map: nothing else made it.
    pre = Preprocessors("cpu", control_settings.cache_dir, True)
    direct = pre.control_map(_shapes(), control_settings.controlnet("depth"), (64, 64))
    assert max_diff(direct, result.control_map) <= 1


def test_unknown_preprocessor_and_controlnet_are_refused(
    control_engine: DiffusersEngine, tmp_path: Path
) -> None:
    pre = Preprocessors("cpu", tmp_path, True)
    odd = ControlNetSpec("odd", "x", preprocessor="scribble")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^preprocessor: .*'odd'.*'scribble'; accepted: canny"):
        pre.control_map(_shapes(), odd, (64, 64))
    with pytest.raises(ValueError, match=r"^controlnet: unknown ControlNet 'pose'; offered: canny"):
        control_engine.generate(_controlled("pose", _shapes()))


def test_controlnet_needs_exactly_one_control_image() -> None:
    with pytest.raises(ValueError, match=r"^controlnet: 'canny' needs exactly one control image"):
        imagine(controlnet="canny")
    with pytest.raises(ValueError, match=r"^inputs: a control image was given without"):
        imagine(inputs=(InputImage(InputRole.CONTROL, _shapes()),))
    with pytest.raises(ValueError, match=r"^controlnet_weight: must be between 0 and 2"):
        _controlled("canny", _shapes(), weight=2.5)


def test_png_parameters_name_the_controlnet() -> None:
    text = a1111_parameters(_controlled("canny", _shapes(), weight=0.6), 1, "tiny")
    assert parse_a1111_parameters(text)["ControlNet 0"] == "Model: canny, Weight: 0.6"


def test_an_edit_of_a_controlnet_job_runs_without_the_controlnet(
    control_engine: DiffusersEngine,
) -> None:
    from generation.requests import zoom_request

    parent = _controlled("canny", _shapes())
    request = zoom_request(parent, _shapes().resize((64, 64)), factor=1.5, seed=3)
    # The edit's request leaves the ControlNet and its picture behind (the bot says so) …
    assert request.controlnet is None and not request.inputs_for(InputRole.CONTROL)
    zoomed = control_engine.generate(request)
    assert zoomed.control_map is None
    assert zoomed.images[0].size == (64, 64)
    # … and one made some other way still runs without it.
    kept = request.with_changes(controlnet="canny", inputs=parent.inputs)
    assert control_engine.generate(kept).control_map is None


def test_lineart_draws_the_dark_lines_white_on_black() -> None:
    drawing = Image.new("RGB", (128, 128), (235, 235, 235))
    draw = ImageDraw.Draw(drawing)
    draw.line((10, 20, 118, 20), fill=(30, 30, 30), width=2)
    draw.rectangle((60, 60, 120, 120), fill=(90, 90, 90))
    lines = pixels(lineart(drawing))
    assert lines.shape == (128, 128, 3)
    assert (lines[..., 0] == lines[..., 2]).all()
    # The stroke is a bright line; the flat paper and the inside of the flat grey box are black,
    # whatever their shade, and the box's border is a line on its darker side.
    assert lines[20:22, 15:110].min() >= 200
    assert lines[5:12, :].max() == 0 and lines[90, 90].max() == 0
    assert lines[90, 60].max() > 100
    assert pixels(lineart(Image.new("RGB", (64, 64), "grey"))).max() == 0
    # Soft, not Canny's two levels: some pixels are on the way to white.
    assert len(np.unique(lines)) > 3


def test_a_lineart_controlnet_follows_the_line_art_map(
    control_settings: EngineSettings, tiny_cache: Path
) -> None:
    import dataclasses

    canny_spec = control_settings.controlnet("canny")
    settings = dataclasses.replace(
        control_settings,
        controlnets=(
            dataclasses.replace(canny_spec, name="lines", preprocessor=Preprocessor.LINEART),
        ),
    )
    settings.validate()
    engine = create_engine(settings)
    result = engine.generate(_controlled("lines", _shapes()))
    expected = lineart(_shapes().resize((64, 64), Image.Resampling.LANCZOS))
    assert result.control_map is not None
    assert max_diff(result.control_map, expected) == 0


def test_cpu_offload_hooks_the_controlnet_and_sends_it_back_after_each_job(
    control_engine: DiffusersEngine,
    control_settings: EngineSettings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With cpu_offload the ControlNet, loaded beside the model's offloaded modules, gets an
    offload hook of its own: it moves to the device when it runs and is sent back to the CPU
    when each pipeline call ends (no pipeline call does that), painting exactly what it paints
    without offloading. No GPU here, so the CPU stands in as the device offloading moves modules
    to (as in test_outpaint)."""
    from accelerate.hooks import UserCpuOffloadHook  # type: ignore[import-untyped]

    offloaded_modules: list[object] = []
    offload = UserCpuOffloadHook.offload

    def observed(hook: UserCpuOffloadHook) -> None:
        offloaded_modules.append(hook.model)
        offload(hook)

    monkeypatch.setattr(UserCpuOffloadHook, "offload", observed)
    engine = create_engine(control_settings)
    engine.cpu_offload = True
    request = _controlled("canny", _shapes())
    offloaded = engine.generate(request)
    (controlnet,) = engine._controlnets._models.values()
    hook = controlnet._hf_hook
    assert str(hook.execution_device) == "cpu"
    # Shared by every model that uses it, so not chained after one model's text encoder.
    assert hook.prev_module_hook is None
    assert [m for m in offloaded_modules if m is controlnet] == [controlnet]
    varied = variation_request(request, _shapes().resize((64, 64)), strength=0.8, seed=5)
    engine.generate(varied)
    assert engine._loaded["tiny"].controlnet_pipes[("canny", True)].controlnet is controlnet
    assert [m for m in offloaded_modules if m is controlnet] == [controlnet] * 2
    plain = control_engine.generate(request)
    assert_same_picture(offloaded.images[0], plain.images[0])
