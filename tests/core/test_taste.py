"""Members' taste (bot/core/taste.py) on a real database: the stored embeddings and their budget,
the pairs U1-U4 and /rank record, profiles and their codes, erasing, retention, and the oracle
test: a simulated member with a hidden taste teaches `--p` to agree with it."""

from __future__ import annotations

import dataclasses
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest

from bench.bench_taste import (
    CANDIDATES,
    Grid,
    agreement,
    hidden_taste,
    kept,
    standard_error,
    synthetic_grids,
    tiny_clip_grids,
)
from bot.app.actions import Actor, UserError
from bot.app.personalize import Choice, Personalize
from bot.config import StorageConfig
from bot.core import JobState, ManualClock, Owner
from bot.core.db import Database
from bot.core.taste import MIN_PAIRS, Ref, TasteStore, store_embeddings
from bot.core.web_store import WebStore
from generation.prompt import parse_prompt
from generation.taste import compact, fit_preference, space_for
from tests.core.conftest import finished, make_config, open_core, request

ALICE = Owner(user_id=101, guild_id=1, channel_id=2)
BOB = Owner(user_id=202, guild_id=1, channel_id=2)


async def _job_row(db: Database, user_id: int, kept_candidates: list[int]) -> int:
    """A finished job's row, as the scheduler leaves it (the oracle needs hundreds)."""
    result = {
        "image_paths": [],
        "seeds": [],
        "clip_scores": [],
        "candidate_indices": kept_candidates,
    }
    return await db.transaction(
        lambda txn: txn.insert(
            "INSERT INTO jobs (user_id, kind, request, state, cost, hold_allowance, "
            "hold_granted, hold_day, created_at, finished_at, result) VALUES "
            "(?, 'imagine', '{}', 'succeeded', 0, 0, 0, '2025-03-01', "
            "'2025-03-01T12:00:00+00:00', '2025-03-01T12:00:00+00:00', ?)",
            (user_id, json.dumps(result)),
        )
    )


async def test_a_job_keeps_every_candidate_embedding_and_retention_erases_them_with_its_pairs(
    tmp_path: Path, clock: ManualClock
) -> None:
    storage = StorageConfig(image_retention_days=30, job_retention_days=60)
    core = await open_core(dataclasses.replace(make_config(tmp_path), storage=storage), clock)
    try:
        store = TasteStore(core.db, clock)
        job = await core.scheduler.submit(ALICE, request(num_candidates=8, num_kept=4))
        done = await finished(core, job.id)
        assert done.state is JobState.SUCCEEDED and done.result is not None
        rows = await core.db.read(
            "SELECT candidate, length(vector) AS n FROM candidate_embeddings WHERE job_id = ? "
            "ORDER BY candidate",
            (job.id,),
        )
        # All 8 ranked candidates, not only the 4 shown; 16 fake dimensions, one byte each.
        assert [(r["candidate"], r["n"]) for r in rows] == [(i, 16) for i in range(8)]
        assert "embeddings" not in json.dumps(done.result.to_json())

        assert await store.record_pick(ALICE.user_id, job.id, 2) == 7
        assert await store.record_pick(ALICE.user_id, job.id, 2) == 0  # the same press again
        # A second image of the grid is preferred to the rest, not to the first pick.
        assert await store.record_pick(ALICE.user_id, job.id, 0) == 6
        assert (await store.profile(ALICE.user_id)).pairs == 13

        clock.advance(days=61)
        assert core.retention is not None
        await core.retention.prune()
        await core.retention.prune()
        assert (
            await core.db.read("SELECT * FROM candidate_embeddings WHERE job_id = ?", (job.id,))
            == []
        )
        assert (await store.profile(ALICE.user_id)).pairs == 0
        assert await core.db.read("SELECT * FROM taste_pairs") == []
    finally:
        await core.close()


