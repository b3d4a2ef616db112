"""generation/taste.py without models: the compact embeddings, the fit, the ranking with a taste."""

from __future__ import annotations

import numpy as np
import pytest

from generation.contract import CandidateEmbeddings, Personalization
from generation.taste import (
    COMPACT_DIM,
    blend,
    compact,
    expand,
    fit_preference,
    personal_scores,
    project,
    vector,
)


def _unit(rows: int, dim: int, seed: int = 0) -> np.ndarray:
    values = np.random.default_rng(seed).standard_normal((rows, dim))
    return values / np.linalg.norm(values, axis=1, keepdims=True)


def test_compact_rounds_each_value_by_at_most_half_its_vectors_step() -> None:
    embeds = _unit(8, 32)
    packed = compact(embeds, "s:32")
    assert packed.dim == 32 and len(packed.codes) == 8 * 32  # not projected: 32 <= 256
    restored = expand(packed)
    steps = np.asarray(packed.scales)[:, None]
    assert np.all(np.abs(restored - embeds) <= steps / 2 + 1e-9)
    assert np.allclose(vector(packed.codes[32:64], packed.scales[1]), restored[1])


def test_wide_embeddings_are_projected_to_256_keeping_inner_products() -> None:
    embeds = _unit(64, 768, seed=1)
    packed = compact(embeds, "s:768")
    assert packed.dim == COMPACT_DIM and len(packed.codes) == 64 * COMPACT_DIM
    # The same fixed projection every time (stored vectors depend on it).
    assert np.array_equal(project(embeds), project(embeds.copy()))
    original = embeds @ embeds.T
    kept = expand(packed) @ expand(packed).T
    # Johnson-Lindenstrauss: errors of order 1/sqrt(256) for unit vectors.
    assert np.abs(kept - original).max() < 0.35
    assert np.abs(kept - original).mean() < 0.08


def test_a_malformed_embedding_set_is_refused() -> None:
    with pytest.raises(ValueError, match="embeddings"):
        CandidateEmbeddings(space="s", dim=4, codes=b"\x00" * 7, scales=(1.0, 1.0))
    with pytest.raises(ValueError, match="finite"):
        Personalization(weights=(float("nan"),), space="s")
    with pytest.raises(ValueError, match="strength"):
        Personalization(weights=(1.0,), space="s", strength=-1.0)


def test_the_fit_finds_the_direction_that_decided_the_pairs() -> None:
    rng = np.random.default_rng(2)
    taste = rng.standard_normal(16)
    a, b = rng.standard_normal((300, 16)), rng.standard_normal((300, 16))
    a_wins = (a - b) @ taste > 0
    winners = np.where(a_wins[:, None], a, b)
    losers = np.where(a_wins[:, None], b, a)
    weights = fit_preference(winners, losers)
    cosine = weights @ taste / np.linalg.norm(weights) / np.linalg.norm(taste)
    assert cosine > 0.9
    assert not np.any(fit_preference(winners[:1], winners[:1]))  # no difference, no direction


def test_personal_scores_add_the_taste_only_in_its_space_and_dimension() -> None:
    embeds = _unit(6, 32, seed=3)
    scores = np.array([30.0, 29.0, 28.0, 27.0, 26.0, 25.0])
    liked = embeds[5] - embeds.mean(axis=0)
    taste = Personalization(weights=tuple(liked), space="s:32", strength=5.0)
    ranked, used = personal_scores(scores, embeds, taste, "s:32")
    assert used and int(np.argmax(ranked)) == 5
    for other, space in (
        (taste, "t:32"),
        (Personalization(weights=tuple(liked[:16]), space="s:32"), "s:32"),
        (None, "s:32"),
    ):
        plain, used = personal_scores(scores, embeds, other, space)
        assert not used and np.array_equal(plain, scores)
    # At strength 0 the order is the prompt similarity's.
    zero = Personalization(weights=tuple(liked), space="s:32", strength=0.0)
    ranked, _ = personal_scores(scores, embeds, zero, "s:32")
    assert list(np.argsort(-ranked)) == list(range(6))


def test_several_profiles_blend_by_direction_not_size() -> None:
    small, large = np.array([1.0, 0.0]), np.array([0.0, 100.0])
    assert np.allclose(blend([small, large]), [0.5, 0.5])
    with pytest.raises(ValueError):
        blend([np.zeros(2)])


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
@pytest.mark.parametrize("dim", [32, 768])
def test_a_candidate_whose_embedding_overflowed_is_kept_as_no_preference(
    bad: float, dim: int
) -> None:
    """A half-precision CLIP can overflow on one image: that candidate is stored as zeros (it
    teaches nothing) with a finite scale, instead of an infinite scale whose products are NaN
    and would poison every fit of the member who rates it; the others keep their values."""
    embeds = _unit(4, dim, seed=3)
    embeds[1, 5] = bad
    given = embeds.copy()
    packed = compact(embeds, f"s:{dim}")
    np.testing.assert_array_equal(embeds, given)  # the ranker's own array is left alone
    assert all(np.isfinite(s) and s > 0 for s in packed.scales)
    restored = expand(packed)
    assert np.isfinite(restored).all() and not restored[1].any()
    assert np.allclose(restored[[0, 2, 3]], expand(compact(embeds[[0, 2, 3]], "s")), atol=0)
    # And a fit over such a pair stays finite (no preference from the zero vector's side).
    weights = fit_preference(np.stack([restored[0], restored[1]]), restored[[1, 2]])
    assert np.isfinite(weights).all()
