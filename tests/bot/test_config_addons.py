"""[[generation.loras]], [[generation.controlnets]] and single-file checkpoints in config.toml:
what reaches the engine settings, and every mistake a ConfigError naming the key."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Any

import pytest

from bot.config import ConfigError, load_config, parse_config
from generation.settings import Preprocessor

REPO = Path(__file__).resolve().parents[2]
TINY = {"name": "tiny", "source": "tiny", "base_resolution": 128}
TINY_XL = {"name": "tiny-xl", "source": "tiny-sdxl", "base_resolution": 128, "family": "sdxl"}


def safetensors(path: Path, tensor: str = "unet.to_q.lora_A.weight") -> Path:
    """A small but well-formed safetensors file (one 2x2 float32 tensor)."""
    entry = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}
    header = json.dumps({tensor: entry}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(16))
    return path


def generation(**keys: Any) -> dict[str, Any]:
    return {"generation": {"models": [TINY, TINY_XL], **keys}}


def test_loras_and_controlnets_reach_the_engine_settings(tmp_path: Path):
    ink = safetensors(tmp_path / "ink.safetensors")
    config = tmp_path / "config.toml"
    config.write_text(
        """
[generation]
[[generation.models]]
name = "tiny"
source = "tiny"
base_resolution = 128
description = "random weights"

[[generation.loras]]
name = "ink"
source = "ink.safetensors"            # next to this file
family = "sd"
default_weight = 0.8
trigger_words = ["ink drawing", "  hatching "]
description = "Black   ink line art"

[[generation.loras]]
name = "hub-style"
source = "someone/some-lora"

[[generation.controlnets]]
name = "canny"
source = "lllyasviel/sd-controlnet-canny"
preprocessor = "canny"
description = "Follows the edges of your picture"