async def test_stored_embeddings_stay_within_4_kb_per_job_at_vit_l_width(tmp_path: Path) -> None:
    """768 float values per candidate, 8 candidates a job: the table's pages, counted by
    SQLite itself (dbstat), per job."""
    db = await Database.open(tmp_path / "bot.sqlite3")
    try:
        rng = np.random.default_rng(0)
        space = space_for("openai/clip-vit-large-patch14", 768)
        jobs = 200
        for _ in range(jobs):
            job_id = await _job_row(db, ALICE.user_id, [0, 1, 2, 3])
            embeds = rng.standard_normal((CANDIDATES, 768))
            embeds /= np.linalg.norm(embeds, axis=1, keepdims=True)
            packed = compact(embeds, space)
            await db.transaction(lambda txn, j=job_id, p=packed: store_embeddings(txn, j, p))
        row = await db.read_one(
            "SELECT SUM(pgsize) AS bytes FROM dbstat WHERE name = 'candidate_embeddings'"
        )
        assert row is not None
        per_job = int(row["bytes"]) / jobs
        assert per_job <= 4096, per_job
        # Full float16 would be 12 KB: the reduction is real, not an empty table.
        assert per_job >= CANDIDATES * 256
    finally:
        await db.close()


async def test_rank_answers_replace_each_other_and_erase_forgets_the_profile_and_its_code(
    tmp_path: Path, clock: ManualClock
) -> None:
    db = await Database.open(tmp_path / "bot.sqlite3")
    try:
        store = TasteStore(db, clock)
        embeds = np.random.default_rng(1).standard_normal((CANDIDATES, 16))
        job_id = await _job_row(db, ALICE.user_id, [0, 1, 2, 3])
        await db.transaction(lambda txn: store_embeddings(txn, job_id, compact(embeds, "s:16")))
        a, b = Ref(job_id, 0), Ref(job_id, 1)
        assert await store.record_choice(ALICE.user_id, a, b)
        assert await store.record_choice(ALICE.user_id, b, a)  # changed their mind
        pairs = await db.read("SELECT winner_candidate, loser_candidate FROM taste_pairs")
        assert [tuple(r) for r in pairs] == [(1, 0)]
        assert not await store.record_choice(ALICE.user_id, Ref(job_id, 9), a)  # no such one

        profile = await store.profile(ALICE.user_id)
        assert profile.pairs == 1 and not profile.ready and profile.missing == MIN_PAIRS - 1
        assert (await store.by_code(profile.code.upper())) == profile
        assert await store.erase(ALICE.user_id) == 1
        assert await store.by_code(profile.code) is None
        again = await store.profile(ALICE.user_id)
        assert again.pairs == 0 and again.code != profile.code
    finally:
        await db.close()


async def test_a_fit_is_cached_until_pairs_change(tmp_path: Path, clock: ManualClock) -> None:
    db = await Database.open(tmp_path / "bot.sqlite3")
    try:
        store = TasteStore(db, clock)
        rng = np.random.default_rng(2)
        taste = rng.standard_normal(16)
        jobs = []
        for _ in range(6):
            embeds = rng.standard_normal((CANDIDATES, 16))
            job_id = await _job_row(db, ALICE.user_id, [0, 1, 2, 3])
            jobs.append(job_id)
            await db.transaction(
                lambda txn, j=job_id, e=embeds: store_embeddings(txn, j, compact(e, "s:16"))
            )
            await store.record_pick(ALICE.user_id, job_id, int(np.argmax(embeds @ taste)))
        profile = await store.profile(ALICE.user_id)
        assert profile.ready
        first = await store.personalization([profile])
        assert first is not None and first.space == "s:16" and len(first.weights) == 16
        # The fitted direction points the member's way.
        assert float(np.dot(first.weights, taste)) > 0
        fitted_at = await db.read_one("SELECT updated_at, weights FROM taste_profiles")
        clock.advance(minutes=5)
        assert await store.personalization([profile]) == first
        assert tuple(await db.read_one("SELECT updated_at, weights FROM taste_profiles")) == tuple(
            fitted_at
        )
        # A new pair (across two grids: no pick made it) makes the next use refit.
        assert await store.record_choice(ALICE.user_id, Ref(jobs[0], 0), Ref(jobs[1], 0))
        await store.personalization([profile])
        refitted = await db.read_one("SELECT updated_at, pairs FROM taste_profiles")
        assert refitted["updated_at"] != fitted_at["updated_at"]
        assert refitted["pairs"] == profile.pairs + 1
    finally:
        await db.close()


