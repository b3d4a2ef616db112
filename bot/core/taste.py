"""Members' taste (`--p`): the candidates' stored embeddings, preference pairs and profiles.

A pair says a member preferred one candidate (job, index in the generated batch) to another.
Pairs come from U1-U4 (the picked image over every other candidate of its grid, kept or not:
`record_pick`) and from /rank (`record_choice`). A member's profile is a Bradley-Terry fit over
the pairs' stored embeddings (generation/taste.py), refitted on demand when the pairs changed
since the last fit (`personalization`), in a thread: a fit is numpy work of a few milliseconds
to tenths of a second, and the event loop never waits for it.

A profile has a share code (`/info` shows it); `--p CODE` ranks with that member's taste. Codes
are random, and erasing one's profile (`erase`) deletes the pairs and the code, so a code once
shared stops working. Retention erases a job's embeddings and every pair that names the job
(`forget_jobs`), so a profile reflects only jobs still kept.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import numpy as np

from bot.core.clock import Clock, to_db
from bot.core.db import Database, Transaction
from generation.contract import MAX_TASTE_DIM, CandidateEmbeddings, Personalization
from generation.taste import blend, fit_preference, vector

log = logging.getLogger(__name__)

# Below this many pairs `--p` ranks as usual and says how many more are needed. One U press
# gives up to 7 pairs (over the other 3 kept and 4 unkept candidates) but all with one winner;
# 30 is about five grids' picks, or 30 /rank rounds: the oracle test
# (tests/generation/test_taste_oracle.py) shows a clear gain from there.
MIN_PAIRS = 30
# Ranking adds this times the standardised preference to the standardised prompt similarity.
DEFAULT_STRENGTH = 1.0
# A fit reads at most the newest pairs: older taste fades, and a fit stays fast.
MAX_FIT_PAIRS = 5000
# A member keeps at most this many pairs, the oldest going first: /rank's buttons can name any
# two images the member may see, and each round reads the member's pairs.
MAX_STORED_PAIRS = MAX_FIT_PAIRS
# The taste sent with a --p job: each weight a fraction of the largest, to this many decimals.
WEIGHT_DECIMALS = 4
CODE_ALPHABET = "abcdefghjkmnpqrstuvwxyz23456789"  # no 0/o, 1/l/i to misread
CODE_LENGTH = 8
CODE_SHAPE = re.compile(r"[a-z0-9]{4,32}")
_MAX_ROW_ID = 2**63 - 1


# A finished job /rank can show: images still kept, content not erased, embeddings stored.
_RANKABLE = (
    "state = 'succeeded' AND images_expired_at IS NULL AND pruned_at IS NULL AND "
    "result IS NOT NULL AND EXISTS (SELECT 1 FROM candidate_embeddings e WHERE "
    "e.job_id = jobs.id)"
)


class PairSource(StrEnum):
    IMPLICIT = "implicit"  # a U1-U4 press
    EXPLICIT = "explicit"  # a /rank answer


@dataclass(frozen=True)
class Ref:
    """A candidate: its job and its index in the job's generated batch (seed + index)."""

    job_id: int
    candidate: int

    @property
    def storable(self) -> bool:
        """Within SQLite's integers: a button's ids are the presser's to forge, and a larger
        one would fail the query instead of finding nothing."""
        return 0 < self.job_id <= _MAX_ROW_ID and 0 <= self.candidate <= _MAX_ROW_ID


@dataclass(frozen=True)
class Profile:
    user_id: int
    code: str
    pairs: int  # usable pairs now (both candidates' embeddings are kept)

    @property
    def ready(self) -> bool:
        return self.pairs >= MIN_PAIRS

    @property
    def missing(self) -> int:
        return max(0, MIN_PAIRS - self.pairs)


@dataclass(frozen=True)
class _Fitted:
    space: str
    weights: np.ndarray
    pairs: int


