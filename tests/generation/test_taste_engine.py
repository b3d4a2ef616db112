"""The engine's side of personalization on the tiny models: every ranked candidate's embedding
comes back compact with the result, and a `--p` taste reorders the kept candidates (only in
the space it was fitted in)."""

from __future__ import annotations

import numpy as np

from generation.contract import Personalization
from generation.ranking import ClipRanker, resolve_clip_source
from generation.settings import EngineSettings
from generation.taste import expand, project, space_for
from tests.generation.helpers import imagine


def test_a_job_returns_every_candidates_embedding_compact(engine, settings: EngineSettings) -> None:
    result = engine.generate(imagine(num_candidates=6, num_kept=2))
    packed = result.embeddings
    assert packed is not None and not result.personalized
    assert len(packed.scales) == 6  # all candidates, not only the 2 kept
    assert packed.space == space_for(settings.clip_model, packed.dim)
    # The kept images' own CLIP embeddings, within int8 rounding.
    ranker = ClipRanker(resolve_clip_source(settings.clip_model, settings.cache_dir))
    kept = project(ranker.image_embeddings(list(result.images)))
    stored = expand(packed)[list(result.candidate_indices)]
    assert np.abs(kept - stored).max() <= max(packed.scales) * 0.51 + 1e-6


def test_a_taste_reorders_the_kept_candidates_in_its_own_space_only(engine) -> None:
    request = imagine(num_candidates=6, num_kept=3, seed=7)
    plain = engine.generate(request)
    assert plain.embeddings is not None
    vectors = expand(plain.embeddings)
    unkept = next(i for i in range(6) if i not in plain.candidate_indices)
    # A taste pointing at a candidate plain ranking dropped (away from the others' mean).
    direction = vectors[unkept] - vectors.mean(axis=0)
    taste = Personalization(
        weights=tuple(float(w) for w in direction),
        space=plain.embeddings.space,
        strength=10.0,
    )
    liked = engine.generate(request.with_changes(personalize=taste))
    assert liked.personalized
    assert liked.candidate_indices[0] == unkept
    # Each kept image still reports its own CLIP score, and the seeds follow the candidates.
    assert liked.seeds[0] == request.seed + unkept

    elsewhere = Personalization(weights=taste.weights, space="another-clip:32", strength=10.0)
    other = engine.generate(request.with_changes(personalize=elsewhere))
    assert not other.personalized
    assert other.candidate_indices == plain.candidate_indices
