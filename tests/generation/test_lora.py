"""LoRAs on the tiny model: random-weight LoRAs built with peft, saved as training scripts save
them and loaded through the engine's real path (load_lora_weights, set_adapters per job)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from generation.contract import LoraWeight, PromptPart
from generation.engine import DiffusersEngine, create_engine
from generation.images import a1111_parameters, parse_a1111_parameters
from generation.lora import apply_trigger_words
from generation.requests import zoom_request
from generation.settings import EngineSettings, LoraSpec, ModelSpec
from generation.tiny import TINY_SD_DIR, build_tiny_lora
from tests.generation.helpers import imagine, max_diff, tiny_settings


@pytest.fixture(scope="module")
def lora_settings(tiny_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> EngineSettings:
    folder = tmp_path_factory.mktemp("loras")
    ink = build_tiny_lora(folder / "ink.safetensors", tiny_cache / TINY_SD_DIR, seed=1)
    paper = build_tiny_lora(folder / "paper.safetensors", tiny_cache / TINY_SD_DIR, seed=2)
    return tiny_settings(
        tiny_cache,
        ModelSpec("tiny", "tiny", base_resolution=128),
        # Edits of this one paint with the tiny 9-channel inpainting UNet.
        ModelSpec("tiny-inpainting", "tiny", base_resolution=128, inpaint_source="tiny-inpaint"),
        loras=(
            LoraSpec("ink", str(ink), trigger_words=("inkstyle",), description="ink wash"),
            LoraSpec("paper", str(paper), default_weight=0.8),
        ),
    )


@pytest.fixture(scope="module")
def lora_engine(lora_settings: EngineSettings) -> DiffusersEngine:
    return create_engine(lora_settings)


def _image(engine: DiffusersEngine, *loras: LoraWeight, **changes: object):
    request = imagine(num_candidates=1, num_kept=1, loras=loras, **changes)
    return engine.generate(request).images[0]


def test_a_lora_changes_the_image_and_never_leaks_into_the_next_job(
    lora_engine: DiffusersEngine,
) -> None:
    base = _image(lora_engine)
    with_ink = _image(lora_engine, LoraWeight("ink", 1.0))
    after = _image(lora_engine)
    assert max_diff(base, with_ink) > 20
    assert max_diff(base, after) <= 1
    # Loaded once and kept with the model, turned off between jobs.
    unet = lora_engine.pipelines("tiny")[0].unet
    assert any("lora_A" in name for name, _ in unet.named_modules())
    assert max_diff(with_ink, _image(lora_engine, LoraWeight("ink", 1.0))) <= 1


def test_weight_zero_is_the_base_model(lora_engine: DiffusersEngine) -> None:
    base = _image(lora_engine, seed=7)
    assert max_diff(base, _image(lora_engine, LoraWeight("ink", 0.0), seed=7)) <= 1
    half = _image(lora_engine, LoraWeight("ink", 0.5), seed=7)
    full = _image(lora_engine, LoraWeight("ink", 1.0), seed=7)
    assert max_diff(base, half) > 5
    assert max_diff(half, full) > 5


def test_two_loras_compose(lora_engine: DiffusersEngine) -> None:
    ink = _image(lora_engine, LoraWeight("ink", 1.0), seed=9)
    paper = _image(lora_engine, LoraWeight("paper", 1.0), seed=9)
    both = _image(lora_engine, LoraWeight("ink", 1.0), LoraWeight("paper", 1.0), seed=9)
    assert max_diff(both, ink) > 10
    assert max_diff(both, paper) > 10
    swapped = _image(lora_engine, LoraWeight("paper", 1.0), LoraWeight("ink", 1.0), seed=9)
    assert max_diff(both, swapped) <= 1
    # The second LoRA of a job does not stay on for a job asking for the first alone.
    assert max_diff(ink, _image(lora_engine, LoraWeight("ink", 1.0), seed=9)) <= 1


def test_unloading_a_lora_restores_the_base_model(lora_settings: EngineSettings) -> None:
    engine = create_engine(lora_settings)
    base = _image(engine, seed=11)
    inked = _image(engine, LoraWeight("ink", 1.0), seed=11)
    engine.unload_lora("tiny", "ink")
    unet = engine.pipelines("tiny")[0].unet
    assert not any("lora_" in name for name, _ in unet.named_parameters())
    assert max_diff(base, _image(engine, seed=11)) <= 1
    # Loaded again from its file by the next job that asks for it.
    assert max_diff(inked, _image(engine, LoraWeight("ink", 1.0), seed=11)) <= 1


def test_candidates_of_a_job_share_its_loras(lora_engine: DiffusersEngine) -> None:
    loras = (LoraWeight("paper", 0.8),)
    batch = lora_engine.generate(imagine(seed=30, num_candidates=3, num_kept=3, loras=loras))
    for image, seed in zip(batch.images, batch.seeds, strict=True):
        alone = _image(lora_engine, *loras, seed=seed)
        assert max_diff(image, alone) <= 2


def test_trigger_words_are_appended_once(lora_engine, lora_settings: EngineSettings) -> None:
    ink = (LoraWeight("ink", 1.0),)
    request = imagine(prompt="a cat", loras=ink)
    assert apply_trigger_words(request, lora_settings).prompt == "a cat, inkstyle"
    again = apply_trigger_words(apply_trigger_words(request, lora_settings), lora_settings)
    assert again.prompt == "a cat, inkstyle"
    off = imagine(prompt="a cat", loras=(LoraWeight("ink", 0.0),))
    assert apply_trigger_words(off, lora_settings).prompt == "a cat"
    parts = imagine(
        prompt="a cat, a hat",
        prompt_parts=(PromptPart("a cat", -0.5), PromptPart("a hat", 2.0)),
        loras=ink,
    )
    assert apply_trigger_words(parts, lora_settings).prompt_parts == (
        PromptPart("a cat", -0.5),
        PromptPart("a hat, inkstyle", 2.0),
    )
    # The engine adds them itself: typing them changes nothing, leaving them out neither.
    plain = _image(lora_engine, *ink, prompt="a cat", seed=3)
    typed = _image(lora_engine, *ink, prompt="a cat, inkstyle", seed=3)
    assert max_diff(plain, typed) <= 1
    without = lora_engine.generate(imagine(prompt="a cat", seed=3, num_candidates=1, num_kept=1))
    assert max_diff(plain, without.images[0]) > 5


def test_png_parameters_list_the_loras_as_a1111_does() -> None:
    request = imagine(prompt="a cat", loras=(LoraWeight("ink", 0.8), LoraWeight("paper", 1.0)))
    text = a1111_parameters(request, 42, "tiny")
    assert text.splitlines()[0] == "a cat <lora:ink:0.8> <lora:paper:1>"
    assert parse_a1111_parameters(text)["Seed"] == "42"


def test_lora_weights_are_checked_by_the_request() -> None:
    with pytest.raises(ValueError, match=r"^loras: weight of 'ink' must be between 0 and 2"):
        imagine(loras=(LoraWeight("ink", 2.5),))
    with pytest.raises(ValueError, match=r"^loras: 'ink' is given twice"):
        imagine(loras=(LoraWeight("ink", 1.0), LoraWeight("ink", 0.5)))


def test_unknown_lora_is_refused_before_any_work(lora_engine: DiffusersEngine) -> None:
    with pytest.raises(ValueError, match=r"^lora: unknown LoRA 'nope'; offered: ink, paper"):
        lora_engine.generate(imagine(loras=(LoraWeight("nope", 1.0),)))


def test_lora_dtype_follows_the_model(lora_engine: DiffusersEngine) -> None:
    # A job with a LoRA first: in random order this may be the module's first test, or follow
    # one that unloaded every adapter, and then the UNet has no LoRA layers to look at.
    lora_engine.generate(imagine(loras=(LoraWeight("ink", 1.0),)))
    unet = lora_engine.pipelines("tiny")[0].unet
    lora_params = [p for name, p in unet.named_parameters() if "lora_" in name]
    assert lora_params and all(p.dtype == torch.float32 for p in lora_params)


def test_an_edit_on_a_dedicated_inpainting_unet_keeps_the_loras(
    lora_engine: DiffusersEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = _image(lora_engine, model="tiny-inpainting", seed=5)

    def zoomed(*loras: LoraWeight):
        parent = imagine(model="tiny-inpainting", num_candidates=1, num_kept=1, loras=loras)
        request = zoom_request(parent, source, factor=2.0, seed=13)
        return lora_engine.generate(request).images[0]

    base = zoomed()
    inked = zoomed(LoraWeight("ink", 1.0))
    assert max_diff(base, inked) > 10
    # The inpainting UNet holds the LoRA too (not only the shared text encoder), switched off
    # again for the next edit, which equals the first.
    inpaint_unet = lora_engine._loaded["tiny-inpainting"].inpaint.unet
    assert inpaint_unet is not lora_engine.pipelines("tiny-inpainting")[0].unet
    assert inpaint_unet.config.in_channels == 9
    assert any("lora_A" in name for name, _ in inpaint_unet.named_modules())
    assert max_diff(base, zoomed()) <= 1
    # Its UNet half matters: the same edit with the LoRA left switched off in that UNet (only
    # the shared text encoder's half on) differs from the full LoRA edit.
    loras = lora_engine._loaded["tiny-inpainting"].loras
    assert loras is not None
    with monkeypatch.context() as patch:
        patch.setattr(loras, "_unets", [])
        patch.setattr(loras, "add_unet", lambda unet: None)
        text_only = zoomed(LoraWeight("ink", 1.0))
    assert max_diff(text_only, inked) > 5
    assert max_diff(inked, zoomed(LoraWeight("ink", 1.0))) <= 1