[[generation.controlnets]]
name = "depth"
source = "lllyasviel/sd-controlnet-depth"
preprocessor = "depth"
preprocessor_model = "Intel/dpt-hybrid-midas"
"""
    )
    engine = load_config(config).engine
    assert engine.model("tiny").description == "random weights"
    first, second = engine.loras
    assert (first.name, first.source, first.family) == ("ink", str(ink), "sd")
    assert first.default_weight == 0.8
    assert first.trigger_words == ("ink drawing", "hatching")
    assert first.description == "Black ink line art"
    # A hub id stays as written; defaults fill the rest.
    assert (second.source, second.family, second.default_weight) == ("someone/some-lora", "sd", 1)
    canny, depth = engine.controlnets
    assert (canny.preprocessor, canny.family) == (Preprocessor.CANNY, "sd")
    assert canny.description == "Follows the edges of your picture"
    assert (depth.preprocessor, depth.preprocessor_model) == (
        Preprocessor.DEPTH,
        "Intel/dpt-hybrid-midas",
    )


def test_shipped_config_offers_no_add_ons_but_documents_them():
    engine = load_config(REPO / "config.toml").engine
    assert engine.loras == () and engine.controlnets == ()
    text = (REPO / "config.toml").read_text()
    for example in (
        "# [[generation.loras]]",
        "# [[generation.controlnets]]",
        "allow_pickle = true",
    ):
        assert example in text


@pytest.mark.parametrize(
    ("keys", "key", "reason"),
    [
        ({"loras": [{"source": "a/b"}]}, "generation.loras[0].name", "required"),
        ({"loras": [{"name": "ink"}]}, "generation.loras[0].source", "required"),
        (
            {"loras": [{"name": "my ink", "source": "a/b"}]},
            "generation.loras[0].name",
            "no spaces, commas or colons",
        ),
        ({"loras": [{"name": "ink:2", "source": "a/b"}]}, "generation.loras[0].name", "colons"),
        (
            {"loras": [{"name": "ink", "source": "a/b"}, {"name": "INK", "source": "c/d"}]},
            "generation.loras[1].name",
            "given twice",
        ),
        (
            {"loras": [{"name": "ink", "source": "a/b", "default_weight": 2.5}]},
            "generation.loras[0].default_weight",
            "between 0 and 2",
        ),
        (
            {"loras": [{"name": "ink", "source": "a/b", "family": "sd3"}]},
            "generation.loras[0].family",
            "one of sd, sdxl",
        ),
        (
            {"loras": [{"name": "ink", "source": "a/b", "trigger_words": "ink"}]},
            "generation.loras[0].trigger_words",
            "must be list",
        ),
        (
            {"loras": [{"name": "ink", "source": "a/b", "trigger_words": [""]}]},
            "generation.loras[0].trigger_words",
            "non-empty strings",
        ),
        (
            {"loras": [{"name": "ink", "source": "a/b", "weight": 1}]},
            "generation.loras[0].weight",
            "unknown setting",
        ),
        (
            {"loras": [{"name": "ink", "source": "a/b", "description": "x" * 201}]},
            "generation.loras[0].description",
            "at most 200",
        ),
        ({"loras": {"name": "ink"}}, "generation.loras", "must be list"),
        (
            {"controlnets": [{"name": "canny", "source": "a/b"}]},
            "generation.controlnets[0].preprocessor",
            "required",
        ),
        (
            {"controlnets": [{"name": "canny", "source": "a/b", "preprocessor": "scribble"}]},
            "generation.controlnets[0].preprocessor",
            "one of canny, depth, lineart, none",
        ),
        (
            {
                "controlnets": [
                    {
                        "name": "canny",
                        "source": "a/b",
                        "preprocessor": "canny",
                        "preprocessor_model": "Intel/dpt-large",
                    }
                ]
            },
            "generation.controlnets[0].preprocessor_model",
            "only a depth preprocessor",
        ),
    ],
)
def test_bad_add_on_tables_name_the_key(keys: dict[str, Any], key: str, reason: str):
    with pytest.raises(ConfigError, match="^" + re.escape(key) + ":") as caught:
        parse_config(generation(**keys))
    assert reason in str(caught.value)


def test_an_add_on_for_a_family_no_model_has_is_reported_at_load():
    only_sd = {"generation": {"models": [TINY]}}
    only_sd["generation"]["loras"] = [{"name": "film", "source": "a/b", "family": "sdxl"}]
    with pytest.raises(ConfigError) as caught:
        parse_config(only_sd)
    message = str(caught.value)
    assert message.startswith("generation.loras.family: 'film' is for sdxl models")
    assert "tiny (sd)" in message

    only_sd["generation"]["loras"] = []
    only_sd["generation"]["controlnets"] = [
        {"name": "xl-canny", "source": "a/b", "family": "sdxl", "preprocessor": "canny"}
    ]
    with pytest.raises(ConfigError, match=r"^generation\.controlnets\.family: 'xl-canny'"):
        parse_config(only_sd)


def test_missing_and_broken_lora_files_name_the_file(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"generation\.loras\.source: 'ink': .*gone\.safetensors"):
        parse_config(
            generation(loras=[{"name": "ink", "source": str(tmp_path / "gone.safetensors")}])
        )
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"<html>404</html>")
    with pytest.raises(ConfigError, match=r"broken\.safetensors is not a usable safetensors"):
        parse_config(generation(loras=[{"name": "ink", "source": str(broken)}]))
    pickled = tmp_path / "ink.ckpt"
    pickled.write_bytes(b"x")
    with pytest.raises(ConfigError, match=r"pickled file .*convert it to \.safetensors"):
        parse_config(generation(loras=[{"name": "ink", "source": str(pickled)}]))


def test_single_file_checkpoints_need_a_local_config_and_pickles_need_consent(tmp_path: Path):
    folder = tmp_path / "sd15-config"
    folder.mkdir()
    (folder / "model_index.json").write_text("{}")
    checkpoint = safetensors(tmp_path / "dreambooth.safetensors", "model.diffusion_model.w")
    model = {"name": "mine", "source": str(checkpoint)}
    real_clip = {"clip_model": "openai/clip-vit-large-patch14"}

    with pytest.raises(ConfigError, match=r"^generation\.models\.config: model 'mine'"):
        parse_config({"generation": {"models": [model], **real_clip}})
    engine = parse_config(
        {"generation": {"models": [{**model, "config": str(folder)}], **real_clip}}
    ).engine
    assert engine.model("mine").single_file and engine.model("mine").config == str(folder)

    ckpt = tmp_path / "old.ckpt"
    ckpt.write_bytes(b"pickle")
    pickled = {"name": "old", "source": str(ckpt), "config": str(folder)}
    with pytest.raises(ConfigError) as caught:
        parse_config({"generation": {"models": [pickled], **real_clip}})
    assert "old.ckpt" in str(caught.value) and "allow_pickle = true" in str(caught.value)
    allowed = parse_config(
        {"generation": {"models": [{**pickled, "allow_pickle": True}], **real_clip}}
    ).engine
    assert allowed.model("old").allow_pickle

    with pytest.raises(ConfigError, match=r"^generation\.models\[0\]\.allow_pickle: must be bool"):
        parse_config({"generation": {"models": [{**pickled, "allow_pickle": "yes"}]}})


def test_a_controlnet_job_costs_a_configured_percentage_more():
    assert parse_config({}).credits.cost_controlnet_percent == 50
    config = parse_config({"credits": {"cost_controlnet_percent": 0}})
    assert config.credits.cost_controlnet_percent == 0
    with pytest.raises(ConfigError, match=r"^credits\.cost_controlnet_percent: must be >= 0"):
        parse_config({"credits": {"cost_controlnet_percent": -10}})
    shipped = load_config(REPO / "config.toml")
    assert shipped.credits.cost_controlnet_percent == 50


def test_relative_weight_files_are_relative_to_the_config_file(tmp_path: Path):
    (tmp_path / "loras").mkdir()
    safetensors(tmp_path / "loras" / "ink.safetensors")
    config = tmp_path / "config.toml"
    config.write_text(
        '[generation]\n[[generation.models]]\nname = "tiny"\nsource = "tiny"\n'
        '[[generation.loras]]\nname = "ink"\nsource = "./loras/ink.safetensors"\n'
    )
    assert load_config(config).engine.loras[0].source == str(tmp_path / "loras/ink.safetensors")
