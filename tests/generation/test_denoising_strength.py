"""The PNG metadata's "Denoising strength" is the strength the job ran at, not the request's.

An edit's request always says 1.0 (contract.py), but on a model's own 4-channel UNet the engine
starts from the pre-fill noised to `edit_strength` (0.8 by default): the metadata said 1 there,
so a member reproducing the image elsewhere got another one. The worker writes the PNGs through
bot.core.execute.encode_result, which is checked here end to end.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from PIL import Image

from bot.core.execute import WorkItem, encode_result
from generation.conditioning import image_prompt_strength
from generation.contract import GenerationRequest, GenerationResult, InputImage, InputRole
from generation.engine import DiffusersEngine, create_engine
from generation.images import parse_a1111_parameters, read_parameters
from generation.requests import variation_request, zoom_request
from generation.settings import EngineSettings, ModelSpec
from tests.generation.helpers import imagine, tiny_settings

PICTURE = Image.new("RGB", (64, 64), (40, 90, 160))


def _written_strengths(result: GenerationResult, request: GenerationRequest) -> set[str | None]:
    """The "Denoising strength" of every PNG the worker would write for this result."""
    item = WorkItem(
        job_id=1, attempt=1, request_data={}, init_image_path=None, output_dir="images/1"
    )
    rendered = encode_result(result, request, item)
    strengths = set()
    for name, data in rendered.files:
        parsed = parse_a1111_parameters(read_parameters(data) or "")
        assert parsed["Seed"], name
        strengths.add(parsed.get("Denoising strength"))
    return strengths


def test_an_edit_on_the_models_own_unet_reports_edit_strength(engine: DiffusersEngine) -> None:
    request = zoom_request(imagine(), PICTURE, factor=2.0, seed=5)
    assert request.strength == 1.0
    result = engine.generate(request)
    assert engine.settings.edit_strength == 0.8
    assert result.denoising_strength == 0.8
    assert _written_strengths(result, request) == {"0.8"}


def test_a_configured_edit_strength_is_what_the_metadata_says(
    settings: EngineSettings,
) -> None:
    engine = create_engine(dataclasses.replace(settings, edit_strength=0.65))
    request = zoom_request(imagine(steps=6), PICTURE, factor=1.5, seed=5)
    assert _written_strengths(engine.generate(request), request) == {"0.65"}


@pytest.fixture(scope="module")
def inpainting_engine(tiny_cache: Path) -> DiffusersEngine:
    spec = ModelSpec("tiny", "tiny", base_resolution=128, inpaint_source="tiny-inpaint")
    return create_engine(tiny_settings(tiny_cache, spec))


def test_an_edit_on_an_inpainting_unet_reports_full_strength(
    inpainting_engine: DiffusersEngine,
) -> None:
    request = zoom_request(imagine(), PICTURE, factor=2.0, seed=5)
    result = inpainting_engine.generate(request)
    assert result.denoising_strength == 1.0
    assert _written_strengths(result, request) == {"1"}


def test_a_variation_reports_its_strength_and_text_to_image_none(
    engine: DiffusersEngine,
) -> None:
    variation = variation_request(imagine(), PICTURE, strength=0.35, seed=9)
    result = engine.generate(variation)
    assert result.denoising_strength == 0.35
    assert _written_strengths(result, variation) == {"0.35"}
    plain = imagine()
    result = engine.generate(plain)
    assert result.denoising_strength is None
    assert _written_strengths(result, plain) == {None}


def test_an_image_prompt_run_as_img2img_reports_its_strength(
    settings: EngineSettings,
) -> None:
    # Without an image adapter an image prompt starts the job from the picture (img2img).
    engine = create_engine(dataclasses.replace(settings, ip_adapters=()))
    picture = InputImage(InputRole.IMAGE_PROMPT, PICTURE, weight=2.0, source="a", sha256="ab" * 32)
    request = imagine(inputs=(picture,))
    result = engine.generate(request)
    assert result.denoising_strength == image_prompt_strength(2.0) == 0.5
    assert _written_strengths(result, request) == {"0.5"}
