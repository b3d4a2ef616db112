"""The engine's features in half precision as on a GPU, run on the CPU with tiny models: edits
(the model's own UNet and a dedicated inpainting UNet), live previews through a tiny VAE
decoder, pictures through the image adapter or img2img, /describe with a captioner, LoRAs,
ControlNets (a depth preprocessor too) and single-file checkpoints, in SD and SDXL shapes.

Every float16 image is checked against the float32 one of the same request, so a component
left in another dtype fails whether it raises or silently decodes to noise. Unloading a model
(max_loaded_models, close) must release what these features load beside it."""

from __future__ import annotations

import io
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from generation import outpaint
from generation.contract import (
    GenerationRequest,
    GenerationResult,
    InputImage,
    InputRole,
    LoraWeight,
    Progress,
)
from generation.engine import DiffusersEngine, create_engine
from generation.requests import describe_request, variation_request, zoom_request
from generation.settings import (
    ControlNetSpec,
    EngineSettings,
    LoraSpec,
    ModelSpec,
    Preprocessor,
)
from generation.tiny import (
    TINY_SD_DIR,
    TINY_SDXL_DIR,
    build_tiny_controlnet,
    build_tiny_depth,
    build_tiny_lora,
    build_tiny_sdxl,
    ensure_tiny_sdxl,
    ensure_tiny_taesd,
)
from tests.generation.helpers import assert_same_picture, imagine, pixels

HALF = torch.float16
# float16 rounding moves a pixel by a level or two; a broken component moves it by tens.
MEAN_DIFF_LIMIT = 10.0
RED = Image.new("RGB", (80, 64), (220, 30, 30))
BLUE = Image.new("RGB", (64, 64), (20, 40, 220))