# ---------------------------------------------------------------------------------------------
# The oracle.

TRAINING_GRIDS = 8
RANK_ROUNDS = 40
HELD_OUT = 200


async def _teach(
    db: Database, store: TasteStore, grids: list[Grid], taste: np.ndarray, space: str
) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """The simulated member: a U press per grid on the shown image they like best, then /rank
    rounds between the pairs the store offers, each answered by the hidden taste. Returns the
    pairs as (grid, candidate) of winner and loser, for the full-precision comparison."""
    job_grid: dict[int, int] = {}
    for g, grid in enumerate(grids):
        shown = kept(grid)
        job_id = await _job_row(db, ALICE.user_id, shown)
        job_grid[job_id] = g
        await db.transaction(
            lambda txn, j=job_id, e=grid.embeds: store_embeddings(txn, j, compact(e, space))
        )
        liking = grid.embeds @ taste
        await store.record_pick(ALICE.user_id, job_id, max(shown, key=lambda i: liking[i]))
    rng = random.Random(7)
    for _ in range(RANK_ROUNDS):
        pair = await store.next_pair(ALICE.user_id, rng)
        assert pair is not None
        (left, _), (right, _) = pair
        like = [float(grids[job_grid[r.job_id]].embeds[r.candidate] @ taste) for r in (left, right)]
        winner, loser = (left, right) if like[0] >= like[1] else (right, left)
        assert await store.record_choice(ALICE.user_id, winner, loser)
    rows = await db.read(
        "SELECT winner_job, winner_candidate, loser_job, loser_candidate FROM taste_pairs"
    )
    return [((job_grid[r[0]], r[1]), (job_grid[r[2]], r[3])) for r in rows]


@pytest.mark.parametrize("source", ["tiny_clip", "vit_l_width"])
async def test_oracle_personalized_ranking_learns_a_hidden_taste(
    source: str, tmp_path: Path, clock: ManualClock, tiny_models: Path
) -> None:
    """Top-1 agreement with the hidden taste over 200 held-out grids of 8 candidates: plain
    ranking (chance level) against `--p` fitted on what the store keeps, after 8 U presses and
    40 /rank rounds (96 pairs). The gain must exceed three standard errors of the difference;
    the stored compact embeddings must do as well as full precision within the same noise."""
    rng = np.random.default_rng(11)
    total = TRAINING_GRIDS + HELD_OUT
    if source == "tiny_clip":
        grids = tiny_clip_grids(total, rng, tiny_models)
        space = space_for("tiny", grids[0].embeds.shape[1])
    else:
        grids = synthetic_grids(total, 768, rng)
        space = space_for("vit-l-stand-in", 768)
    taste = hidden_taste(grids, rng)
    train, test = grids[:TRAINING_GRIDS], grids[TRAINING_GRIDS:]

    db = await Database.open(tmp_path / "bot.sqlite3")
    try:
        store = TasteStore(db, clock)
        pairs = await _teach(db, store, train, taste, space)
        profile = await store.profile(ALICE.user_id)
        assert profile.ready and profile.pairs == len(pairs)
        personal = await store.personalization([profile])
        assert personal is not None and personal.space == space
    finally:
        await db.close()

    before = agreement(test, taste, None)
    # The store's weights rank exactly as the worker ranks (generation.taste.personal_scores).
    weights = np.asarray(personal.weights)
    after = agreement(test, taste, weights, stored=True)
    full_weights = fit_preference(
        np.stack([train[g].embeds[c] for (g, c), _ in pairs]),
        np.stack([train[g].embeds[c] for _, (g, c) in pairs]),
    )
    full = agreement(test, taste, full_weights, stored=False)
    print(
        f"\n{source}: top-1 agreement over {HELD_OUT} held-out grids after {len(pairs)} pairs: "
        f"plain {before:.1%}, --p {after:.1%} (stored compact), {full:.1%} (full precision)"
    )
    noise = math.hypot(standard_error(before, HELD_OUT), standard_error(after, HELD_OUT))
    assert after - before > 3 * noise, (before, after)
    assert after >= full - 3 * math.hypot(
        standard_error(after, HELD_OUT), standard_error(full, HELD_OUT)
    ), (after, full)


