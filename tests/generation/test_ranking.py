"""CLIP scoring and the choice of kept candidates (score order, or diverse with --chaos)."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from generation.ranking import ClipRanker, resolve_clip_source, select_candidates, square_tiles
from tests.generation.helpers import imagine


def test_chaos_zero_keeps_the_best_scores_in_order() -> None:
    scores = [3.0, 9.0, 1.0, 7.0, 9.0, 5.0]
    assert select_candidates(scores, None, keep=6) == [1, 4, 3, 5, 0, 2]
    assert select_candidates(scores, None, keep=3) == [1, 4, 3]
    embeds = np.eye(6)
    assert select_candidates(scores, embeds, keep=3, chaos=0) == [1, 4, 3]


def test_selection_is_a_permutation_sorted_by_score() -> None:
    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(1, 12))
        scores = rng.normal(size=n)
        order = select_candidates(scores, None, keep=n)
        assert sorted(order) == list(range(n))
        assert all(scores[a] >= scores[b] for a, b in itertools.pairwise(order))


def _clustered() -> tuple[list[float], np.ndarray]:
    """Six candidates: three near-copies with the top scores (0-2), three distinct ones (3-5)."""
    scores = [30.0, 29.8, 29.6, 27.0, 26.5, 26.0]
    base = np.array([1.0, 0.0, 0.0, 0.0])
    embeds = np.array(
        [
            base,
            base + np.array([0.0, 0.05, 0.0, 0.0]),
            base + np.array([0.0, 0.0, 0.05, 0.0]),
            [0.0, 1.0, 0.0, 0.0],
            [0.0, 0.0, 1.0, 0.0],
            [0.0, 0.0, 0.0, 1.0],
        ]
    )
    return scores, embeds


def test_high_chaos_keeps_a_diverse_set() -> None:
    scores, embeds = _clustered()
    calm = select_candidates(scores, embeds, keep=3, chaos=0)
    wild = select_candidates(scores, embeds, keep=3, chaos=80)
    assert calm == [0, 1, 2]  # the three near-copies
    assert wild[0] == 0  # the best image is always kept
    assert len({0, 1, 2} & set(wild)) == 1  # one of the copies, then the distinct ones
    assert wild == sorted(wild, key=lambda i: -scores[i])

    def mean_similarity(picked: list[int]) -> float:
        unit = embeds[picked] / np.linalg.norm(embeds[picked], axis=1, keepdims=True)
        sim = unit @ unit.T
        return float(sim[np.triu_indices(len(picked), 1)].mean())

    assert mean_similarity(wild) < mean_similarity(calm)


def test_more_chaos_never_makes_the_set_less_diverse() -> None:
    scores, embeds = _clustered()
    copies = [
        len({0, 1, 2} & set(select_candidates(scores, embeds, 3, c))) for c in range(0, 101, 10)
    ]
    assert copies == sorted(copies, reverse=True)
    assert copies[0] == 3 and copies[-1] == 1


@pytest.mark.parametrize(
    ("kwargs", "parameter"),
    [
        ({"scores": [], "image_embeds": None, "keep": 1}, "scores"),
        ({"scores": [1.0, 2.0], "image_embeds": None, "keep": 3}, "keep"),
        ({"scores": [1.0, 2.0], "image_embeds": None, "keep": 0}, "keep"),
        ({"scores": [1.0, 2.0], "image_embeds": None, "keep": 1, "chaos": 101}, "chaos"),
        ({"scores": [1.0, 2.0], "image_embeds": np.ones((3, 4)), "keep": 2, "chaos": 5}, "image_"),
    ],
)
def test_selection_rejects_bad_input(kwargs: dict, parameter: str) -> None:
    with pytest.raises(ValueError, match=rf"^{parameter}"):
        select_candidates(**kwargs)


def test_clip_scores_are_cosine_times_100_and_reproducible(tiny_cache: Path) -> None:
    ranker = ClipRanker(resolve_clip_source("tiny", tiny_cache), local_files_only=True)
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8)) for _ in range(5)]
    first = ranker.score("a lighthouse at dusk", images)
    again = ranker.score("a lighthouse at dusk", images)
    assert first.scores.shape == (5,)
    assert np.all(np.abs(first.scores) <= 100.0)
    np.testing.assert_allclose(first.scores, again.scores, atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(first.image_embeds, axis=1), 1.0, atol=1e-5)
    # Scores depend on the text: another prompt ranks the same images differently.
    other = ranker.score("a bowl of fruit on a table", images)
    assert not np.allclose(first.scores, other.scores, atol=1e-3)
    # Scoring alone or in a batch gives the same number.
    alone = ranker.score("a lighthouse at dusk", images[2:3])
    assert alone.scores[0] == pytest.approx(first.scores[2], abs=1e-3)


def test_engine_keeps_the_candidates_clip_ranks_best(engine) -> None:
    result = engine.generate(imagine(num_candidates=5, num_kept=5, seed=11))
    rescored = engine.ranker().score("a lighthouse at dusk", list(result.images))
    np.testing.assert_allclose(rescored.scores, result.clip_scores, atol=1e-3)
    assert list(result.clip_scores) == sorted(result.clip_scores, reverse=True)


def test_engine_chaos_keeps_a_different_set(engine) -> None:
    calm = engine.generate(imagine(num_candidates=8, num_kept=3, seed=5, chaos=0))
    wild = engine.generate(imagine(num_candidates=8, num_kept=3, seed=5, chaos=100))
    # chaos 100 is pure diversity after the best image, which is kept either way.
    assert calm.candidate_indices[0] == wild.candidate_indices[0]
    assert set(calm.candidate_indices) != set(wild.candidate_indices)
    embeds = engine.ranker().score("x", list(wild.images)).image_embeds
    calm_embeds = engine.ranker().score("x", list(calm.images)).image_embeds

    def spread(unit: np.ndarray) -> float:
        sim = unit @ unit.T
        return float(sim[np.triu_indices(len(unit), 1)].max())

    assert spread(embeds) <= spread(calm_embeds)


def _wide(left: Image.Image, middle: Image.Image, right: Image.Image) -> Image.Image:
    """Three squares side by side: a 3:1 picture."""
    side = middle.width
    wide = Image.new("RGB", (3 * side, side))
    for index, part in enumerate((left, middle, right)):
        wide.paste(part, (index * side, 0))
    return wide


def _squares(count: int, seed: int, side: int = 96) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    # Blocky noise: structure CLIP's 32 px patches see, unlike per-pixel noise it averages out.
    cells = rng.integers(0, 256, (count, side // 16, side // 16, 3), dtype=np.uint8)
    return [Image.fromarray(c).resize((side, side), Image.Resampling.NEAREST) for c in cells]


def test_square_tiles_cover_the_whole_image() -> None:
    assert [t.size for t in square_tiles(Image.new("RGB", (64, 64)))] == [(64, 64)]
    wide = square_tiles(Image.new("RGB", (300, 100)))
    assert [t.size for t in wide] == [(100, 100)] * 3
    # 16:9: two squares, overlapping in the middle, reaching both ends.
    marked = Image.new("RGB", (160, 90))
    marked.putpixel((0, 45), (255, 0, 0))
    marked.putpixel((159, 45), (0, 255, 0))
    tiles = square_tiles(marked)
    assert [t.size for t in tiles] == [(90, 90)] * 2
    assert tiles[0].getpixel((0, 45)) == (255, 0, 0) and tiles[1].getpixel((89, 45)) == (0, 255, 0)
    tall = square_tiles(Image.new("RGB", (90, 400)))
    assert len(tall) == 5 and all(t.size == (90, 90) for t in tall)


def test_candidates_that_differ_only_at_their_sides_rank_by_their_sides(tiny_cache: Path) -> None:
    """Oracle: the reference a /blend ranks against is itself one of the candidates, so the
    right ranking is known whatever the (random-weight) CLIP: that candidate is identical to
    the reference (cosine 1, the top score) and the other shares only its middle third. A
    ranker that looks at the centre square only scores the two alike, and the tie goes to the
    earlier candidate, the wrong one."""
    ranker = ClipRanker(resolve_clip_source("tiny", tiny_cache), local_files_only=True)
    left, middle, right, other_left, other_right = _squares(5, seed=4)
    reference = _wide(left, middle, right)
    candidates = [_wide(other_left, middle, other_right), reference]
    scored = ranker.score_against_images([reference], candidates)
    assert scored.scores[1] == pytest.approx(100.0, abs=1e-3)
    assert scored.scores[0] < scored.scores[1] - 0.1
    assert select_candidates(scored.scores, scored.image_embeds, keep=2) == [1, 0]

    # Against a prompt: the candidate whose sides are the squares CLIP scores highest for the
    # prompt outranks the one whose sides it scores lowest (their middles are the same).
    prompt = "a lighthouse at dusk"
    squares = _squares(24, seed=9)
    alone = ranker.score(prompt, squares).scores
    best, worst = squares[int(np.argmax(alone))], squares[int(np.argmin(alone))]
    centre = squares[int(np.argsort(alone)[len(alone) // 2])]
    low_sides, high_sides = _wide(worst, centre, worst), _wide(best, centre, best)
    scored = ranker.score(prompt, [low_sides, high_sides])
    assert select_candidates(scored.scores, scored.image_embeds, keep=2) == [1, 0]
    # Two of the three tiles are the sides: about two thirds of the squares' spread (0.58-0.68
    # over other draws); a centre-crop ranker sees no difference at all.
    assert scored.scores[1] - scored.scores[0] > 0.5 * (alone.max() - alone.min())