def _shapes() -> Image.Image:
    image = Image.new("RGB", (96, 96), "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle((10, 10, 50, 60), fill="black")
    draw.ellipse((45, 40, 90, 85), fill=(200, 30, 30))
    return image


def _source() -> Image.Image:
    x = np.linspace(0, 255, 64)[None, :].repeat(64, 0)
    y = np.linspace(0, 255, 64)[:, None].repeat(64, 1)
    return Image.fromarray(np.stack([x, y, 255 - x], axis=2).astype(np.uint8))


@pytest.fixture(scope="module")
def addons(tiny_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    ensure_tiny_sdxl(tiny_cache)
    root = tmp_path_factory.mktemp("half-features")
    sd, xl = tiny_cache / TINY_SD_DIR, tiny_cache / TINY_SDXL_DIR
    paths = {
        "lora-sd": build_tiny_lora(root / "ink.safetensors", sd),
        "lora-xl": build_tiny_lora(root / "ink-xl.safetensors", xl),
        "cn-sd": build_tiny_controlnet(root / "cn-sd", sd),
        "cn-xl": build_tiny_controlnet(root / "cn-xl", xl),
        "depth": build_tiny_depth(root / "dpt"),
        "taesd": ensure_tiny_taesd(tiny_cache),
    }
    return {name: str(path) for name, path in paths.items()}


def _settings(cache: Path, addons: dict[str, str], dtype: str, **changes: Any) -> EngineSettings:
    values: dict[str, Any] = {
        "models": (
            ModelSpec("sd", "tiny", 128, preview_decoder=addons["taesd"]),
            ModelSpec("sd-inpaint", "tiny", 128, inpaint_source="tiny-inpaint"),
            ModelSpec("xl", "tiny-sdxl", 128, family="sdxl", preview_decoder=addons["taesd"]),
        ),
        "default_model": "sd",
        "loras": (
            LoraSpec("ink", addons["lora-sd"]),
            LoraSpec("ink-xl", addons["lora-xl"], family="sdxl"),
        ),
        "controlnets": (
            ControlNetSpec("canny", addons["cn-sd"]),
            ControlNetSpec(
                "depth",
                addons["cn-sd"],
                preprocessor=Preprocessor.DEPTH,
                preprocessor_model=addons["depth"],
            ),
            ControlNetSpec("canny-xl", addons["cn-xl"], family="sdxl"),
        ),
        "caption_model": "tiny",
        "cache_dir": cache,
        "device": "cpu",
        "dtype": dtype,
        "local_files_only": True,
        "preview_interval_s": 0.0,
        "max_loaded_models": 3,
        **changes,
    }
    return EngineSettings(**values)


@pytest.fixture(scope="module")
def half(tiny_cache: Path, addons: dict[str, str]) -> DiffusersEngine:
    return create_engine(_settings(tiny_cache, addons, "float16"))


@pytest.fixture(scope="module")
def full(tiny_cache: Path, addons: dict[str, str]) -> DiffusersEngine:
    return create_engine(_settings(tiny_cache, addons, "float32"))


def _one(**changes: Any) -> GenerationRequest:
    return imagine(**{"steps": 2, "num_candidates": 1, "num_kept": 1, **changes})


def _close(half: GenerationResult, full: GenerationResult, where: np.ndarray | None = None) -> None:
    """Seed by seed (the precisions may rank candidates differently), over `where` if given."""
    assert sorted(half.seeds) == sorted(full.seeds)
    by_seed = dict(zip(full.seeds, full.images, strict=True))
    for seed, image in zip(half.seeds, half.images, strict=True):
        a, b = pixels(image), pixels(by_seed[seed])
        if where is not None:
            a, b = a[where], b[where]
        assert a.std() > 5, "float16 image is blank"
        assert np.abs(a - b).mean() < MEAN_DIFF_LIMIT


def _dtypes(module: Any) -> set[torch.dtype]:
    return {p.dtype for p in module.parameters()}


# ----------------------------------------------------------------------------- edits


@pytest.mark.parametrize("model", ["sd-inpaint", "xl"])
def test_zoom_out_in_float16(half: DiffusersEngine, full: DiffusersEngine, model: str) -> None:
    request = zoom_request(_one(model=model, seed=7), _source(), factor=2.0, seed=3)
    result = half.generate(request)
    painted = np.asarray(outpaint.prepare(request).mask) > 0
    _close(result, full.generate(request), where=painted)
    pipe = half._loaded[model].inpaint
    assert _dtypes(pipe.unet) == {HALF}
    assert pipe.vae.dtype == HALF
    assert pipe.unet.config.in_channels == (9 if model == "sd-inpaint" else 4)


# ----------------------------------------------------------------------------- previews


@pytest.mark.parametrize("model", ["xl"])
def test_previews_through_the_tiny_decoder_in_float16(
    half: DiffusersEngine, full: DiffusersEngine, model: str
) -> None:
    def previews(engine: DiffusersEngine) -> list[np.ndarray]:
        updates: list[Progress] = []
        engine.generate(_one(model=model, steps=3, preview=True), progress=updates.append)
        pngs = [u.preview_png for u in updates if u.preview_png is not None]
        return [np.asarray(Image.open(io.BytesIO(png)), dtype=np.int16) for png in pngs]

    got, expected = previews(half), previews(full)
    assert len(got) == len(expected) == 2
    # Decoded at full size by the tiny decoder (the linear map makes 16x16 cells).
    assert got[0].shape[:2] == (64, 64)
    for a, b in zip(got, expected, strict=True):
        assert np.abs(a - b).mean() < MEAN_DIFF_LIMIT
    assert _dtypes(half._loaded[model].preview_decoder) == {HALF}


# ----------------------------------------------------------------------------- pictures


def _picture(image: Image.Image, weight: float = 1.0, role: InputRole = InputRole.IMAGE_PROMPT):
    return InputImage(role, image, weight=weight, source="attachment:p.png", sha256="ab" * 32)


@pytest.mark.parametrize(
    ("model", "inputs"),
    [
        ("sd", (_picture(RED, 2.0), _picture(BLUE, 100.0, InputRole.OBJECT))),
        ("xl", (_picture(RED, 100.0, InputRole.STYLE),)),
    ],
    ids=["sd-image-prompt-oref", "xl-sref"],
)
def test_pictures_steer_through_the_adapter_in_float16(
    half: DiffusersEngine, full: DiffusersEngine, model: str, inputs: tuple[InputImage, ...]
) -> None:
    request = _one(model=model, inputs=inputs, guidance=7.0)
    result = half.generate(request)
    _close(result, full.generate(request))
    plain = half.generate(request.with_changes(inputs=()))
    assert np.abs(pixels(result.images[0]) - pixels(plain.images[0])).max() > 2
    adapter = half._loaded[model].image_adapter
    assert _dtypes(adapter.encoder) == {HALF}
    assert _dtypes(adapter._projection) == {HALF}


def test_a_blend_without_words_in_float16(half: DiffusersEngine, full: DiffusersEngine) -> None:
    # Ranked against the pictures: CLIP's image tower in float16 too.
    request = _one(model="sd", prompt="", inputs=(_picture(RED), _picture(BLUE)))
    _close(half.generate(request), full.generate(request))


def test_a_variation_keeps_its_pictures_in_float16(
    half: DiffusersEngine, full: DiffusersEngine
) -> None:
    parent = _one(model="xl", inputs=(_picture(RED, 2.0),), num_candidates=2, num_kept=2)
    request = variation_request(parent, _source(), strength=0.75, seed=5)
    _close(half.generate(request), full.generate(request))


@pytest.fixture(scope="module")
def no_adapter(tiny_cache: Path, addons: dict[str, str]) -> tuple[DiffusersEngine, DiffusersEngine]:
    return (
        create_engine(_settings(tiny_cache, addons, "float16", ip_adapters=())),
        create_engine(_settings(tiny_cache, addons, "float32", ip_adapters=())),
    )


def test_image_prompts_by_img2img_in_float16(
    no_adapter: tuple[DiffusersEngine, DiffusersEngine],
) -> None:
    half, full = no_adapter
    request = _one(model="xl", steps=4, inputs=(_picture(RED), _picture(BLUE, 2.0)))
    _close(half.generate(request), full.generate(request))


# ----------------------------------------------------------------------------- describe


def test_describe_with_a_caption_in_float16(half: DiffusersEngine, full: DiffusersEngine) -> None:
    request = describe_request(_picture(_shapes()), seed=3, model="sd")
    texts = half.generate(request).texts
    assert len(texts) == 4
    assert half._caption_model is not None
    assert _dtypes(half._caption_model.model) == {HALF}
    assert half.ranker().model.dtype == HALF
    # The random tiny models' greedy caption is the same words in either precision.
    expected = full.generate(request).texts
    assert [t.split(",")[0] for t in texts] == [t.split(",")[0] for t in expected]


# ----------------------------------------------------------------------------- LoRAs


def test_loras_in_float16(half: DiffusersEngine, full: DiffusersEngine) -> None:
    model = "xl"
    request = _one(model=model, loras=(LoraWeight("ink-xl", 1.0),))
    result = half.generate(request)
    _close(result, full.generate(request))
    plain = half.generate(request.with_changes(loras=()))
    assert np.abs(pixels(result.images[0]) - pixels(plain.images[0])).max() > 10
    text2img = half.pipelines(model)[0]
    for name in ("unet", "text_encoder"):
        lora_params = [p for n, p in getattr(text2img, name).named_parameters() if "lora_" in n]
        assert lora_params and {p.dtype for p in lora_params} == {HALF}


def test_a_lora_edit_on_the_inpainting_unet_in_float16(
    half: DiffusersEngine, full: DiffusersEngine
) -> None:
    parent = _one(model="sd-inpaint", seed=7, loras=(LoraWeight("ink", 1.0),))
    request = zoom_request(parent, _source(), factor=2.0, seed=3)
    assert request.loras
    painted = np.asarray(outpaint.prepare(request).mask) > 0
    _close(half.generate(request), full.generate(request), where=painted)
    unet = half._loaded["sd-inpaint"].inpaint.unet
    lora_params = [p for n, p in unet.named_parameters() if "lora_" in n]
    assert lora_params and {p.dtype for p in lora_params} == {HALF}


# ----------------------------------------------------------------------------- ControlNets


def _controlled(model: str, name: str) -> GenerationRequest:
    control = InputImage(InputRole.CONTROL, _shapes(), source="shapes.png")
    return _one(model=model, controlnet=name, inputs=(control,))


@pytest.mark.parametrize(
    ("model", "name", "variation"),
    [("sd", "depth", False), ("xl", "canny-xl", False), ("xl", "canny-xl", True)],
    ids=["sd-depth", "xl-canny", "xl-canny-variation"],
)
def test_controlnets_in_float16(
    half: DiffusersEngine, full: DiffusersEngine, model: str, name: str, variation: bool
) -> None:
    request = _controlled(model, name)
    if variation:
        request = variation_request(request, _source(), strength=0.75, seed=5)
        assert request.controlnet == name
    result = half.generate(request)
    _close(result, full.generate(request))
    assert result.control_map is not None
    for pipe in half._loaded[model].controlnet_pipes.values():
        assert _dtypes(pipe.controlnet) == {HALF}
        assert pipe.unet is half.pipelines(model)[0].unet
    if name == "depth":
        depth, _ = next(iter(half._controlnets.preprocessors._depth.values()))
        assert _dtypes(depth) == {HALF}


# ----------------------------------------------------------------------------- single files


@pytest.fixture(scope="module")
def checkpoints(tiny_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    import shutil

    from diffusers import DiffusionPipeline

    from generation.checkpoint_layout import save_single_file

    root = tmp_path_factory.mktemp("half-single-file")
    # SDXL's two text encoders differ in width, as the real ones do (test_single_file.py).
    build_tiny_sdxl(root / "xl", text_encoder_2_width=48)
    paths: dict[str, Path] = {}
    for name, folder in (("sd", tiny_cache / TINY_SD_DIR), ("xl", root / "xl")):
        pipe = DiffusionPipeline.from_pretrained(folder)
        paths[name] = save_single_file(pipe, root / f"{name}.safetensors")
        config = root / f"{name}-config"
        shutil.copytree(folder, config, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
        paths[f"{name}-config"] = config
    return paths


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_single_file_models_in_float16(
    tiny_cache: Path, checkpoints: dict[str, Path], family: str
) -> None:
    key = "xl" if family == "sdxl" else "sd"
    spec = ModelSpec(
        "file", str(checkpoints[key]), 128, family=family, config=str(checkpoints[f"{key}-config"])
    )

    def engine(dtype: str) -> DiffusersEngine:
        return create_engine(
            EngineSettings(
                models=(spec,),
                default_model="file",
                # The tiny CLIP by its folder: by name it is refused beside a non-tiny model.
                clip_model=str(tiny_cache / "tiny-clip"),
                cache_dir=tiny_cache,
                device="cpu",
                dtype=dtype,
                local_files_only=True,
            )
        )

    half, full = engine("float16"), engine("float32")
    request = _one(model="file", steps=3)
    _close(half.generate(request), full.generate(request))
    text2img = half.pipelines("file")[0]
    for name in ("unet", "vae", "text_encoder"):
        assert _dtypes(getattr(text2img, name)) == {HALF}, name


# ----------------------------------------------------------------------------- unloading


@pytest.fixture
def one_model(tiny_cache: Path, addons: dict[str, str]) -> DiffusersEngine:
    """A float16 engine holding one model at a time; "all" uses every feature loaded beside it."""
    every = ModelSpec(
        "all", "tiny", 128, inpaint_source="tiny-inpaint", preview_decoder=addons["taesd"]
    )
    settings = _settings(tiny_cache, addons, "float16", max_loaded_models=1)
    return create_engine(
        EngineSettings(**{**settings.__dict__, "models": (every, *settings.models)})
    )


def _use_every_feature(engine: DiffusersEngine) -> dict[str, weakref.ref]:
    ink = (LoraWeight("ink", 1.0),)
    control = _controlled("all", "canny").with_changes(loras=ink, preview=True)
    engine.generate(control, progress=lambda update: None)
    engine.generate(_one(model="all", inputs=(_picture(RED),)))
    engine.generate(zoom_request(_one(model="all", loras=ink), _source(), factor=2.0, seed=3))
    loaded = engine._loaded["all"]
    assert loaded.controlnet_pipes and loaded.image_adapter and loaded.loras
    assert loaded.preview_decoder not in (None, False)
    return {
        "unet": weakref.ref(loaded.text2img.unet),
        "controlnet pipeline": weakref.ref(next(iter(loaded.controlnet_pipes.values()))),
        "controlnet": weakref.ref(next(iter(loaded.controlnet_pipes.values())).controlnet),
        "image encoder": weakref.ref(loaded.image_adapter.encoder),
        "adapter projection": weakref.ref(loaded.image_adapter._projection),
        "inpaint unet": weakref.ref(loaded.inpaint.unet),
        "loras": weakref.ref(loaded.loras),
        "preview decoder": weakref.ref(loaded.preview_decoder),
    }


def _alive_when_freeing(
    engine: DiffusersEngine, refs: dict[str, weakref.ref], monkeypatch: pytest.MonkeyPatch
) -> list[set[str]]:
    """What of `refs` still existed each time the engine returned memory to the device."""
    seen: list[set[str]] = []
    free = engine._free_cuda

    def observed() -> None:
        free()
        seen.append({name for name, ref in refs.items() if ref() is not None})

    monkeypatch.setattr(engine, "_free_cuda", observed)
    return seen


def test_unloading_a_model_releases_what_its_features_loaded(
    one_model: DiffusersEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    refs = _use_every_feature(one_model)
    seen = _alive_when_freeing(one_model, refs, monkeypatch)
    one_model.pipelines("xl")
    assert seen == [set()]


def test_close_releases_every_model_and_the_describe_models(
    one_model: DiffusersEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    refs = _use_every_feature(one_model)
    one_model.generate(describe_request(_picture(_shapes()), seed=3, model="all"))
    assert one_model._caption_model is not None
    refs["captioner"] = weakref.ref(one_model._caption_model.model)
    refs["ranker"] = weakref.ref(one_model.ranker().model)
    one_model.generate(_controlled("all", "depth"))
    depth, _ = next(iter(one_model._controlnets.preprocessors._depth.values()))
    refs["depth model"] = weakref.ref(depth)
    del depth
    seen = _alive_when_freeing(one_model, refs, monkeypatch)
    one_model.close()
    assert seen == [set()]


def test_the_image_encoder_is_offloaded_with_the_model(
    tiny_cache: Path, addons: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With cpu_offload the model's modules rest on the CPU, and the image encoder loaded into
    it later must still embed on the device: it gets an offload hook of its own. No GPU here,
    so the CPU stands in as the device offloading moves modules to (as in test_outpaint)."""
    from generation.ip_adapter import ImageAdapter

    engine = create_engine(_settings(tiny_cache, addons, "float16"))
    engine.cpu_offload = True
    embed = ImageAdapter.embed
    hooked: list[str] = []

    def observed(adapter: ImageAdapter, *args: Any, **kwargs: Any) -> Any:
        hook = getattr(adapter.encoder, "_hf_hook", None)
        hooked.append(str(getattr(hook, "execution_device", None)))
        return embed(adapter, *args, **kwargs)

    monkeypatch.setattr(ImageAdapter, "embed", observed)
    request = _one(model="xl", inputs=(_picture(RED, 2.0),))
    offloaded = engine.generate(request)
    assert hooked == ["cpu"]
    plain = create_engine(engine.settings).generate(request)
    assert_same_picture(offloaded.images[0], plain.images[0])