async def test_rank_falls_back_to_the_servers_explore_set_and_answers_check_it(
    tmp_path: Path, clock: ManualClock
) -> None:
    """A member with fewer than two images of their own is shown the server's Explore (jobs of
    members who share them); an answer naming an image is accepted only while it is the
    member's own or shared in their server."""
    core = await open_core(make_config(tmp_path), clock)
    try:
        personal = Personalize(core, TasteStore(core.db, clock))
        job = await core.scheduler.submit(ALICE, request(num_candidates=8, num_kept=4))
        assert (await finished(core, job.id)).state is JobState.SUCCEEDED
        bob = Actor(BOB.user_id, guild_id=ALICE.guild_id)
        with pytest.raises(UserError, match="Nothing to compare"):
            await personal.next_round(bob)

        await WebStore(core.db, clock).set_share(ALICE.user_id, True)
        shown = await personal.next_round(bob)
        assert {shown.left.job_id, shown.right.job_id} == {job.id}
        assert await personal.store.in_explore(job.id, ALICE.guild_id)
        assert not await personal.store.in_explore(job.id, 999)
        # Alice's own /rank never shows her Explore to her as someone else's.
        assert await personal.store.rank_candidates(ALICE.user_id, ALICE.guild_id) == [
            (Ref(job.id, c), p) for p, c in enumerate((0, 1, 2, 3))
        ]
        await personal.answer(bob, shown.left, shown.right, Choice.LEFT)
        assert (await personal.store.profile(BOB.user_id)).pairs == 1

        await WebStore(core.db, clock).set_share(ALICE.user_id, False)
        with pytest.raises(UserError, match="compares your own images"):
            await personal.answer(bob, shown.left, shown.right, Choice.RIGHT)
        elsewhere = Actor(BOB.user_id, guild_id=999)
        await WebStore(core.db, clock).set_share(ALICE.user_id, True)
        with pytest.raises(UserError, match="compares your own images"):
            await personal.answer(elsewhere, shown.left, shown.right, Choice.RIGHT)
        assert (await personal.store.profile(BOB.user_id)).pairs == 1  # nothing recorded
    finally:
        await core.close()


async def test_a_rank_answer_naming_one_image_twice_records_nothing(
    tmp_path: Path, clock: ManualClock
) -> None:
    """A forged /rank button comparing an image with itself is not a rating: it would count
    toward the threshold while saying nothing about taste."""
    core = await open_core(make_config(tmp_path), clock)
    try:
        personal = Personalize(core, TasteStore(core.db, clock))
        job = await core.scheduler.submit(ALICE, request(num_candidates=8, num_kept=4))
        assert (await finished(core, job.id)).state is JobState.SUCCEEDED
        alice = Actor(ALICE.user_id, guild_id=ALICE.guild_id)
        same = Ref(job.id, 0)
        with pytest.raises(UserError, match="two different images"):
            await personal.answer(alice, same, same, Choice.LEFT)
        assert not await personal.store.record_choice(ALICE.user_id, same, same)
        assert (await personal.store.profile(ALICE.user_id)).pairs == 0
    finally:
        await core.close()


