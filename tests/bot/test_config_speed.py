"""The [generation] speed options (compile_unet, compile_vae, compile_mode, fuse_qkv_projections,
vae_batched_decode): off by default and in the shipped config, read when set, a bad mode named;
and the sample config's SDXL model with the fp16-fix VAE is a real, loadable entry."""

import tomllib
from pathlib import Path

import pytest

from bot.config import ConfigError, load_config, parse_config
from generation.settings import REAL_CLIP_MODEL, CompileMode

REPO = Path(__file__).resolve().parents[2]
SPEED_KEYS = ("compile_unet", "compile_vae", "fuse_qkv_projections", "vae_batched_decode")


def test_speed_options_are_off_by_default_and_in_the_shipped_config() -> None:
    for engine in (parse_config({}).engine, load_config(REPO / "config.toml").engine):
        assert [getattr(engine, key) for key in SPEED_KEYS] == [False] * 4
        assert engine.compile_mode is CompileMode.DEFAULT
        assert engine.compile_backend == "inductor"
    shipped = tomllib.loads((REPO / "config.toml").read_text(encoding="utf-8"))["generation"]
    # Listed, so an owner finds them where the other [generation] keys are.
    assert all(shipped[key] is False for key in SPEED_KEYS)
    assert shipped["compile_mode"] == "default"


def test_speed_options_reach_the_engine_settings() -> None:
    table: dict[str, object] = dict.fromkeys(SPEED_KEYS, True)
    table["compile_mode"] = "max-autotune"
    engine = parse_config({"generation": table}).engine
    assert [getattr(engine, key) for key in SPEED_KEYS] == [True] * 4
    assert engine.compile_mode is CompileMode.MAX_AUTOTUNE


def test_an_unknown_compile_mode_is_refused_by_name() -> None:
    with pytest.raises(ConfigError, match=r"generation\.compile_mode: must be one of default"):
        parse_config({"generation": {"compile_mode": "fastest"}})
    with pytest.raises(ConfigError, match=r"generation\.compile_unet"):
        parse_config({"generation": {"compile_unet": "yes"}})


def _commented_sdxl_model(text: str) -> str:
    """The sample config's commented-out SDXL model table, uncommented."""
    lines = text.splitlines()
    start = next(
        i
        for i, line in enumerate(lines)
        if line.strip() == "#   [[generation.models]]" and 'name = "sdxl"' in lines[i + 1]
    )
    block = []
    for line in lines[start:]:
        if not line.startswith("#   "):
            break
        block.append(line.removeprefix("#   "))
    return "\n".join(block)


def test_the_sample_sdxl_model_with_the_fp16_fix_vae_loads() -> None:
    text = (REPO / "config.toml").read_text(encoding="utf-8")
    table = tomllib.loads(_commented_sdxl_model(text))
    engine = parse_config(
        {"generation": {"models": table["generation"]["models"], "clip_model": REAL_CLIP_MODEL}}
    ).engine
    sdxl = engine.model("sdxl")
    assert (sdxl.family, sdxl.base_resolution) == ("sdxl", 1024)
    assert sdxl.vae == "madebyollin/sdxl-vae-fp16-fix"
