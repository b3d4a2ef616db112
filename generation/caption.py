"""The optional caption that leads /describe's suggestions: a BLIP captioning model
(transformers' BlipForConditionalGeneration, e.g. Salesforce/blip-image-captioning-base),
configured as `[generation] caption_model` like the other models: a hub id or a folder, "tiny"
for the random-weight one tests build, "" for none (the suggestions are then the CLIP-ranked
phrases alone).

CLIP can only rank phrases it is given; a captioner writes what it sees ("a dog sitting on a
bench"), which makes a better first part of a prompt than any list could.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from PIL import Image

from generation.ranking import load_with_processor
from generation.settings import TINY

log = logging.getLogger(__name__)

# BLIP's captions are one short sentence; this bounds the rare run-on.
MAX_CAPTION_TOKENS = 30
_PROMPT_SYNTAX = re.compile(r"-{2,}|[—–]|:{2,}|[{}]")


def resolve_caption_source(caption_model: str, cache_dir: Path) -> str:
    """A hub id or folder as given; `tiny` becomes the tiny BLIP folder, built on first use."""
    if caption_model == TINY:
        from generation.tiny import ensure_tiny_captioner

        return str(ensure_tiny_captioner(cache_dir))
    return caption_model


class Captioner:
    """One BLIP model and its processor, loaded with from_pretrained."""

    def __init__(
        self,
        source: str,
        *,
        device: str = "cpu",
        dtype: Any = None,
        cache_dir: Path | None = None,
        local_files_only: bool = False,
    ) -> None:
        import torch
        from transformers import BlipForConditionalGeneration, BlipProcessor

        self.source = source
        self.device = device
        self.dtype = dtype or torch.float32
        self.model, self.processor = load_with_processor(
            BlipForConditionalGeneration,
            BlipProcessor,
            source,
            self.device,
            self.dtype,
            cache_dir,
            local_files_only,
        )

    def caption(self, image: Image.Image) -> str:
        """One sentence about the picture (greedy decoding: the same picture, the same words)."""
        import torch

        inputs = self.processor(images=image.convert("RGB"), return_tensors="pt")
        pixels = inputs["pixel_values"].to(self.device, self.dtype)
        with torch.inference_mode():
            tokens = self.model.generate(
                pixel_values=pixels, max_new_tokens=MAX_CAPTION_TOKENS, do_sample=False
            )
        text = str(self.processor.decode(tokens[0], skip_special_tokens=True))
        # The caption becomes prompt text a member may imagine: nothing in it may read as a
        # flag or a `::` weight.
        return " ".join(_PROMPT_SYNTAX.sub(" ", text).split())