async def test_a_rank_answer_naming_an_id_past_sqlites_integers_is_refused_plainly(
    tmp_path: Path, clock: ManualClock
) -> None:
    """A button's ids are the presser's to forge (19 digits pass its pattern): one past
    SQLite's integers is an image that isn't theirs, not an error on our side."""
    core = await open_core(make_config(tmp_path), clock)
    try:
        personal = Personalize(core, TasteStore(core.db, clock))
        job = await core.scheduler.submit(ALICE, request(num_candidates=8, num_kept=4))
        assert (await finished(core, job.id)).state is JobState.SUCCEEDED
        alice = Actor(ALICE.user_id, guild_id=ALICE.guild_id)
        huge = Ref(9_999_999_999_999_999_999, 0)
        with pytest.raises(UserError, match="compares your own images"):
            await personal.answer(alice, Ref(job.id, 0), huge, Choice.LEFT)
        assert not await personal.store.record_choice(ALICE.user_id, Ref(job.id, 0), huge)
        assert (await personal.store.profile(ALICE.user_id)).pairs == 0
    finally:
        await core.close()


async def test_a_members_stored_pairs_are_capped_keeping_the_newest(
    tmp_path: Path, clock: ManualClock
) -> None:
    """Forged /rank buttons can name any two of the member's (or Explore's) images, so the
    distinct pairs one member can store grow with the square of the images; every /rank round
    reads them all on the event loop. Past the cap the oldest go (the fit reads only the
    newest anyway)."""
    db = await Database.open(tmp_path / "bot.sqlite3")
    try:
        store = TasteStore(db, clock, max_pairs=10)
        jobs = []
        for seed in (2, 3):
            embeds = np.random.default_rng(seed).standard_normal((CANDIDATES, 16))
            job_id = await _job_row(db, ALICE.user_id, [0, 1, 2, 3])
            await db.transaction(
                lambda txn, j=job_id, e=embeds: store_embeddings(txn, j, compact(e, "s:16"))
            )
            jobs.append(job_id)
        first, second = jobs
        assert await store.record_pick(ALICE.user_id, first, 0) == 7
        assert await store.record_pick(ALICE.user_id, second, 5) == 7

        async def kept() -> list[tuple[int, int, int, int]]:
            rows = await db.read(
                "SELECT winner_job, winner_candidate, loser_job, loser_candidate "
                "FROM taste_pairs WHERE user_id = ? ORDER BY id",
                (ALICE.user_id,),
            )
            return [tuple(r) for r in rows]

        newest = [(first, 0, first, c) for c in (5, 6, 7)] + [
            (second, 5, second, c) for c in (0, 1, 2, 3, 4, 6, 7)
        ]
        assert await kept() == newest
        assert await store.record_choice(ALICE.user_id, Ref(first, 1), Ref(second, 1))
        assert await kept() == [*newest[1:], (first, 1, second, 1)]
        assert (await store.profile(ALICE.user_id)).pairs == 10
        # Another member's pairs are not counted against Alice's cap.
        assert await store.record_pick(BOB.user_id, first, 3) == 7
        assert (await store.profile(ALICE.user_id)).pairs == 10
        assert (await store.profile(BOB.user_id)).pairs == 7
    finally:
        await db.close()


