"""LoRAs beyond `max_loaded_loras` per model are unloaded, least recently used first (each one
holds its weights in GPU memory), and loaded again, unchanged, by a job that asks for it."""

from __future__ import annotations

from pathlib import Path

import pytest

from generation.contract import LoraWeight
from generation.engine import DiffusersEngine, create_engine
from generation.settings import EngineSettings, LoraSpec, ModelSpec
from generation.tiny import TINY_SD_DIR, build_tiny_lora
from tests.generation.helpers import imagine, max_diff, tiny_settings

NAMES = ("ink", "paper", "glow")


@pytest.fixture(scope="module")
def settings(tiny_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> EngineSettings:
    folder = tmp_path_factory.mktemp("loras")
    loras = tuple(
        LoraSpec(
            name,
            str(build_tiny_lora(folder / f"{name}.safetensors", tiny_cache / TINY_SD_DIR, seed=i)),
        )
        for i, name in enumerate(NAMES, start=1)
    )
    return tiny_settings(
        tiny_cache, ModelSpec("tiny", "tiny", base_resolution=128), loras=loras, max_loaded_loras=2
    )


def render(engine: DiffusersEngine, *names: str):
    loras = tuple(LoraWeight(name, 1.0) for name in names)
    return engine.generate(imagine(num_candidates=1, num_kept=1, seed=5, loras=loras)).images[0]


def adapters_in_memory(engine: DiffusersEngine) -> set[str]:
    """The LoRAs whose weights are in the model's UNet, by configured name."""
    unet = engine.pipelines("tiny")[0].unet
    present = set(getattr(unet, "peft_config", {}))
    return {name for name in NAMES if any(a.endswith(f"_{name}") for a in present)}


def test_the_least_recently_used_lora_is_unloaded_past_the_limit(
    settings: EngineSettings,
) -> None:
    engine = create_engine(settings)
    first_ink = render(engine, "ink")
    render(engine, "paper")
    render(engine, "ink")  # ink is now more recent than paper
    assert adapters_in_memory(engine) == {"ink", "paper"}
    render(engine, "glow")
    loras = engine._loaded["tiny"].loras
    assert loras is not None and loras.loaded == ("ink", "glow")
    assert adapters_in_memory(engine) == {"ink", "glow"}
    # A job asking for the unloaded one gets it back, unchanged; the least recent goes.
    render(engine, "paper")
    assert adapters_in_memory(engine) == {"glow", "paper"}
    again = render(engine, "ink")
    assert max_diff(first_ink, again) <= 1
    assert adapters_in_memory(engine) == {"paper", "ink"}


def test_a_job_with_more_loras_than_the_limit_keeps_them_all_for_itself(
    settings: EngineSettings,
) -> None:
    engine = create_engine(settings)
    all_three = render(engine, *NAMES)
    assert adapters_in_memory(engine) == set(NAMES)
    # Loaded one at a time, then composed, the same picture: nothing was dropped mid-job.
    fresh = create_engine(settings)
    assert max_diff(all_three, render(fresh, *NAMES)) <= 1
    render(engine, "ink")
    assert len(adapters_in_memory(engine)) == 2 and "ink" in adapters_in_memory(engine)


def test_the_limit_must_be_at_least_one(settings: EngineSettings) -> None:
    import dataclasses

    with pytest.raises(ValueError, match=r"^max_loaded_loras: must be at least 1"):
        create_engine(dataclasses.replace(settings, max_loaded_loras=0))
