"""Prompt embeddings through compel: Midjourney `a::2 b::1` multi-prompts and their weights, and
prompts longer than CLIP's 77-token window.

diffusers' plain path cuts a prompt at 77 tokens (75 words' worth of pieces) and says so only
in a log line. A longer prompt or negative prompt is encoded here instead, in windows of 75
tokens whose embeddings are concatenated (compel's long-prompt mode, as AUTOMATIC1111 does), so
every word steers the image. SDXL's pooled vector, which conditions the image as a whole, is
CLIP's summary of the first 77 tokens only: there is no window to concatenate it with.
"""

from __future__ import annotations

from typing import Any

from generation.contract import GenerationRequest, PromptPart


def weighted_parts(parts: tuple[PromptPart, ...]) -> list[tuple[str, float]]:
    """Midjourney multi-prompt weights, normalised so plain equal weights mean weight 1.

    Midjourney normalises weights (`a::2 b::1` is `a::4 b::2`); dividing by the mean positive
    weight does the same while leaving an unweighted multi-prompt unchanged. Negative weights
    ("less of this") keep their sign and scale with the rest.
    """
    kept = [(p.text.strip(), float(p.weight)) for p in parts if p.text.strip() and p.weight != 0]
    positive = [w for _, w in kept if w > 0]
    if not positive:
        raise ValueError("prompt_parts: at least one part needs a positive weight")
    if sum(w for _, w in kept) <= 0:
        raise ValueError("prompt_parts: the weights must add up to more than 0")
    mean_positive = sum(positive) / len(positive)
    return [(text, weight / mean_positive) for text, weight in kept]


def needs_weighted_prompt(request: GenerationRequest) -> bool:
    parts = request.prompt_parts
    return len(parts) > 1 or any(p.weight != 1.0 for p in parts)


def too_long_for_one_window(pipe: Any, *texts: str) -> bool:
    """Whether any of `texts` has more tokens than the pipeline's text encoders take at once
    (77 for CLIP, start and end tokens included)."""
    for tokenizer in (getattr(pipe, "tokenizer", None), getattr(pipe, "tokenizer_2", None)):
        if tokenizer is None:
            continue
        limit = tokenizer.model_max_length
        for text in texts:
            # verbose=False: counting is not running, so no "longer than the maximum" warning.
            if text and len(tokenizer(text, truncation=False, verbose=False).input_ids) > limit:
                return True
    return False


class WeightedPromptEncoder:
    """Midjourney `a::2 b::1` multi-prompts (or one long prompt, weight 1) as prompt
    embeddings, through compel.

    Each part is encoded on its own and scaled away from (weight > 1), towards (< 1) or through
    (< 0) the empty prompt, and the parts are concatenated along the token axis: compel's
    "conjunction". The prompt objects are built directly rather than from compel's string
    syntax, so parentheses or `+`/`-` in a user's prompt are taken as plain text.
    """

    def __init__(self, pipe: Any, family: str) -> None:
        from compel import Compel, ReturnedEmbeddingsType

        self.family = family
        if family == "sdxl":
            penultimate = ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED
            self.compels = [
                Compel(
                    tokenizer=pipe.tokenizer,
                    text_encoder=pipe.text_encoder,
                    returned_embeddings_type=penultimate,
                    requires_pooled=False,
                    truncate_long_prompts=False,
                ),
                # Pooled embeddings are taken from its provider directly (see `encode`):
                # compel's own pooled mode cannot weight conjunction parts.
                Compel(
                    tokenizer=pipe.tokenizer_2,
                    text_encoder=pipe.text_encoder_2,
                    returned_embeddings_type=penultimate,
                    requires_pooled=False,
                    truncate_long_prompts=False,
                ),
            ]
        else:
            self.compels = [
                Compel(
                    tokenizer=pipe.tokenizer,
                    text_encoder=pipe.text_encoder,
                    truncate_long_prompts=False,
                )
            ]
        # SDXL was trained with zeros, not the encoding of "", for "no negative prompt"; its
        # pipelines use them when the model's config says so (force_zeros_for_empty_prompt).
        self.zero_empty_negative = family == "sdxl" and bool(
            getattr(pipe.config, "force_zeros_for_empty_prompt", False)
        )

    def encode(self, parts: list[tuple[str, float]], negative: str, plain: str) -> dict[str, Any]:
        import torch
        from compel.prompt_parser import Conjunction, FlattenedPrompt, Fragment

        positive_conj = Conjunction(
            [FlattenedPrompt([Fragment(text, 1.0)]) for text, _ in parts],
            [weight for _, weight in parts],
        )
        negative_conj = Conjunction([FlattenedPrompt([Fragment(negative.strip(), 1.0)])], [1.0])
        positives, negatives = [], []
        for compel in self.compels:
            pos = compel.build_conditioning_tensor_for_conjunction(positive_conj)[0]
            neg = compel.build_conditioning_tensor_for_conjunction(negative_conj)[0]
            pos, neg = compel.pad_conditioning_tensors_to_same_length([pos, neg])
            positives.append(pos)
            negatives.append(neg)
        result: dict[str, Any] = {
            "prompt_embeds": torch.cat(positives, dim=-1),
            "negative_prompt_embeds": torch.cat(negatives, dim=-1),
        }
        if self.family == "sdxl":
            # The pooled vector conditions the whole image; the plain prompt text describes it.
            provider = self.compels[1].conditioning_provider
            result["pooled_prompt_embeds"] = provider.get_pooled_embeddings([plain or parts[0][0]])
            result["negative_pooled_prompt_embeds"] = provider.get_pooled_embeddings([negative])
        if self.zero_empty_negative and not negative.strip():
            for key in ("negative_prompt_embeds", "negative_pooled_prompt_embeds"):
                result[key] = torch.zeros_like(result[key])
        return result
