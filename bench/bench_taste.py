"""How much `--p` agrees with a member's taste, before and after they rate (figures only).

    python -m bench.bench_taste [--held-out 200] [--seed 0]

The oracle: a simulated member whose taste is a fixed hidden direction in CLIP image space
(how much they like a candidate is its embedding's projection on that direction). They press
U on the kept image they like best in each of their grids (the picked one preferred over the
job's other 7 candidates) and answer /rank rounds between two of their kept images. After N
pairs, each of `--held-out` new grids of 8 candidates is ranked plainly (by the prompt
similarity) and personalized (generation.taste.personal_scores at strength 1); the measure is
top-1 agreement: how often the image shown first is the candidate the member likes best.
Chance is 1 in 8.

Two embedding sources: the tiny random-weight CLIP's (32 dimensions: only int8 applies) of
random blurred pictures, and a ViT-L/14-wide stand-in (768 dimensions, a few strong directions
over isotropic noise, as real CLIP embeddings have) where the 256-dimension projection applies
too. Each is fitted on full-precision embeddings and on the stored compact ones.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from generation.contract import Personalization
from generation.taste import (
    compact,
    expand,
    fit_preference,
    personal_scores,
    project,
)

CANDIDATES = 8
KEPT = 4


@dataclass(frozen=True)
class Grid:
    scores: np.ndarray  # (8,) prompt similarity, CLIP's cosine x 100
    embeds: np.ndarray  # (8, d) unit image embeddings


@dataclass(frozen=True)
class Pair:
    winner: tuple[int, int]  # (grid, candidate)
    loser: tuple[int, int]


def kept(grid: Grid) -> list[int]:
    """What plain ranking shows: the 4 best prompt similarities."""
    return sorted(range(CANDIDATES), key=lambda i: (-grid.scores[i], i))[:KEPT]


def member_pairs(
    grids: Sequence[Grid], taste: np.ndarray, rank_rounds: int, rng: np.random.Generator
) -> list[Pair]:
    """The simulated member's U presses (one per grid) and /rank answers, by their taste."""
    pairs = []
    for g, grid in enumerate(grids):
        liking = grid.embeds @ taste
        shown = kept(grid)
        picked = max(shown, key=lambda i: liking[i])
        pairs += [Pair((g, picked), (g, other)) for other in range(CANDIDATES) if other != picked]
    shown_all = [(g, i) for g, grid in enumerate(grids) for i in kept(grid)]
    for _ in range(rank_rounds):
        a, b = rng.choice(len(shown_all), size=2, replace=False)
        left, right = shown_all[a], shown_all[b]
        like_left = grids[left[0]].embeds[left[1]] @ taste
        like_right = grids[right[0]].embeds[right[1]] @ taste
        pairs.append(Pair(left, right) if like_left >= like_right else Pair(right, left))
    return pairs


def fitted(grids: Sequence[Grid], pairs: Sequence[Pair], stored: bool) -> np.ndarray:
    """The member's weights fitted on the full-precision embeddings (as CLIP gives them), or
    on the stored compact ones (what the bot keeps: its weights are in the compact space)."""
    vectors = [expand(compact(g.embeds, "bench")) if stored else g.embeds for g in grids]
    winners = np.stack([vectors[p.winner[0]][p.winner[1]] for p in pairs])
    losers = np.stack([vectors[p.loser[0]][p.loser[1]] for p in pairs])
    return fit_preference(winners, losers)


def _standardised(values: np.ndarray) -> np.ndarray:
    spread = float(values.std())
    return (values - values.mean()) / spread if spread > 1e-12 else values * 0.0


def agreement(
    grids: Sequence[Grid],
    taste: np.ndarray,
    weights: np.ndarray | None,
    stored: bool = True,
    strength: float = 1.0,
) -> float:
    """Top-1 agreement with the hidden taste over `grids`; plain ranking with no weights.
    Stored (compact) weights rank through the bot's own `personal_scores`; full-precision ones
    the same way on the full embeddings. A strength of inf ranks by the taste alone."""
    hits = 0
    for grid in grids:
        best = int(np.argmax(grid.embeds @ taste))
        if weights is None:
            ranked = grid.scores
        elif stored and np.isfinite(strength):
            personal = Personalization(
                weights=tuple(float(w) for w in weights), space="bench", strength=strength
            )
            ranked, _ = personal_scores(grid.scores, grid.embeds, personal, "bench")
        else:
            liking = (project(grid.embeds) if stored else grid.embeds) @ weights
            ranked = (
                liking
                if not np.isfinite(strength)
                else _standardised(grid.scores) + strength * _standardised(liking)
            )
        hits += int(int(np.argmax(ranked)) == best)
    return hits / len(grids)


