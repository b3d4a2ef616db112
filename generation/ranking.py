"""Rank a job's candidates with CLIP and choose which ones the user is shown.

Scores are CLIP's text-image cosine similarity x 100 (the scale of CLIP's logits, and of the
"CLIP score" metric). Which candidates are kept is a pure function of those scores and the image
embeddings (`select_candidates`), so the choice can be tested without any model.

`chaos` (Midjourney's `--chaos 0..100`) decides how different the kept images are from each
other: 0 keeps the K best scores; above 0 the kept set is chosen by maximal marginal relevance
(MMR) with lambda = 1 - chaos/100, trading a little prompt fit for variety.

CLIP sees a square (its processor centre-crops to 224 px), so a wide or tall image is embedded
as the mean of square tiles covering all of it (`square_tiles`): a `--ar 3:1` candidate is
judged on its sides as well as its middle third.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from generation.settings import TINY

log = logging.getLogger(__name__)

# CLIP's text tower has a 77-token window; longer prompts are cut, as SD's own encoder does.
_CLIP_MAX_TOKENS = 77


def square_tiles(image: Image.Image) -> list[Image.Image]:
    """Square crops, as tall (or wide) as the image's short side, that together cover all of
    it: one for a square image, ceil(long / short) spread evenly from one end to the other
    (overlapping where the sides do not divide) for any other."""
    width, height = image.size
    side = min(width, height)
    length = max(width, height)
    count = math.ceil(length / side)
    if count <= 1:
        return [image]
    offsets = [round(i * (length - side) / (count - 1)) for i in range(count)]
    if width >= height:
        return [image.crop((o, 0, o + side, side)) for o in offsets]
    return [image.crop((0, o, side, o + side)) for o in offsets]


@dataclass(frozen=True)
class Scored:
    scores: np.ndarray  # (n,) float64, cosine x 100
    image_embeds: np.ndarray  # (n, d) float64, unit length


def select_candidates(
    scores: Sequence[float] | np.ndarray,
    image_embeds: np.ndarray | None,
    keep: int,
    chaos: int = 0,
) -> list[int]:
    """Indices of the `keep` candidates to show, best score first.

    chaos 0 (or no embeddings): the `keep` highest scores, ties to the lower index (earlier
    seed). chaos > 0: greedy MMR. The first pick is always the best score; each next pick
    maximises `lam * relevance - (1 - lam) * max cosine to the picks so far`, with relevance the
    score rescaled to 0..1 across this job's candidates so that it and the image-image cosine
    live on comparable scales whatever the CLIP model. The chosen set is returned in score order,
    because that is the order users see and reproduce from.
    """
    values = np.asarray(scores, dtype=np.float64)
    n = values.shape[0]
    if values.ndim != 1 or n == 0:
        raise ValueError(f"scores: need a non-empty 1-D sequence, got shape {values.shape}")
    if not 1 <= keep <= n:
        raise ValueError(f"keep: must be between 1 and the number of candidates ({n}), got {keep}")
    if not 0 <= chaos <= 100:
        raise ValueError(f"chaos: must be between 0 and 100, got {chaos}")
    # Stable descending sort: equal scores keep generation order.
    by_score = sorted(range(n), key=lambda i: (-values[i], i))
    if chaos == 0 or image_embeds is None or keep == 1:
        return by_score[:keep]

    embeds = np.asarray(image_embeds, dtype=np.float64)
    if embeds.ndim != 2 or embeds.shape[0] != n:
        raise ValueError(f"image_embeds: need shape ({n}, d), got {embeds.shape}")
    norms = np.linalg.norm(embeds, axis=1, keepdims=True)
    unit = embeds / np.where(norms == 0, 1.0, norms)
    similarity = unit @ unit.T

    spread = values.max() - values.min()
    relevance = (values - values.min()) / spread if spread > 0 else np.ones(n)
    lam = 1.0 - chaos / 100.0

    chosen = [by_score[0]]
    while len(chosen) < keep:
        best, best_value = -1, -np.inf
        for i in by_score:  # score order makes ties go to the better-scoring candidate
            if i in chosen:
                continue
            redundancy = max(similarity[i, j] for j in chosen)
            value = lam * relevance[i] - (1.0 - lam) * redundancy
            if value > best_value:
                best, best_value = i, value
        chosen.append(best)
    return sorted(chosen, key=lambda i: (-values[i], i))


def load_with_processor(
    model_class: Any,
    processor_class: Any,
    source: str,
    device: str,
    dtype: Any,
    cache_dir: Path | None,
    local_files_only: bool,
) -> tuple[Any, Any]:
    """A transformers model (in eval mode on `device`) and its processor, from a hub id or a
    folder; a hub id is cached under `cache_dir`."""
    kwargs: dict[str, Any] = {"local_files_only": local_files_only}
    if cache_dir is not None and not Path(source).is_dir():
        kwargs["cache_dir"] = str(cache_dir)
    model = model_class.from_pretrained(source, dtype=dtype, **kwargs)
    model.to(device).eval()
    return model, processor_class.from_pretrained(source, **kwargs)


class ClipRanker:
    """A transformers CLIPModel with its processor, loaded once and reused across jobs."""

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
        from transformers import CLIPModel, CLIPProcessor

        self.source = source
        self.device = device
        self.dtype = dtype or torch.float32
        self.model, self.processor = load_with_processor(
            CLIPModel, CLIPProcessor, source, self.device, self.dtype, cache_dir, local_files_only
        )

    def score(self, prompt: str, images: Sequence[Image.Image]) -> Scored:
        """CLIP score of each image against the prompt, and unit image embeddings for MMR."""
        import torch

        if not images:
            raise ValueError("images: need at least one image to score")
        text_inputs = self.processor.tokenizer(
            [prompt],
            padding=True,
            truncation=True,
            max_length=_CLIP_MAX_TOKENS,
            return_tensors="pt",
        ).to(self.device)
        with torch.inference_mode():
            text = _as_tensor(self.model.get_text_features(**text_inputs)).float()
        text = text / text.norm(dim=-1, keepdim=True)
        vision = self.image_embeddings(images)
        scores = vision @ text.cpu().double().numpy()[0] * 100.0
        return Scored(scores=scores, image_embeds=vision)

    def score_against_images(
        self, references: Sequence[Image.Image], images: Sequence[Image.Image]
    ) -> Scored:
        """Like `score`, against the mean embedding of `references` instead of a prompt: how a
        /blend (pictures, no words) ranks its candidates."""
        if not references:
            raise ValueError("references: need at least one picture to score against")
        wanted = self.image_embeddings(references).mean(axis=0)
        wanted = wanted / max(float(np.linalg.norm(wanted)), 1e-12)
        vision = self.image_embeddings(images)
        return Scored(scores=vision @ wanted * 100.0, image_embeds=vision)

    def image_embeddings(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Unit CLIP image embeddings, (n, d) float64, of the whole of each image: the mean of
        its square tiles' embeddings (`square_tiles`), all tiles in one batch."""
        import torch

        if not images:
            raise ValueError("images: need at least one image to embed")
        tiles = [square_tiles(image.convert("RGB")) for image in images]
        inputs = self.processor.image_processor(
            images=[tile for image_tiles in tiles for tile in image_tiles], return_tensors="pt"
        )
        pixels = inputs["pixel_values"].to(self.device, self.dtype)
        with torch.inference_mode():
            vision = _as_tensor(self.model.get_image_features(pixel_values=pixels)).float()
        vision = vision / vision.norm(dim=-1, keepdim=True)
        per_tile = vision.cpu().double().numpy()
        embeds = []
        start = 0
        for image_tiles in tiles:
            mean = per_tile[start : start + len(image_tiles)].mean(axis=0)
            embeds.append(mean / max(float(np.linalg.norm(mean)), 1e-12))
            start += len(image_tiles)
        return np.stack(embeds)

    def text_embeddings(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        """Unit CLIP text embeddings, (n, d) float64, encoded `batch_size` texts at a time."""
        import torch

        chunks = []
        for start in range(0, len(texts), batch_size):
            inputs = self.processor.tokenizer(
                list(texts[start : start + batch_size]),
                padding=True,
                truncation=True,
                max_length=_CLIP_MAX_TOKENS,
                return_tensors="pt",
            ).to(self.device)
            with torch.inference_mode():
                text = _as_tensor(self.model.get_text_features(**inputs)).float()
            chunks.append((text / text.norm(dim=-1, keepdim=True)).cpu().double().numpy())
        if not chunks:
            raise ValueError("texts: need at least one text to embed")
        return np.concatenate(chunks)


def _as_tensor(output: Any) -> Any:
    # transformers 5 may return a model output object from get_*_features; take the projection.
    if hasattr(output, "pooler_output") and not hasattr(output, "norm"):
        return output.pooler_output
    return output


def resolve_clip_source(clip_model: str, cache_dir: Path) -> str:
    """A hub id or folder as given; `tiny` becomes the tiny CLIP folder, built on first use."""
    if clip_model == TINY:
        from generation.tiny import ensure_tiny_clip

        return str(ensure_tiny_clip(cache_dir))
    return clip_model
