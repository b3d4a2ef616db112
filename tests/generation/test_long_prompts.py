"""Prompts longer than CLIP's 77-token window steer the image with every word (SD and SDXL),
and SDXL's empty negative prompt is the zeros its pipelines use, on the weighted path too."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from generation.contract import PromptPart
from generation.engine import create_engine
from generation.settings import EngineSettings, ModelSpec
from generation.weighted_prompt import WeightedPromptEncoder, too_long_for_one_window
from tests.generation.helpers import SAME_PICTURE_MAX_DIFF, imagine, max_diff

# Over 77 tokens for the tiny tokenizer (letter pairs) and for CLIP's real vocabulary alike.
LONG_START = ", ".join(
    [
        "a lighthouse on a rocky headland at dusk",
        "waves breaking over black rocks",
        "gulls circling the lantern room",
        "a fishing village below with lit windows",
        "storm clouds over the horizon",
        "oil painting in the style of the old masters",
        "warm light, cold sea, long shadows",
    ]
)

# Two endings past the 77th token (in both vocabularies).
RED = ", everything bright red: red sky, red sea, red rocks, red gulls, crimson and scarlet"
BLUE = ", everything deep blue: blue sky, blue sea, blue rocks, blue gulls, navy and cobalt"


@pytest.fixture(scope="module")
def engine(tiny_cache: Path) -> Any:
    settings = EngineSettings(
        models=(
            ModelSpec("tiny", "tiny", base_resolution=128),
            ModelSpec("xl", "tiny-sdxl", base_resolution=128, family="sdxl"),
        ),
        cache_dir=tiny_cache,
        device="cpu",
        local_files_only=True,
    )
    return create_engine(settings)


@pytest.mark.parametrize("model", ["tiny", "xl"])
def test_words_past_the_77th_token_change_the_image(engine: Any, model: str) -> None:
    text2img, _ = engine.pipelines(model)
    assert too_long_for_one_window(text2img, LONG_START)
    assert not too_long_for_one_window(text2img, "a lighthouse at dusk")

    def render(prompt: str, negative: str = "") -> Any:
        request = imagine(
            model=model,
            prompt=prompt,
            negative_prompt=negative,
            num_candidates=1,
            num_kept=1,
            guidance=15.0,
        )
        return engine.generate(request).images[0]

    red = render(LONG_START + RED)
    blue = render(LONG_START + BLUE)
    # Cut at the 77th token, both were the same image (a difference of 0); two renders of one
    # picture differ by at most SAME_PICTURE_MAX_DIFF (rounding).
    assert max_diff(red, blue) > SAME_PICTURE_MAX_DIFF
    # A long negative prompt is read to its end too.
    assert (
        max_diff(render("a cat", LONG_START + RED), render("a cat", LONG_START + BLUE))
        > SAME_PICTURE_MAX_DIFF
    )


def test_a_short_prompt_keeps_the_plain_path(engine: Any) -> None:
    """Under 77 tokens nothing changes: the pipeline's own encoder, as before."""
    text2img, _ = engine.pipelines("tiny")
    request = imagine(model="tiny", num_candidates=1, num_kept=1)
    kwargs = engine._encode_prompt(engine._loaded["tiny"], request)
    assert kwargs == {"prompt": request.prompt, "negative_prompt": None}
    assert text2img.tokenizer.model_max_length == 77


def test_sdxl_empty_negative_prompt_is_zeros_as_in_diffusers(engine: Any) -> None:
    import torch

    text2img, _ = engine.pipelines("xl")
    assert text2img.config.force_zeros_for_empty_prompt
    with torch.inference_mode():
        _, negative, _, negative_pooled = text2img.encode_prompt(
            "a red cat", device="cpu", do_classifier_free_guidance=True, negative_prompt=None
        )
        encoder = WeightedPromptEncoder(text2img, "sdxl")
        weighted = encoder.encode([("a red cat", 2.0), ("a blue hat", 1.0)], "", "")
        named = encoder.encode([("a red cat", 2.0), ("a blue hat", 1.0)], "a dog", "")
    assert not negative.any() and not negative_pooled.any()
    assert not weighted["negative_prompt_embeds"].any()
    assert not weighted["negative_pooled_prompt_embeds"].any()
    assert weighted["negative_prompt_embeds"].shape == weighted["prompt_embeds"].shape
    assert weighted["negative_pooled_prompt_embeds"].shape == negative_pooled.shape
    # A negative prompt that says something is encoded as before.
    assert named["negative_prompt_embeds"].abs().sum() > 0
    # SD 1.x has no such rule: its empty negative is the encoding of "".
    sd = WeightedPromptEncoder(engine.pipelines("tiny")[0], "sd")
    with torch.inference_mode():
        assert sd.encode([("a", 2.0), ("b", 1.0)], "", "")["negative_prompt_embeds"].any()


def test_a_weighted_multi_prompt_with_a_long_part_reads_all_of_it(engine: Any) -> None:
    def render(tail: str) -> Any:
        parts = (PromptPart(LONG_START + tail, 2.0), PromptPart("a blue hat", 1.0))
        request = imagine(
            model="tiny", prompt_parts=parts, num_candidates=1, num_kept=1, guidance=15.0
        )
        return engine.generate(request).images[0]

    assert max_diff(render(RED), render(BLUE)) > SAME_PICTURE_MAX_DIFF