async def store_embeddings(txn: Transaction, job_id: int, embeddings: CandidateEmbeddings) -> None:
    """A finished job's candidates, in the transaction that ends the job.

    They come from a worker (with Ray, another machine's unpickled object, whose own checks
    did not run): embeddings whose bytes don't match their shape are left out whole, and a
    candidate whose scale is not a positive finite number is left out (NaN would fail the
    transaction, and with it the job's end; infinity would make every fit over it NaN). A
    picture is never withheld for its embedding."""
    dim = embeddings.dim
    if not 1 <= dim <= MAX_TASTE_DIM or len(embeddings.codes) != dim * len(embeddings.scales):
        log.warning("taste: job %d's embeddings are malformed; none kept", job_id)
        return
    usable = [
        (index, scale)
        for index, scale in enumerate(embeddings.scales)
        if math.isfinite(scale) and scale > 0
    ]
    if len(usable) != len(embeddings.scales):
        log.warning(
            "taste: job %d: %d candidates' embeddings unusable, left out",
            job_id,
            len(embeddings.scales) - len(usable),
        )
    await txn.executemany(
        "INSERT OR REPLACE INTO candidate_embeddings (job_id, candidate, space, vector, scale)"
        " VALUES (?, ?, ?, ?, ?)",
        [
            (
                job_id,
                index,
                embeddings.space,
                embeddings.codes[index * embeddings.dim : (index + 1) * embeddings.dim],
                scale,
            )
            for index, scale in usable
        ],
    )


async def forget_jobs(txn: Transaction, job_ids: Sequence[int]) -> None:
    """Retention: a pruned job's embeddings, and every pair naming it, go with its content."""
    for job_id in job_ids:
        await txn.execute("DELETE FROM candidate_embeddings WHERE job_id = ?", (job_id,))
        await txn.execute(
            "DELETE FROM taste_pairs WHERE winner_job = ? OR loser_job = ?", (job_id, job_id)
        )


def normalise_code(code: str) -> str:
    return code.strip().lower()


