"""The fair-queue policy on its own: deterministic, with explicit times."""

from __future__ import annotations

import math

from bot.core.fairness import FairQueue, QueueEntry


def entry(job_id: int, user_id: int, at: float = 0.0, tier: int = 0) -> QueueEntry:
    return QueueEntry(job_id=job_id, user_id=user_id, enqueued_at=at, tier=tier)


def drain(queue: FairQueue, now: float = 0.0) -> list[int]:
    order = []
    while (picked := queue.pop(now)) is not None:
        order.append(picked.job_id)
    return order


def test_equal_users_alternate() -> None:
    queue = FairQueue(aging_s=math.inf)
    for i in range(3):
        queue.push(entry(10 + i, user_id=1))
    for i in range(3):
        queue.push(entry(20 + i, user_id=2))
    assert drain(queue) == [10, 20, 11, 21, 12, 22]


def test_a_late_single_job_is_not_stuck_behind_a_backlog() -> None:
    queue = FairQueue(aging_s=30.0)
    for i in range(10):
        queue.push(entry(i, user_id=1, at=0.0))
    first = queue.pop(now=1.0)
    assert first is not None and first.user_id == 1
    queue.push(entry(100, user_id=2, at=2.0))
    nxt = queue.pop(now=3.0)
    assert nxt is not None and nxt.job_id == 100


def test_idle_users_do_not_bank_credit() -> None:
    queue = FairQueue(aging_s=math.inf)
    # User 1 is served many times while user 2 is away...
    for i in range(20):
        queue.push(entry(i, user_id=1))
        assert queue.pop(0.0) is not None
    # ...then both queue work: user 2 gets its fair turn, not twenty in a row.
    for i in range(3):
        queue.push(entry(100 + i, user_id=1))
        queue.push(entry(200 + i, user_id=2))
    order = drain(queue)
    assert order[:2] in ([200, 100], [100, 200])
    assert order[2:4] in ([201, 101], [101, 201])


def test_tiers_weight_the_share() -> None:
    queue = FairQueue(aging_s=math.inf)
    for i in range(20):
        queue.push(entry(i, user_id=1, tier=1))
        queue.push(entry(100 + i, user_id=2, tier=0))
    first_twelve = [queue.pop(0.0) for _ in range(12)]
    served_high = sum(1 for e in first_twelve if e is not None and e.user_id == 1)
    assert served_high == 8  # weight 2 against weight 1


def _dispatches_until_low_tier_is_done(aging_s: float) -> int:
    """A tier-50 user keeps three fresh jobs queued; a tier-0 user queued two jobs at once.
    Fair share alone gives the low tier 1 dispatch in 51; aging must get its second job in
    after a few dispatches anyway."""
    queue = FairQueue(aging_s=aging_s)
    now = 0.0
    next_id = 1000
    for _ in range(3):
        queue.push(entry(next_id, user_id=1, at=now, tier=50))
        next_id += 1
    queue.push(entry(1, user_id=2, at=now, tier=0))
    queue.push(entry(2, user_id=2, at=now, tier=0))
    for dispatch in range(1, 500):
        now += 10.0  # every job takes ten seconds
        picked = queue.pop(now)
        assert picked is not None
        if picked.job_id == 2:
            return dispatch
        if picked.user_id == 1:
            queue.push(entry(next_id, user_id=1, at=now, tier=50))
            next_id += 1
    return 10**6


def test_aging_prevents_starvation() -> None:
    with_aging = _dispatches_until_low_tier_is_done(aging_s=30.0)
    without_aging = _dispatches_until_low_tier_is_done(aging_s=math.inf)
    assert with_aging <= 8
    # The control: the same load without aging keeps the low-tier job waiting far longer.
    assert without_aging > 40


def test_remove_and_order() -> None:
    queue = FairQueue(aging_s=30.0)
    for i in range(3):
        queue.push(entry(i, user_id=1))
    queue.push(entry(10, user_id=2))
    assert [e.job_id for e in queue.order(0.0)] == [0, 10, 1, 2]
    assert queue.remove(10) is not None
    assert queue.remove(10) is None
    assert [e.job_id for e in queue.order(0.0)] == [0, 1, 2]
    # order() does not consume.
    assert len(queue) == 3 and queue.count(1) == 3


def test_front_push_hands_an_interrupted_job_back_first() -> None:
    queue = FairQueue(aging_s=math.inf)
    queue.push(entry(1, user_id=1))
    queue.push(entry(2, user_id=1))
    picked = queue.pop(0.0)
    assert picked is not None and picked.job_id == 1
    queue.push(picked, front=True)
    assert drain(queue) == [1, 2]


def test_ineligible_users_are_skipped() -> None:
    queue = FairQueue(aging_s=math.inf)
    queue.push(entry(1, user_id=1))
    queue.push(entry(2, user_id=2))
    picked = queue.pop(0.0, eligible=lambda user: user != 1)
    assert picked is not None and picked.job_id == 2
    assert queue.pop(0.0, eligible=lambda user: user != 1) is None


def test_order_predicts_exactly_what_pop_does() -> None:
    import copy
    import random

    rng = random.Random(3)
    for _ in range(20):
        queue = FairQueue(aging_s=rng.choice([5.0, 30.0, math.inf]))
        for job_id in range(rng.randint(1, 60)):
            queue.push(
                entry(job_id, rng.randint(1, 8), at=rng.uniform(0, 100), tier=rng.randint(0, 2))
            )
            if rng.random() < 0.2:
                queue.pop(rng.uniform(0, 100))
        now = 120.0
        predicted = [e.job_id for e in queue.order(now)]
        assert predicted == drain(copy.deepcopy(queue), now)


def _shares_under_a_long_queue(aging_s: float) -> dict[int, float]:
    """Ten heavy users keep three jobs queued each (the per-user limit); one light user keeps a
    single job queued, submitting the next as soon as the last one starts. Every job takes ten
    seconds, so a job waits about 300 s: ten times `aging_s`."""
    queue = FairQueue(aging_s=aging_s)
    depth = {user: 3 for user in range(1, 11)} | {99: 1}
    next_id = 0
    now = 0.0

    def submit(user: int) -> None:
        nonlocal next_id
        queue.push(entry(next_id, user_id=user, at=now))
        next_id += 1

    for user, jobs in depth.items():
        for _ in range(jobs):
            submit(user)
    served = dict.fromkeys(depth, 0)
    for _ in range(2200):
        now += 10.0
        picked = queue.pop(now)
        assert picked is not None
        served[picked.user_id] += 1
        submit(picked.user_id)  # every user is always active, each at their own depth
    total = sum(served.values())
    return {user: count / total for user, count in served.items()}


def test_aging_keeps_fair_shares_when_waits_are_far_longer_than_aging_s() -> None:
    equal = 1 / 11
    shares = _shares_under_a_long_queue(aging_s=30.0)
    for user, share in shares.items():
        assert abs(share - equal) <= 0.2 * equal, (user, shares)
    # Without aging the same load is fair too: aging must not undo that.
    for share in _shares_under_a_long_queue(aging_s=math.inf).values():
        assert abs(share - equal) <= 0.2 * equal
