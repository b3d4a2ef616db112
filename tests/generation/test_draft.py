"""--draft: a draft is the job with the draft's steps and sampler, remembering its own, and
Enhance renders a chosen draft image at full quality from the same seed and prompt, keeping its
composition (downscaled images compared through the real tiny pipeline)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from PIL import Image

from generation.contract import Draft, GenerationRequest, JobKind, Sampler, UpscaleMode
from generation.draft import (
    STOCHASTIC_SAMPLERS,
    check_draft_sampler,
    enhance_request,
    make_draft,
)
from generation.flags import PromptError
from generation.prompt import parse_prompt
from generation.requests import upscale_request
from generation.settings import EngineSettings

SETTINGS = EngineSettings(draft_steps=8, draft_sampler=Sampler.UNIPC)


def parse(text: str, settings: EngineSettings = SETTINGS) -> GenerationRequest:
    return parse_prompt(text, settings, seed_source=lambda: 7).request


def test_draft_takes_the_draft_steps_and_sampler_and_remembers_the_full_ones() -> None:
    parsed = parse_prompt("a red barn --draft --sampler euler", SETTINGS, seed_source=lambda: 7)
    request = parsed.request
    assert (request.steps, request.sampler) == (8, Sampler.UNIPC)
    assert request.draft == Draft(steps=30, sampler=Sampler.EULER)
    assert any(note.startswith("--draft → a draft: 8 steps with UniPC") for note in parsed.notes)
    # Everything else is the job as typed.
    plain = parse("a red barn --sampler euler")
    assert dataclasses.replace(request, steps=30, sampler=Sampler.EULER, draft=None) == plain


def test_a_draft_never_runs_more_steps_than_its_full_render() -> None:
    request = parse("a red barn --draft --steps 5")
    assert request.steps == 5 and request.draft == Draft(5, SETTINGS.default_sampler)


def test_a_draft_survives_the_jobs_table() -> None:
    request = parse("a red barn --draft --seed 3")
    again = GenerationRequest.from_json(request.to_json())
    assert again == request and again.draft == request.draft
    # A job stored before drafts existed has no "draft" key.
    data = parse("a red barn").to_json()
    del data["draft"]
    assert GenerationRequest.from_json(data).draft is None


def test_enhance_is_the_full_render_of_one_draft_image() -> None:
    draft = parse("a red barn --draft --seed 100 --cfg 5")
    full = enhance_request(draft, seed=102)
    assert full.draft is None
    assert (full.steps, full.sampler) == (30, SETTINGS.default_sampler)
    assert (full.seed, full.num_candidates, full.num_kept) == (102, 1, 1)
    assert (full.prompt, full.guidance, full.width) == (draft.prompt, 5.0, draft.width)
    with pytest.raises(ValueError, match="only a draft"):
        enhance_request(parse("a red barn"), seed=1)


def test_kinds_that_finish_a_picture_cant_be_drafts() -> None:
    draft = parse("a red barn --draft")
    with pytest.raises(ValueError, match="draft: a upscale can't be a draft"):
        upscale_request(draft, Image.new("RGB", (128, 128)), strength=0.3, seed=1)
    with pytest.raises(ValueError, match="draft: a draft runs at most"):
        dataclasses.replace(draft, steps=31)
    assert UpscaleMode.SUBTLE  # the upscale above was refused for being a draft, not its mode


@pytest.mark.parametrize("sampler", sorted(STOCHASTIC_SAMPLERS))
def test_a_sampler_that_adds_noise_cant_draw_drafts(sampler: Sampler) -> None:
    with pytest.raises(ValueError, match=r"draft_sampler: .* fresh noise"):
        check_draft_sampler(sampler)
    with pytest.raises(ValueError, match="draft_sampler"):
        dataclasses.replace(SETTINGS, draft_sampler=sampler).validate()


def test_a_two_call_sampler_isnt_cheap() -> None:
    with pytest.raises(ValueError, match="twice a step"):
        check_draft_sampler(Sampler.HEUN)


# ----- composition, through the real tiny pipeline ------------------------------------------


def thumbnail(image: Image.Image) -> np.ndarray:
    """16x16 grayscale, 0..1: what is where, without the detail."""
    small = image.convert("L").resize((16, 16), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float64) / 255.0


def distance(a: Image.Image, b: Image.Image) -> float:
    return float(np.sqrt(np.mean((thumbnail(a) - thumbnail(b)) ** 2)))


def test_enhance_keeps_the_drafts_composition(engine, settings) -> None:
    tuned = dataclasses.replace(settings, draft_steps=6)
    draft = parse_prompt("a red barn in a field --draft --seed 4242", tuned).request
    draft = draft.with_changes(num_candidates=3, num_kept=3)
    assert draft.steps == 6 and draft.draft is not None and draft.draft.steps == 30
    drafted = engine.generate(draft)
    enhanced_distances, other_distances = [], []
    for image, seed in zip(drafted.images[:2], drafted.seeds[:2], strict=True):
        (enhanced,) = engine.generate(enhance_request(draft, seed)).images
        (other,) = engine.generate(enhance_request(draft, seed + 977)).images
        enhanced_distances.append(distance(enhanced, image))
        other_distances.append(distance(enhanced, other))
    # The enhanced image is far closer to its draft than to another seed's full render.
    for near, far in zip(enhanced_distances, other_distances, strict=True):
        assert near < 0.5 * far, (enhanced_distances, other_distances)
    assert JobKind.IMAGINE is draft.kind


@pytest.mark.parametrize("sampler", sorted(s.value for s in STOCHASTIC_SAMPLERS))
def test_a_draft_of_a_sampler_that_adds_noise_is_refused(sampler: str) -> None:
    # ✨ Enhance renders with the job's own sampler from the draft's seed: one that adds fresh
    # noise at every step draws another picture there (measured on the tiny model: enhanced vs
    # its draft 3-4x further apart than with dpmpp_2m_karras), so the member would pay for a
    # picture that is not the draft they chose.
    with pytest.raises(PromptError, match=rf"--draft: {sampler} adds fresh noise") as refused:
        parse(f"a red barn --draft --sampler {sampler}")
    assert refused.value.flag == "--draft"
    assert parse(f"a red barn --sampler {sampler}").sampler.value == sampler
    with pytest.raises(ValueError, match="adds fresh noise"):
        make_draft(
            parse(f"a red barn --sampler {sampler}"), steps=8, sampler=SETTINGS.draft_sampler
        )
