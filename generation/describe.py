"""/describe: four prompt suggestions for a picture, from the project's own phrase vocabulary
ranked by the CLIP model the engine already loads for ranking.

CLIP puts text and images in one space, so every phrase of `describe_vocabulary.toml`
(subjects, mediums, styles, art movements, lighting, colours, compositions) can be scored
against the picture. Each suggestion takes one phrase per part, drawn among the best-matching
few of that part; the four suggestions never share a phrase of any part. The seed decides the
draw (Gumbel top-k over the CLIP scores), so the same picture and seed give the same
suggestions and a new seed (the 🔄 button) gives others. Every suggestion ends with `--ar W:H`,
the picture's shape as a simple ratio. Where `[generation] caption_model` is set, a caption
of the picture (generation/caption.py) leads every suggestion.
"""

from __future__ import annotations

import math
import tomllib
import weakref
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

import numpy as np
from PIL import Image

# Parts of a suggestion, in the order they are written.
PARTS = ("subjects", "mediums", "styles", "movements", "lighting", "colours", "compositions")
# Always in a suggestion; of the others, a seeded choice of `_EXTRA_PARTS` keeps them varied.
_ALWAYS = ("subjects", "mediums")
_EXTRA_PARTS = 3
SUGGESTIONS = 4
# Phrases of each part that are drawn from: the best-matching few.
TOP_PHRASES = 8
# CLIP cosines of real models spread by a few hundredths between good and poor phrases: this
# temperature lets the better phrases win most draws without always winning.
TEMPERATURE = 0.02
# Terms of the ratios --ar may be written with (Midjourney's usual ones fit well inside).
_MAX_RATIO_TERM = 21
_MAX_ASPECT = 4.0


@dataclass(frozen=True)
class Vocabulary:
    parts: dict[str, tuple[str, ...]]


@cache
def vocabulary() -> Vocabulary:
    """The phrases shipped with the project (generation/describe_vocabulary.toml)."""
    text = resources.files("generation").joinpath("describe_vocabulary.toml").read_text("utf-8")
    raw = tomllib.loads(text)
    missing = [part for part in PARTS if not raw.get(part)]
    if missing:
        raise ValueError(f"describe vocabulary: no phrases for {', '.join(missing)}")
    return Vocabulary({part: tuple(str(p) for p in raw[part]) for part in PARTS})


class _PhraseIndex:
    """Unit text embeddings of every phrase, per part, for one CLIP model."""

    def __init__(self, ranker: Any, words: Vocabulary) -> None:
        self.embeddings = {part: ranker.text_embeddings(words.parts[part]) for part in PARTS}


# Phrase embeddings are computed once per loaded CLIP and dropped with it.
_indexes: weakref.WeakKeyDictionary[Any, _PhraseIndex] = weakref.WeakKeyDictionary()


def describe_picture(
    ranker: Any,
    image: Image.Image,
    *,
    seed: int,
    count: int = SUGGESTIONS,
    caption: str = "",
) -> tuple[str, ...]:
    """`count` prompt suggestions for `image`, each ending with `--ar W:H`.

    `ranker` is a generation.ranking.ClipRanker (anything with `image_embeddings` and
    `text_embeddings` returning unit vectors). A `caption` (generation.caption) leads every
    suggestion; the phrases then say how it looks.
    """
    words = vocabulary()
    if not 1 <= count <= TOP_PHRASES:
        raise ValueError(f"count: must be between 1 and {TOP_PHRASES}, got {count}")
    index = _indexes.get(ranker)
    if index is None:
        index = _indexes[ranker] = _PhraseIndex(ranker, words)
    picture = ranker.image_embeddings([image])[0]
    rng = np.random.default_rng(seed)
    drawn = {
        part: _draw(index.embeddings[part] @ picture, words.parts[part], count, rng)
        for part in PARTS
    }
    aspect = aspect_ratio(image.width, image.height)
    optional = [part for part in PARTS if part not in _ALWAYS]
    suggestions = []
    for i in range(count):
        extra = set(rng.choice(optional, size=_EXTRA_PARTS, replace=False).tolist())
        phrases = [drawn[part][i] for part in PARTS if part in _ALWAYS or part in extra]
        if caption.strip():
            phrases.insert(0, caption.strip())
        suggestions.append(f"{', '.join(phrases)} --ar {aspect}")
    return tuple(suggestions)


def _draw(
    scores: np.ndarray, phrases: tuple[str, ...], count: int, rng: np.random.Generator
) -> list[str]:
    """`count` different phrases among the best TOP_PHRASES, drawn in proportion to
    exp(score / TEMPERATURE) without replacement (Gumbel top-k)."""
    best = np.argsort(-scores, kind="stable")[: max(count, min(TOP_PHRASES, len(phrases)))]
    if len(best) < count:
        raise ValueError(f"describe vocabulary: need at least {count} phrases per part")
    keys = scores[best] / TEMPERATURE + rng.gumbel(size=len(best))
    order = best[np.argsort(-keys, kind="stable")]
    return [phrases[i] for i in order[:count]]


def aspect_ratio(width: int, height: int) -> str:
    """The picture's shape as `W:H` in small terms: exact when it has them (1920x1080 is
    16:9), else the closest simple ratio (1023x768 is 4:3); within --ar's 1:4..4:1."""
    if width < 1 or height < 1:
        raise ValueError(f"width/height: must be positive, got {width}x{height}")
    divisor = math.gcd(width, height)
    w, h = width // divisor, height // divisor
    if max(w, h) <= _MAX_RATIO_TERM and max(w / h, h / w) <= _MAX_ASPECT:
        return f"{w}:{h}"
    target = math.log(min(max(width / height, 1 / _MAX_ASPECT), _MAX_ASPECT))
    best: tuple[float, int, int, int] | None = None
    for a in range(1, _MAX_RATIO_TERM + 1):
        for b in range(1, _MAX_RATIO_TERM + 1):
            if math.gcd(a, b) != 1 or max(a / b, b / a) > _MAX_ASPECT:
                continue
            # Closest first; among near-equals (within 1%) the simpler ratio.
            error = abs(math.log(a / b) - target)
            key = (round(error, 2), a + b, a, b)
            if best is None or key < best:
                best = key
    assert best is not None
    return f"{best[2]}:{best[3]}"