def standard_error(p: float, n: int) -> float:
    return float(np.sqrt(max(p * (1 - p), 1e-9) / n))


def synthetic_grids(count: int, dim: int, rng: np.random.Generator) -> list[Grid]:
    """ViT-L/14-wide stand-in embeddings: a shared mean, 16 strong directions and isotropic
    noise (real CLIP image embeddings sit in a narrow cone with a few dominant directions)."""
    mean = rng.standard_normal(dim)
    mean /= np.linalg.norm(mean)
    basis = rng.standard_normal((16, dim)) / np.sqrt(dim)
    grids = []
    for _ in range(count):
        raw = (
            3.0 * mean
            + rng.standard_normal((CANDIDATES, 16)) @ basis * 2.0
            + rng.standard_normal((CANDIDATES, dim)) / np.sqrt(dim)
        )
        embeds = raw / np.linalg.norm(raw, axis=1, keepdims=True)
        grids.append(Grid(rng.normal(25.0, 2.0, CANDIDATES), embeds))
    return grids


def tiny_clip_grids(count: int, rng: np.random.Generator, cache_dir: Path) -> list[Grid]:
    """The tiny random-weight CLIP's scores and embeddings of random blurred pictures."""
    from PIL import Image

    from generation.ranking import ClipRanker, resolve_clip_source

    ranker = ClipRanker(resolve_clip_source("tiny", cache_dir))
    grids = []
    for _ in range(count):
        pictures = [
            Image.fromarray(rng.integers(0, 256, (8, 8, 3)).astype(np.uint8)).resize(
                (64, 64), Image.Resampling.BILINEAR
            )
            for _ in range(CANDIDATES)
        ]
        scored = ranker.score("a lighthouse at dusk", pictures)
        grids.append(Grid(scored.scores, scored.image_embeds))
    return grids


def hidden_taste(grids: Sequence[Grid], rng: np.random.Generator) -> np.ndarray:
    """A random direction, among those along which the candidates actually differ (a taste
    for what every picture shares could never be told apart), and uncorrelated with the
    prompt similarity within a grid (the direction along which embeddings covary with the
    scores is taken out), so that plain ranking neither helps nor hinders by accident."""
    spread = np.concatenate([g.embeds - g.embeds.mean(axis=0) for g in grids])
    scores = np.concatenate([g.scores - g.scores.mean() for g in grids])
    prompt = spread.T @ scores
    prompt /= max(float(np.linalg.norm(prompt)), 1e-12)
    _, _, components = np.linalg.svd(spread, full_matrices=False)
    mix = rng.standard_normal(min(8, components.shape[0]))
    direction = mix @ components[: mix.shape[0]]
    direction -= (direction @ prompt) * prompt
    return direction / np.linalg.norm(direction)


def report(name: str, grids: list[Grid], held_out: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    taste = hidden_taste(grids, rng)
    test = grids[:held_out]
    train = grids[held_out:]
    plain = agreement(test, taste, None)
    print(
        f"{name}: plain ranking top-1 agreement {plain:.1%} over {held_out} grids "
        f"(chance {1 / CANDIDATES:.1%})"
    )
    print("  top-1 agreement with --p (strength 1), and ranked by the fitted taste alone")
    print("  pairs  grids  /rank  full precision  stored compact  | taste alone: full  compact")
    for presses, rounds in ((3, 9), (5, 20), (10, 40), (20, 80), (40, 160)):
        pairs = member_pairs(train[:presses], taste, rounds, rng)
        full_w = fitted(train[:presses], pairs, stored=False)
        small_w = fitted(train[:presses], pairs, stored=True)
        full = agreement(test, taste, full_w, stored=False)
        small = agreement(test, taste, small_w, stored=True)
        full_alone = agreement(test, taste, full_w, stored=False, strength=np.inf)
        small_alone = agreement(test, taste, small_w, stored=True, strength=np.inf)
        print(
            f"  {len(pairs):5d}  {presses:5d}  {rounds:5d}  {full:14.1%}  {small:14.1%}  "
            f"| {full_alone:16.1%}  {small_alone:7.1%}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--held-out", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", type=Path, default=Path("data/models"))
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    total = args.held_out + 40
    report(
        "tiny CLIP (32 dims, int8)",
        tiny_clip_grids(total, rng, args.cache_dir),
        args.held_out,
        args.seed,
    )
    report(
        "ViT-L/14-wide stand-in (768 dims, projected to 256, int8)",
        synthetic_grids(total, 768, rng),
        args.held_out,
        args.seed,
    )


if __name__ == "__main__":
    main()
