"""SDXL code paths on a tiny SDXL-shaped model: Auto pipelines, pooled weighted prompts."""

from __future__ import annotations

from pathlib import Path

import pytest

from generation.contract import PromptPart
from generation.engine import DiffusersEngine, create_engine
from generation.requests import variation_request
from generation.settings import EngineSettings, ModelSpec
from tests.generation.helpers import imagine, max_diff


@pytest.fixture(scope="module")
def xl_engine(tiny_cache: Path) -> DiffusersEngine:
    settings = EngineSettings(
        models=(ModelSpec("xl", "tiny-sdxl", base_resolution=128, family="sdxl"),),
        default_model="xl",
        cache_dir=tiny_cache,
        device="cpu",
        local_files_only=True,
    )
    return create_engine(settings)


def test_sdxl_folder_loads_as_the_sdxl_pipelines(xl_engine: DiffusersEngine) -> None:
    text2img, img2img = xl_engine.pipelines("xl")
    assert type(text2img).__name__ == "StableDiffusionXLPipeline"
    assert type(img2img).__name__ == "StableDiffusionXLImg2ImgPipeline"
    assert img2img.unet is text2img.unet  # from_pipe shares the modules


def test_sdxl_batch_candidates_equal_their_seeds_alone(xl_engine: DiffusersEngine) -> None:
    batch = xl_engine.generate(imagine(model="xl", num_candidates=3, num_kept=3, seed=50))
    for image, seed in zip(batch.images, batch.seeds, strict=True):
        alone = xl_engine.generate(imagine(model="xl", num_candidates=1, num_kept=1, seed=seed))
        assert max_diff(image, alone.images[0]) <= 2


def test_sdxl_weighted_prompts_use_both_encoders(xl_engine: DiffusersEngine) -> None:
    def run(*parts: PromptPart):
        request = imagine(
            model="xl",
            prompt="a red cat, a blue hat",
            prompt_parts=parts,
            num_candidates=1,
            num_kept=1,
            guidance=15.0,
        )
        return xl_engine.generate(request).images[0]

    plain = run()
    weighted = run(PromptPart("a red cat", 2.0), PromptPart("a blue hat", 1.0))
    doubled = run(PromptPart("a red cat", 4.0), PromptPart("a blue hat", 2.0))
    assert max_diff(plain, weighted) > 10
    assert max_diff(weighted, doubled) <= 1

    parent = imagine(
        model="xl",
        steps=6,
        prompt_parts=(PromptPart("a red cat", 1.0), PromptPart("a blue hat", -0.5)),
    )
    varied = xl_engine.generate(variation_request(parent, plain, strength=0.5, seed=3))
    assert [image.size for image in varied.images] == [(64, 64)] * 2
