"""A member's taste as a direction in CLIP image space: compact embeddings, the fit, the ranking.

Every candidate the engine ranks is already embedded by CLIP, so a member's picks can teach a
linear preference over those embeddings with no GPU work: a Bradley-Terry model (logistic
regression on the difference of the two embeddings of each pair, `fit_preference`), which
`personal_scores` adds to the prompt similarity when the member asks for `--p`.

Storage budget: 4 KB per job on average. ViT-L/14's 768 float16 values are 1.5 KB a candidate,
12 KB for a job's 8. Kept instead: a fixed random projection to 256 dimensions (Johnson-
Lindenstrauss: inner products, which are all a linear preference reads, survive with an error
of about 1/sqrt(256) of the vectors' norms, while 256 of 768 directions of a random projection
keep the structure a few-hundred-pair fit can learn anyway), then int8 with one float32 scale
per vector (a rounding error of at most 1/254 of the largest value). 260 bytes a candidate,
2,080 for 8. An embedding of 256 dimensions or fewer (the tiny CLIP's 32) is not projected, only
quantized. tests/generation/test_taste_oracle.py measures what both cost in agreement with a
known taste; `python -m bench.bench_taste` prints it.

The projection's seed is part of the stored data's meaning: never change `PROJECTION_SEED`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np

from generation.contract import CandidateEmbeddings, Personalization

COMPACT_DIM = 256
PROJECTION_SEED = 20_251_207
# The L2 penalty of the fit, on differences scaled to unit mean square length (see
# `fit_preference`): strong enough that 20 pairs give a usable direction, weak enough that a
# few hundred follow the member closely.
DEFAULT_L2 = 1.0
_NEWTON_STEPS = 30


def space_for(clip_model: str, dim: int) -> str:
    """What makes embeddings comparable: the CLIP model and its width. A profile fitted in one
    space means nothing in another (the server switched its ranker)."""
    return f"{clip_model}:{dim}"


def compact_dim(dim: int) -> int:
    return min(dim, COMPACT_DIM)


@functools.cache
def _projection(dim: int) -> np.ndarray:
    rng = np.random.default_rng(PROJECTION_SEED + dim)
    # Gaussian columns scaled so a unit vector keeps a squared length of 1 on average.
    return rng.standard_normal((dim, COMPACT_DIM)) / math.sqrt(COMPACT_DIM)


def project(embeds: np.ndarray) -> np.ndarray:
    """(n, d) embeddings in the compact space's coordinates, (n, min(d, 256)) float64."""
    values = np.asarray(embeds, dtype=np.float64)
    if values.ndim != 2:
        raise ValueError(f"embeds: need shape (n, d), got {values.shape}")
    if values.shape[1] <= COMPACT_DIM:
        return values
    return values @ _projection(values.shape[1])


def compact(embeds: np.ndarray, space: str) -> CandidateEmbeddings:
    """Projected, then int8 with one scale per vector (its largest magnitude / 127)."""
    projected = project(embeds)
    # A candidate whose embedding overflowed (half precision) is kept as zeros: it teaches
    # nothing, where an infinite scale would make every fit over it NaN.
    projected = np.where(np.isfinite(projected).all(axis=1)[:, None], projected, 0.0)
    peaks = np.abs(projected).max(axis=1)
    scales = np.where(peaks > 0, peaks / 127.0, 1.0).astype(np.float32)
    codes = np.clip(np.rint(projected / scales[:, None]), -127, 127).astype(np.int8)
    return CandidateEmbeddings(
        space=space,
        dim=projected.shape[1],
        codes=codes.tobytes(),
        scales=tuple(float(s) for s in scales),
    )


def expand(embeddings: CandidateEmbeddings) -> np.ndarray:
    """The stored vectors back as (n, dim) float64 (projected, quantized)."""
    codes = np.frombuffer(embeddings.codes, dtype=np.int8).reshape(-1, embeddings.dim)
    return codes.astype(np.float64) * np.asarray(embeddings.scales, dtype=np.float64)[:, None]


def vector(code: bytes, scale: float) -> np.ndarray:
    """One stored vector (a row of `expand`)."""
    return np.frombuffer(code, dtype=np.int8).astype(np.float64) * scale


def _standardised(values: np.ndarray) -> np.ndarray:
    spread = float(values.std())
    return (values - values.mean()) / spread if spread > 1e-12 else np.zeros_like(values)


def personal_scores(
    scores: np.ndarray,
    image_embeds: np.ndarray,
    personalize: Personalization | None,
    space: str,
) -> tuple[np.ndarray, bool]:
    """The scores ranking uses, and whether the member's taste took part.

    Prompt similarity and preference live on unrelated scales (CLIP's cosine x 100; a fitted
    logit whose size depends on how many pairs agreed), so each is standardised over this job's
    candidates and the preference is added with the request's strength: at 1 a candidate one
    spread better liked beats one a spread better fitted to the prompt. Only the order matters
    downstream, and each candidate's CLIP score is still what the result reports."""
    values = np.asarray(scores, dtype=np.float64)
    if personalize is None or personalize.space != space or len(values) < 2:
        return values, False
    projected = project(image_embeds)
    weights = np.asarray(personalize.weights, dtype=np.float64)
    if projected.shape[1] != weights.shape[0]:
        return values, False
    combined = _standardised(values) + personalize.strength * _standardised(projected @ weights)
    return combined, True


def fit_preference(winners: np.ndarray, losers: np.ndarray, l2: float = DEFAULT_L2) -> np.ndarray:
    """Bradley-Terry weights w with P(winner preferred) = sigmoid(w . (winner - loser)).

    Minimises the mean logistic loss plus l2/2 |w|^2 / pairs by Newton's method (the problem is
    convex and at most 256-dimensional: a few milliseconds for thousands of pairs). The
    differences are scaled to unit mean square length first, so the penalty means the same for
    any CLIP model; the scale is folded back, and only the direction matters to ranking."""
    diffs = np.asarray(winners, dtype=np.float64) - np.asarray(losers, dtype=np.float64)
    if diffs.ndim != 2 or diffs.shape[0] == 0:
        raise ValueError(f"pairs: need a non-empty (n, d) set of differences, got {diffs.shape}")
    rms = math.sqrt(float((diffs**2).sum(axis=1).mean()))
    if rms <= 1e-12:
        return np.zeros(diffs.shape[1])
    x = diffs / rms
    n, d = x.shape
    w = np.zeros(d)
    for _ in range(_NEWTON_STEPS):
        margin = x @ w
        p = 1.0 / (1.0 + np.exp(-margin))  # probability the recorded winner wins
        gradient = -(x.T @ (1.0 - p)) / n + l2 * w / n
        hessian = (x.T * (p * (1.0 - p))) @ x / n + (l2 / n) * np.eye(d)
        step = np.linalg.solve(hessian, gradient)
        w -= step
        if float(np.abs(step).max()) < 1e-8:
            break
    return w / rms


def blend(profiles: Sequence[np.ndarray]) -> np.ndarray:
    """Several profiles at once (`--p a b`): the mean of their unit directions, so a profile
    fitted on more pairs (larger weights) does not drown the others."""
    units = [p / n for p in profiles if (n := float(np.linalg.norm(p))) > 0]
    if not units:
        raise ValueError("profiles: none has a direction yet")
    return np.mean(units, axis=0)
