"""Loading real-weight layouts on the tiny models: fp16 variants, a separate VAE, per-model
dtype, unloading, and settings that would start but give wrong results."""

from __future__ import annotations

import gc
import logging
import weakref
from pathlib import Path

import pytest
import torch

from generation.engine import DiffusersEngine, create_engine
from generation.settings import REAL_CLIP_MODEL, EngineSettings, ModelSpec
from generation.tiny import TINY_CLIP_DIR, TINY_SD_DIR
from tests.generation.helpers import imagine, pixels

# The bias every fp16-variant file carries, so a test can tell which weights were loaded.
VARIANT_MARK = 0.5


def _settings(cache: Path, *models: ModelSpec, **changes: object) -> EngineSettings:
    values: dict[str, object] = {
        "models": models,
        "default_model": models[0].name,
        # Folders count as real models, which need a real CLIP: the tiny one saved in a folder.
        "clip_model": str(cache / TINY_CLIP_DIR),
        "cache_dir": cache,
        "device": "cpu",
        "local_files_only": True,
    }
    values.update(changes)
    return EngineSettings(**values)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def folders(tiny_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny SD model saved three ways (fp16 variant only, both, none) and a separate VAE."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline

    root = tmp_path_factory.mktemp("layouts")
    pipe = StableDiffusionPipeline.from_pretrained(tiny_cache / TINY_SD_DIR)
    pipe.save_pretrained(root / "plain")
    with torch.no_grad():
        pipe.unet.conv_in.bias.fill_(VARIANT_MARK)
    pipe.save_pretrained(root / "plain", variant="fp16")
    pipe.save_pretrained(root / "fp16-only", variant="fp16")
    torch.manual_seed(99)
    # A VAE made for float16 (as sdxl-vae-fp16-fix is): no float32 upcast needed.
    vae = AutoencoderKL.from_config({**dict(pipe.vae.config), "force_upcast": False})
    vae.save_pretrained(root / "vae")
    return {
        "both": root / "plain",
        "fp16-only": root / "fp16-only",
        "none": tiny_cache / TINY_SD_DIR,
        "vae": root / "vae",
    }


def _conv_in_bias(engine: DiffusersEngine, model: str) -> torch.Tensor:
    return engine.pipelines(model)[0].unet.conv_in.bias.float()


def test_half_precision_loads_the_fp16_variant(tiny_cache: Path, folders: dict[str, Path]) -> None:
    spec = ModelSpec("sd", str(folders["both"]), base_resolution=128)
    half = create_engine(_settings(tiny_cache, spec, dtype="float16"))
    assert torch.all(_conv_in_bias(half, "sd") == VARIANT_MARK)
    full = create_engine(_settings(tiny_cache, spec, dtype="float32"))
    assert not torch.any(_conv_in_bias(full, "sd") == VARIANT_MARK)


def test_fp16_variant_alone_is_enough_in_half_precision(
    tiny_cache: Path, folders: dict[str, Path]
) -> None:
    spec = ModelSpec("sd", str(folders["fp16-only"]), base_resolution=128)
    engine = create_engine(_settings(tiny_cache, spec, dtype="float16"))
    assert engine.pipelines("sd")[0].unet.dtype == torch.float16


def test_model_without_fp16_variant_loads_its_full_weights_in_half_precision(
    tiny_cache: Path, folders: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    spec = ModelSpec("sd", str(folders["none"]), base_resolution=128)
    engine = create_engine(_settings(tiny_cache, spec, dtype="float16"))
    with caplog.at_level(logging.INFO, logger="generation.loading"):
        text2img, _ = engine.pipelines("sd")
    assert text2img.unet.dtype == torch.float16
    assert "no fp16 variant" in caplog.text


def test_model_takes_its_configured_vae(tiny_cache: Path, folders: dict[str, Path]) -> None:
    from diffusers import AutoencoderKL

    fixed = ModelSpec(
        "xl", "tiny-sdxl", base_resolution=128, family="sdxl", vae=str(folders["vae"])
    )
    engine = create_engine(_settings(tiny_cache, fixed, dtype="float16"))
    vae = engine.pipelines("xl")[0].vae
    wanted = AutoencoderKL.from_pretrained(folders["vae"])
    assert torch.equal(
        vae.decoder.conv_out.weight.float(), wanted.decoder.conv_out.weight.half().float()
    )
    decoded_in: list[torch.dtype] = []
    decode = vae.decode

    def spy(latents: torch.Tensor, *args: object, **kwargs: object) -> object:
        decoded_in.append(vae.dtype)
        return decode(latents, *args, **kwargs)

    vae.decode = spy
    try:
        engine.generate(imagine(model="xl", steps=2, num_candidates=1, num_kept=1))
    finally:
        del vae.decode
    # A VAE without force_upcast decodes in float16, unlike SDXL's stock one.
    assert decoded_in == [torch.float16]


def test_model_takes_its_own_dtype(tiny_cache: Path) -> None:
    bf16 = ModelSpec("xl", "tiny-sdxl", base_resolution=128, family="sdxl", dtype="bfloat16")
    fp32 = ModelSpec("xl32", "tiny-sdxl", base_resolution=128, family="sdxl")
    engine = create_engine(_settings(tiny_cache, bf16, fp32, dtype="float32"))
    request = imagine(model="xl", steps=3, num_candidates=1, num_kept=1)
    image = engine.generate(request).images[0]
    assert engine.pipelines("xl")[0].unet.dtype == torch.bfloat16
    assert engine.pipelines("xl")[0].vae.dtype == torch.bfloat16
    reference = engine.generate(request.with_changes(model="xl32")).images[0]
    assert engine.pipelines("xl32")[0].unet.dtype == torch.float32
    assert abs(pixels(image) - pixels(reference)).mean() < 10


def _alive_when_freeing(
    engine: DiffusersEngine, unet: weakref.ref, monkeypatch: pytest.MonkeyPatch
) -> list[bool]:
    """Whether `unet` still existed each time the engine returned memory to the device."""
    seen: list[bool] = []
    free = engine._free_cuda

    def observed() -> None:
        free()
        seen.append(unet() is not None)

    monkeypatch.setattr(engine, "_free_cuda", observed)
    return seen


def test_unloading_a_model_frees_it(tiny_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = ModelSpec("a", "tiny", base_resolution=128)
    second = ModelSpec("b", "tiny", base_resolution=128)
    engine = create_engine(_settings(tiny_cache, first, second, max_loaded_models=1))
    unet = weakref.ref(engine.pipelines("a")[0].unet)
    # Freeing while the pipeline is still referenced leaves its memory with the process.
    seen = _alive_when_freeing(engine, unet, monkeypatch)
    engine.pipelines("b")
    assert seen == [False]
    survivor = weakref.ref(engine.pipelines("b")[0].unet)
    seen = _alive_when_freeing(engine, survivor, monkeypatch)
    engine.close()
    assert seen == [False]


def test_least_recently_used_model_is_unloaded(tiny_cache: Path) -> None:
    specs = [ModelSpec(name, "tiny", base_resolution=128) for name in "abc"]
    engine = create_engine(_settings(tiny_cache, *specs, max_loaded_models=2))
    refs = {name: weakref.ref(engine.pipelines(name)[0].unet) for name in "ab"}
    engine.pipelines("a")  # "b" is now the least recently used
    assert engine.loaded_models() == ("b", "a")
    engine.pipelines("c")
    gc.collect()
    assert refs["a"]() is not None
    assert refs["b"]() is None
    # What the worker reports to the scheduler for routing jobs to a worker holding the model.
    assert engine.loaded_models() == ("a", "c")


def test_real_model_with_the_tiny_clip_is_refused(tiny_cache: Path) -> None:
    real = ModelSpec("sd15", "stable-diffusion-v1-5/stable-diffusion-v1-5")
    settings = _settings(tiny_cache, real, clip_model="tiny")
    with pytest.raises(ValueError, match=rf"^clip_model: .*'sd15'.*{REAL_CLIP_MODEL}"):
        create_engine(settings)
    # The tiny models rank with the tiny CLIP; a real CLIP may rank any model.
    _settings(tiny_cache, ModelSpec("tiny", "tiny"), clip_model="tiny").validate()
    _settings(tiny_cache, real, clip_model=REAL_CLIP_MODEL).validate()


def test_cpu_offload_is_ignored_without_a_gpu(
    tiny_cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="generation.loading"):
        engine = create_engine(
            _settings(
                tiny_cache, ModelSpec("tiny", "tiny", 128), cpu_offload=True, clip_model="tiny"
            )
        )
    assert "cpu_offload is set but the engine runs on cpu" in caplog.text
    result = engine.generate(imagine(steps=2, num_candidates=1, num_kept=1))
    assert result.images[0].size == (64, 64)


def test_vae_tiling_setting_tiles_every_decode(tiny_cache: Path) -> None:
    engine = create_engine(_settings(tiny_cache, ModelSpec("tiny", "tiny", 128), vae_tiling=True))
    vae = engine.pipelines("tiny")[0].vae
    decode = vae.decode
    tiled: list[bool] = []

    def spy(*args: object, **kwargs: object) -> object:
        tiled.append(vae.use_tiling)
        return decode(*args, **kwargs)

    vae.decode = spy
    try:
        engine.generate(imagine(steps=2, num_candidates=1, num_kept=1))
    finally:
        del vae.decode
    assert tiled == [True]
    assert vae.use_tiling is False  # the shared VAE is put back as it was
