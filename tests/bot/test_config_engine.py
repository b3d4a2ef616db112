"""The [generation] keys for real weights on a GPU: VRAM options, per-model VAE and dtype, and
the CLIP a real model must be ranked with."""

import re
from pathlib import Path

import pytest

from bot.config import ConfigError, load_config, parse_config
from generation.settings import REAL_CLIP_MODEL

REPO = Path(__file__).resolve().parents[2]
SD15 = {"name": "sd15", "source": "stable-diffusion-v1-5/stable-diffusion-v1-5"}


def test_small_card_options_and_per_model_vae_reach_the_engine_settings():
    xl = {
        "name": "xl",
        "source": "stabilityai/stable-diffusion-xl-base-1.0",
        "family": "sdxl",
        "base_resolution": 1024,
        "vae": "madebyollin/sdxl-vae-fp16-fix",
        "dtype": "bfloat16",
    }
    engine = parse_config(
        {
            "generation": {
                "models": [SD15, xl],
                "clip_model": REAL_CLIP_MODEL,
                "cpu_offload": True,
                "vae_tiling": True,
                "max_loaded_models": 1,
            }
        }
    ).engine
    assert (engine.cpu_offload, engine.vae_tiling, engine.max_loaded_models) == (True, True, 1)
    assert engine.model("xl").vae == "madebyollin/sdxl-vae-fp16-fix"
    assert engine.model("xl").dtype == "bfloat16"
    assert (engine.model("sd15").vae, engine.model("sd15").dtype) == ("", "")


def test_shipped_config_documents_the_defaults():
    engine = load_config(REPO / "config.toml").engine
    assert (engine.cpu_offload, engine.vae_tiling, engine.max_loaded_models) == (False, False, 2)


def test_edit_strength_and_inpainting_checkpoints_reach_the_engine_settings():
    inpainting = {**SD15, "inpaint_source": "stable-diffusion-v1-5/stable-diffusion-inpainting"}
    engine = parse_config(
        {
            "generation": {
                "models": [inpainting],
                "clip_model": REAL_CLIP_MODEL,
                "edit_strength": 0.9,
            }
        }
    ).engine
    assert engine.edit_strength == 0.9
    assert engine.model("sd15").inpaint_source == inpainting["inpaint_source"]
    assert load_config(REPO / "config.toml").engine.edit_strength == 0.8
    assert load_config(REPO / "config.toml").engine.max_loaded_loras == 4
    assert parse_config({"generation": {"max_loaded_loras": 1}}).engine.max_loaded_loras == 1
    with pytest.raises(ConfigError, match=r"^generation\.max_loaded_loras:"):
        parse_config({"generation": {"max_loaded_loras": 0}})
    for bad in (0.0, 1.5):
        with pytest.raises(ConfigError, match=r"^generation\.edit_strength: must be in \(0, 1\]"):
            parse_config({"generation": {"edit_strength": bad}})


def test_real_model_with_the_tiny_clip_is_a_config_error():
    with pytest.raises(ConfigError, match=rf"^generation\.clip_model: .*{REAL_CLIP_MODEL}"):
        parse_config({"generation": {"models": [SD15]}})


@pytest.mark.parametrize(
    ("generation", "key"),
    [
        ({"max_loaded_models": 0}, "generation.max_loaded_models"),
        ({"cpu_offload": "yes"}, "generation.cpu_offload"),
        (
            {"models": [{**SD15, "dtype": "half"}], "clip_model": "x/y"},
            "generation.models[0].dtype",
        ),
        ({"models": [{**SD15, "vae": 1}], "clip_model": "x/y"}, "generation.models[0].vae"),
    ],
)
def test_bad_values_name_the_key(generation, key):
    with pytest.raises(ConfigError, match="^" + re.escape(key) + ":"):
        parse_config({"generation": generation})