async def test_a_results_malformed_embeddings_never_fail_the_jobs_end(
    tmp_path: Path, clock: ManualClock
) -> None:
    """The embeddings come from a worker (another machine with Ray, unpickled without their
    checks): a NaN scale (SQLite stores NaN as NULL) failed the transaction that ends the job
    and settles its credits, and an infinite one poisoned every fit over it. Such rows are left
    out; embeddings whose bytes don't match their shape are left out whole."""
    db = await Database.open(tmp_path / "bot.sqlite3")
    try:
        job_id = await _job_row(db, ALICE.user_id, [0, 1, 2, 3])
        good = compact(np.random.default_rng(4).standard_normal((4, 16)), "s:16")
        bad_scales = dataclasses.replace(good, scales=(good.scales[0], math.nan, math.inf, 0.0))
        await db.transaction(lambda txn: store_embeddings(txn, job_id, bad_scales))
        rows = await db.read("SELECT candidate FROM candidate_embeddings ORDER BY candidate")
        assert [r["candidate"] for r in rows] == [0]

        other = await _job_row(db, ALICE.user_id, [0, 1, 2, 3])
        short = dataclasses.replace(good)
        object.__setattr__(short, "codes", good.codes[:-3])  # as unpickled: no __post_init__
        await db.transaction(lambda txn: store_embeddings(txn, other, short))
        wide = dataclasses.replace(good)
        object.__setattr__(wide, "dim", 0)
        object.__setattr__(wide, "codes", b"")
        await db.transaction(lambda txn: store_embeddings(txn, other, wide))
        assert not await db.read("SELECT 1 FROM candidate_embeddings WHERE job_id = ?", (other,))
    finally:
        await db.close()


async def test_a_personalized_request_carries_its_taste_in_a_few_kilobytes(
    tmp_path: Path, clock: ManualClock
) -> None:
    """Every --p job's request (stored with the job, copied by its rerolls and variations)
    carries the taste's 256 weights: at full float repr that was 5.8 KB a job, more than the
    4 KB budget of the embeddings themselves. Only the direction matters to ranking (each
    side is standardised over the job's candidates), so the weights go as a unit-peak vector
    rounded to 4 decimals, ranking as the fit does."""
    rng = np.random.default_rng(5)
    grids = synthetic_grids(TRAINING_GRIDS, 768, rng)
    space = space_for("vit-l-stand-in", 768)
    taste = hidden_taste(grids, rng)
    db = await Database.open(tmp_path / "bot.sqlite3")
    try:
        store = TasteStore(db, clock)
        await _teach(db, store, grids, taste, space)
        personal = await store.personalization([await store.profile(ALICE.user_id)])
        assert personal is not None and len(personal.weights) == 256
        row = await db.read_one(
            "SELECT weights FROM taste_profiles WHERE user_id = ?", (ALICE.user_id,)
        )
        assert row is not None
        fitted = np.frombuffer(row["weights"], dtype=np.float32).astype(np.float64)
    finally:
        await db.close()
    sent = request(personalize=personal)
    assert len(json.dumps(sent.to_json()["personalize"])) <= 2600
    weights = np.asarray(personal.weights)
    cosine = weights @ fitted / (np.linalg.norm(weights) * np.linalg.norm(fitted))
    assert cosine > 0.99999, cosine


async def test_ratings_with_no_direction_are_not_blamed_on_another_ranker(
    tmp_path: Path, clock: ManualClock
) -> None:
    """A ready profile whose pairs show no preference (every rated pair two look-alike images,
    here identical embeddings) ranks as usual; the note says why, not that the profile was
    made with another ranker."""
    core = await open_core(make_config(tmp_path), clock)
    try:
        store = TasteStore(core.db, clock)
        personal = Personalize(core, store)
        same = np.ones((CANDIDATES, 16))
        for _ in range(math.ceil(MIN_PAIRS / (CANDIDATES - 1))):
            job_id = await _job_row(core.db, ALICE.user_id, [0, 1, 2, 3])
            await core.db.transaction(
                lambda txn, j=job_id: store_embeddings(txn, j, compact(same, "s:16"))
            )
            await store.record_pick(ALICE.user_id, job_id, 0)
        assert (await store.profile(ALICE.user_id)).ready
        parsed = parse_prompt("a red fox --p", core.config.engine)
        alice = Actor(ALICE.user_id, guild_id=ALICE.guild_id)
        (job,), notes = await personal.apply(alice, [parsed], by_default=False)
        assert job.request.personalize is None
        assert len(notes) == 1 and "another ranker" not in notes[0], notes
        assert "no preference" in notes[0] and "ranked as usual" in notes[0], notes
    finally:
        await core.close()