class TasteStore:
    def __init__(
        self,
        db: Database,
        clock: Clock,
        strength: float = DEFAULT_STRENGTH,
        max_pairs: int = MAX_STORED_PAIRS,
    ) -> None:
        self._db = db
        self._clock = clock
        self.strength = strength
        self._max_pairs = max_pairs
        # One fit at a time per member: two --p jobs sent together share the first one's fit.
        self._fitting: dict[int, asyncio.Lock] = {}

    # ----- signals -----------------------------------------------------------------------

    async def record_pick(self, user_id: int, job_id: int, picked: int) -> int:
        """U1-U4: candidate `picked` of the job preferred over each of its other candidates,
        except ones the member picked from this grid before (a second pick says "this one
        too", not "this one over the first"). Returns the pairs added (0 when the job kept no
        embeddings: a describe, or one made before personalization)."""
        now = to_db(self._clock())

        async def work(txn: Transaction) -> int:
            rows = await txn.fetchall(
                "SELECT candidate FROM candidate_embeddings WHERE job_id = ?", (job_id,)
            )
            candidates = {int(r["candidate"]) for r in rows}
            if picked not in candidates:
                return 0
            earlier = await txn.fetchall(
                "SELECT DISTINCT winner_candidate FROM taste_pairs WHERE user_id = ? AND "
                "winner_job = ? AND loser_job = ? AND source = ?",
                (user_id, job_id, job_id, PairSource.IMPLICIT.value),
            )
            skip = {int(r["winner_candidate"]) for r in earlier} | {picked}
            added = 0
            for loser in sorted(candidates - skip):
                added += await txn.execute(
                    "INSERT OR IGNORE INTO taste_pairs (user_id, winner_job, winner_candidate,"
                    " loser_job, loser_candidate, source, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (user_id, job_id, picked, job_id, loser, PairSource.IMPLICIT.value, now),
                )
            if added:
                await self._ensure_profile(txn, user_id)
                await self._trim(txn, user_id)
            return added

        return await self._db.transaction(work)

    async def record_choice(self, user_id: int, winner: Ref, loser: Ref) -> bool:
        """A /rank answer; a later answer on the same two candidates replaces the earlier one.
        False when either candidate's embedding is gone (its job was pruned meanwhile), or
        both name one candidate (no preference, yet it would count as a rating)."""
        if winner == loser or not (winner.storable and loser.storable):
            return False
        now = to_db(self._clock())

        async def work(txn: Transaction) -> bool:
            for ref in (winner, loser):
                row = await txn.fetchone(
                    "SELECT 1 FROM candidate_embeddings WHERE job_id = ? AND candidate = ?",
                    (ref.job_id, ref.candidate),
                )
                if row is None:
                    return False
            await txn.execute(
                "DELETE FROM taste_pairs WHERE user_id = ? AND winner_job = ? AND "
                "winner_candidate = ? AND loser_job = ? AND loser_candidate = ?",
                (user_id, loser.job_id, loser.candidate, winner.job_id, winner.candidate),
            )
            await txn.execute(
                "INSERT OR IGNORE INTO taste_pairs (user_id, winner_job, winner_candidate,"
                " loser_job, loser_candidate, source, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    user_id,
                    winner.job_id,
                    winner.candidate,
                    loser.job_id,
                    loser.candidate,
                    PairSource.EXPLICIT.value,
                    now,
                ),
            )
            await self._ensure_profile(txn, user_id)
            await self._trim(txn, user_id)
            return True

        return await self._db.transaction(work)

    # ----- profiles ----------------------------------------------------------------------

    async def profile(self, user_id: int) -> Profile:
        """The member's profile (a code is made on first sight, so /info can show it)."""
        row = await self._db.read_one(
            "SELECT code FROM taste_profiles WHERE user_id = ?", (user_id,)
        )
        if row is None:
            code = await self._db.transaction(lambda txn: self._ensure_profile(txn, user_id))
        else:
            code = str(row["code"])
        return Profile(user_id, code, await self._usable_pairs(user_id))

    async def by_code(self, code: str) -> Profile | None:
        row = await self._db.read_one(
            "SELECT user_id, code FROM taste_profiles WHERE code = ?", (normalise_code(code),)
        )
        if row is None:
            return None
        user_id = int(row["user_id"])
        return Profile(user_id, str(row["code"]), await self._usable_pairs(user_id))

    async def personalization(self, profiles: Sequence[Profile]) -> Personalization | None:
        """What a --p job sends to the ranker: the profiles' fitted weights (refitted first
        where pairs changed), blended when several. None if none is ready, or the ready ones
        were fitted in different embedding spaces (the server changed its ranker)."""
        fitted = [await self._fitted(p.user_id) for p in profiles if p.ready]
        usable = [f for f in fitted if f is not None and np.linalg.norm(f.weights) > 0]
        if not usable or len({f.space for f in usable}) != 1:
            return None
        weights = blend([f.weights for f in usable])
        # Only the direction counts (ranking standardises the preference over the job's
        # candidates): a unit peak, 4 decimals, keeps each --p job's stored request small.
        peak = float(np.abs(weights).max())
        if peak == 0:  # profiles that cancel out
            return None
        return Personalization(
            weights=tuple(round(float(w) / peak, WEIGHT_DECIMALS) + 0.0 for w in weights),
            space=usable[0].space,
            strength=self.strength,
        )

    async def has_direction(self, profile: Profile) -> bool:
        """Whether the profile's fit prefers anything (not when every rated pair was two
        look-alike images)."""
        fitted = await self._fitted(profile.user_id)
        return fitted is not None and bool(np.linalg.norm(fitted.weights) > 0)

    async def erase(self, user_id: int) -> int:
        """Delete the member's pairs and profile (the code stops working); returns the pairs
        deleted. Candidates' embeddings stay: they belong to the jobs."""

        async def work(txn: Transaction) -> int:
            deleted = await txn.execute("DELETE FROM taste_pairs WHERE user_id = ?", (user_id,))
            await txn.execute("DELETE FROM taste_profiles WHERE user_id = ?", (user_id,))
            return deleted

        return await self._db.transaction(work)

    # ----- /rank -------------------------------------------------------------------------

    async def rank_candidates(
        self, user_id: int, guild_id: int | None = None, limit: int = 200
    ) -> list[tuple[Ref, int]]:
        """The shown images /rank may compare, newest first: (candidate, its 0-based position
        among the job's images). The member's own; with fewer than two, the server's Explore
        set (jobs of members who share them in the web home). Only images whose files are
        still kept and whose embeddings are stored."""
        rows = await self._db.read(
            f"SELECT id, result FROM jobs WHERE user_id = ? AND {_RANKABLE} "
            "ORDER BY id DESC LIMIT ?",
            (user_id, limit),
        )
        if len(rows) < 2 and guild_id is not None:
            rows = [*rows, *await self._explore_rows(user_id, guild_id, limit)]
        # A candidate whose embedding was left out (store_embeddings) can't be rated.
        embedded: set[tuple[int, int]] = set()
        for start in range(0, len(rows), 500):
            ids = [int(row["id"]) for row in rows[start : start + 500]]
            marks = ", ".join("?" for _ in ids)
            embedded.update(
                (int(r["job_id"]), int(r["candidate"]))
                for r in await self._db.read(
                    f"SELECT job_id, candidate FROM candidate_embeddings WHERE job_id IN ({marks})",
                    ids,
                )
            )
        found: list[tuple[Ref, int]] = []
        for row in rows:
            result = json.loads(row["result"])
            for position, candidate in enumerate(result.get("candidate_indices", ())):
                if (int(row["id"]), int(candidate)) in embedded:
                    found.append((Ref(int(row["id"]), int(candidate)), position))
        return found

    async def in_explore(self, job_id: int, guild_id: int | None) -> bool:
        """Whether the job is in the server's Explore set (its owner shares it)."""
        if guild_id is None:
            return False
        rows = await self._explore_rows(None, guild_id, 1, job_id)
        return bool(rows)

    async def _explore_rows(
        self, user_id: int | None, guild_id: int, limit: int, job_id: int | None = None
    ) -> list[Any]:
        """Other members' rankable jobs in the server's Explore: their own share switch, or
        the server's default for those who never chose (as the web home's Explore page)."""
        return await self._db.read(
            "SELECT jobs.id, jobs.result FROM jobs "
            "LEFT JOIN explore_sharing s ON s.user_id = jobs.user_id "
            "LEFT JOIN explore_defaults d ON d.guild_id = jobs.guild_id "
            "WHERE jobs.guild_id = :g AND (:u IS NULL OR jobs.user_id != :u) AND "
            "(:j IS NULL OR jobs.id = :j) AND coalesce(s.share, d.share, 0) = 1 AND "
            f"{_RANKABLE} ORDER BY jobs.id DESC LIMIT :n",
            {"g": guild_id, "u": user_id, "j": job_id, "n": limit},
        )

    async def next_pair(
        self,
        user_id: int,
        rng: random.Random | None = None,
        guild_id: int | None = None,
        shown: Sequence[tuple[Ref, int]] | None = None,
    ) -> tuple[tuple[Ref, int], tuple[Ref, int]] | None:
        """Two images to compare (`shown`, else `rank_candidates`), not compared before when
        possible; None when fewer than two exist."""
        rng = rng or random.Random()
        if shown is None:
            shown = await self.rank_candidates(user_id, guild_id)
        if len(shown) < 2:
            return None
        done = {
            frozenset(
                (
                    (int(r["winner_job"]), int(r["winner_candidate"])),
                    (int(r["loser_job"]), int(r["loser_candidate"])),
                )
            )
            for r in await self._db.read(
                "SELECT winner_job, winner_candidate, loser_job, loser_candidate "
                "FROM taste_pairs WHERE user_id = ?",
                (user_id,),
            )
        }
        best = None
        for _ in range(24):
            first, second = rng.sample(shown, 2)
            key = frozenset(
                ((first[0].job_id, first[0].candidate), (second[0].job_id, second[0].candidate))
            )
            best = (first, second)
            if key not in done:
                break
        return best

    # ----- internals ---------------------------------------------------------------------

    async def _ensure_profile(self, txn: Transaction, user_id: int) -> str:
        row = await txn.fetchone("SELECT code FROM taste_profiles WHERE user_id = ?", (user_id,))
        if row is not None:
            return str(row["code"])
        while True:
            code = "".join(secrets.choice(CODE_ALPHABET) for _ in range(CODE_LENGTH))
            taken = await txn.fetchone("SELECT 1 FROM taste_profiles WHERE code = ?", (code,))
            if taken is None:
                break
        await txn.execute(
            "INSERT INTO taste_profiles (user_id, code, updated_at) VALUES (?, ?, ?)",
            (user_id, code, to_db(self._clock())),
        )
        return code

    async def _trim(self, txn: Transaction, user_id: int) -> None:
        await txn.execute(
            "DELETE FROM taste_pairs WHERE user_id = :u AND id <= (SELECT id FROM taste_pairs "
            "WHERE user_id = :u ORDER BY id DESC LIMIT 1 OFFSET :n)",
            {"u": user_id, "n": self._max_pairs},
        )

    async def _usable_pairs(self, user_id: int) -> int:
        row = await self._db.read_one(
            "SELECT COUNT(*) AS n FROM taste_pairs p "
            "JOIN candidate_embeddings w ON w.job_id = p.winner_job AND "
            "w.candidate = p.winner_candidate "
            "JOIN candidate_embeddings l ON l.job_id = p.loser_job AND "
            "l.candidate = p.loser_candidate "
            "WHERE p.user_id = ? AND w.space = l.space",
            (user_id,),
        )
        return int(row["n"]) if row is not None else 0

    async def _fitted(self, user_id: int) -> _Fitted | None:
        """The member's weights, refitted when pairs were added or removed since the fit."""
        lock = self._fitting.setdefault(user_id, asyncio.Lock())
        async with lock:
            state = await self._db.read_one(
                "SELECT (SELECT COUNT(*) FROM taste_pairs WHERE user_id = :u) AS n, "
                "(SELECT COALESCE(MAX(id), 0) FROM taste_pairs WHERE user_id = :u) AS last, "
                "p.space, p.weights, p.pairs, p.last_pair_id "
                "FROM taste_profiles p WHERE p.user_id = :u",
                {"u": user_id},
            )
            if state is None:
                return None
            if (
                state["weights"] is not None
                and int(state["last_pair_id"]) == int(state["last"])
                and int(state["pairs"]) == int(state["n"])
            ):
                weights = np.frombuffer(state["weights"], dtype=np.float32).astype(np.float64)
                return _Fitted(str(state["space"]), weights, int(state["pairs"]))
            rows = await self._db.read(
                "SELECT w.space, w.vector AS wv, w.scale AS ws, l.vector AS lv, l.scale AS ls "
                "FROM taste_pairs p "
                "JOIN candidate_embeddings w ON w.job_id = p.winner_job AND "
                "w.candidate = p.winner_candidate "
                "JOIN candidate_embeddings l ON l.job_id = p.loser_job AND "
                "l.candidate = p.loser_candidate "
                "WHERE p.user_id = ? AND w.space = l.space ORDER BY p.id DESC LIMIT ?",
                (user_id, MAX_FIT_PAIRS),
            )
            if not rows:
                return None
            # The newest pairs' space: the ranker the server uses now.
            space = str(rows[0]["space"])
            pairs = [
                (bytes(r["wv"]), float(r["ws"]), bytes(r["lv"]), float(r["ls"]))
                for r in rows
                if str(r["space"]) == space
            ]
            # Kept as float32, and used as kept: a fresh fit ranks as its cached copy will.
            weights = (await asyncio.to_thread(_fit, pairs)).astype(np.float32).astype(np.float64)
            await self._db.transaction(
                lambda txn: txn.execute(
                    "UPDATE taste_profiles SET space = ?, weights = ?, pairs = ?, "
                    "last_pair_id = ?, updated_at = ? WHERE user_id = ?",
                    (
                        space,
                        weights.astype(np.float32).tobytes(),
                        int(state["n"]),
                        int(state["last"]),
                        to_db(self._clock()),
                        user_id,
                    ),
                )
            )
            log.info("taste: refitted member %d on %d pairs", user_id, len(pairs))
            return _Fitted(space, weights, len(pairs))


def _fit(pairs: Sequence[tuple[bytes, float, bytes, float]]) -> np.ndarray:
    winners = np.stack([vector(wv, ws) for wv, ws, _, _ in pairs])
    losers = np.stack([vector(lv, ls) for _, _, lv, ls in pairs])
    return fit_preference(winners, losers)