async def test_rank_shows_only_candidates_whose_embeddings_were_kept(
    tmp_path: Path, clock: ManualClock
) -> None:
    """A candidate whose embedding was left out (an overflowed one) can't be rated: /rank
    never offers it, where its answer would be refused as expired."""
    db = await Database.open(tmp_path / "bot.sqlite3")
    try:
        store = TasteStore(db, clock)
        job_id = await _job_row(db, ALICE.user_id, [0, 1, 2, 3])
        packed = compact(np.random.default_rng(6).standard_normal((CANDIDATES, 16)), "s:16")
        scales = list(packed.scales)
        scales[2] = math.nan
        await db.transaction(
            lambda txn: store_embeddings(
                txn, job_id, dataclasses.replace(packed, scales=tuple(scales))
            )
        )
        shown = await store.rank_candidates(ALICE.user_id)
        assert shown == [(Ref(job_id, 0), 0), (Ref(job_id, 1), 1), (Ref(job_id, 3), 3)]
    finally:
        await db.close()


async def test_a_pick_by_anyone_but_the_owner_teaches_nobodys_taste(
    tmp_path: Path, clock: ManualClock
) -> None:
    """U on another member's grid (an admin may press it) records pairs neither on the
    presser's profile nor on the owner's; the owner's own presses, repeated, count once."""
    core = await open_core(make_config(tmp_path), clock)
    try:
        personal = Personalize(core, TasteStore(core.db, clock))
        job = await finished(core, (await core.scheduler.submit(ALICE, request())).id)
        assert job.state is JobState.SUCCEEDED and job.result is not None
        bob = Actor(BOB.user_id, guild_id=ALICE.guild_id)
        await personal.picked(bob, job, 0)
        assert (await personal.store.profile(BOB.user_id)).pairs == 0
        assert (await personal.store.profile(ALICE.user_id)).pairs == 0
        alice = Actor(ALICE.user_id, guild_id=ALICE.guild_id)
        for _ in range(3):
            await personal.picked(alice, job, 0)
        await personal.picked(alice, job, 99)  # no such image: nothing
        others = len(await core.db.read("SELECT 1 FROM candidate_embeddings")) - 1
        assert others > 0
        assert (await personal.store.profile(ALICE.user_id)).pairs == others
    finally:
        await core.close()


async def test_rank_never_shows_another_members_flagged_image(
    tmp_path: Path, clock: ManualClock
) -> None:
    """Images the safety filter flagged are posted behind a spoiler and kept out of the web
    home's Explore for others; /rank's Explore fallback showed them in the clear, side by
    side. The owner's own /rank still shows them (they are theirs)."""
    core = await open_core(make_config(tmp_path), clock)
    try:
        personal = Personalize(core, TasteStore(core.db, clock))
        job = await finished(
            core, (await core.scheduler.submit(ALICE, request(num_candidates=8, num_kept=4))).id
        )
        assert job.state is JobState.SUCCEEDED and job.result is not None
        await WebStore(core.db, clock).set_share(ALICE.user_id, True)
        flags = job.image_path(core.jobs.data_dir, 0).parent / "moderation.json"
        bob = Actor(BOB.user_id, guild_id=ALICE.guild_id)

        flags.write_text(json.dumps({"flagged": [0, 1, 2]}))
        with pytest.raises(UserError, match="Nothing to compare"):
            await personal.next_round(bob)
        flags.write_text(json.dumps({"flagged": [0, 1]}))
        kept_candidates = {job.result.candidate_indices[p] for p in (2, 3)}
        for _ in range(5):
            shown = await personal.next_round(bob)
            assert {shown.left.candidate, shown.right.candidate} == kept_candidates
        flags.write_text("{not json")  # unreadable: every image counts as flagged
        with pytest.raises(UserError, match="Nothing to compare"):
            await personal.next_round(bob)
        # Alice's own round may show her flagged images.
        alice = Actor(ALICE.user_id, guild_id=ALICE.guild_id)
        assert (await personal.next_round(alice)).left.job_id == job.id
    finally:
        await core.close()
