from __future__ import annotations

import asyncio
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from bot.config import CreditsConfig
from bot.core import Core, JobState, LedgerKind, ManualClock, Owner, RefusalCode, Refused, job_cost
from bot.core.credits import MAX_AMOUNT, MAX_BALANCE
from generation.contract import JobKind as GenerationKind
from tests.core.conftest import assert_consistent, finished, make_config, open_core, request

ALICE = Owner(user_id=101, guild_id=1, channel_id=2)


# ----- cost --------------------------------------------------------------------------------


def test_imagine_cost_scales_with_pixels_steps_and_candidates() -> None:
    config = CreditsConfig(cost_imagine=4, cost_variation=2, cost_upscale=3)
    base = request(width=512, height=512, steps=30, num_candidates=8, num_kept=4)
    assert job_cost(base, config) == 4
    assert job_cost(base.with_changes(width=1024, height=1024), config) == 16
    assert job_cost(base.with_changes(steps=60), config) == 8
    assert job_cost(base.with_changes(num_candidates=16), config) == 8
    # Rounded up, never below 1.
    assert job_cost(base.with_changes(steps=31), config) == 5
    smallest = request(width=64, height=64, steps=1, num_candidates=1, num_kept=1)
    assert job_cost(smallest, config) == 1
    # 768x512 x 30 x 8 = 1.5 x base: 6.
    assert job_cost(base.with_changes(width=768), config) == 6


def test_samplers_that_run_the_model_twice_a_step_cost_twice() -> None:
    from generation.contract import Sampler

    config = CreditsConfig(cost_imagine=4, cost_variation=2, cost_upscale=3)
    base = request(width=512, height=512, steps=30, num_candidates=8, num_kept=4)
    for sampler in (Sampler.HEUN, Sampler.DPM2_A_KARRAS, Sampler.DPMPP_SDE_KARRAS):
        assert job_cost(base.with_changes(sampler=sampler), config) == 8, sampler
    for sampler in (Sampler.EULER_A, Sampler.DPMPP_2M_SDE_KARRAS, Sampler.UNIPC):
        assert job_cost(base.with_changes(sampler=sampler), config) == 4, sampler


def test_variation_and_upscale_costs() -> None:
    from PIL import Image

    config = CreditsConfig(cost_imagine=4, cost_variation=2, cost_upscale=3)
    image = Image.new("RGB", (512, 512))
    variation = request(width=512, height=512, steps=30, num_candidates=8, num_kept=4).with_changes(
        kind=GenerationKind.VARIATION, init_image=image, strength=0.7
    )
    assert job_cost(variation, config) == 2
    upscale = variation.with_changes(
        kind=GenerationKind.UPSCALE, width=1024, height=1024, num_candidates=1, num_kept=1
    )
    assert job_cost(upscale, config) == 3
    assert job_cost(upscale.with_changes(width=2048, height=2048), config) == 12
    assert job_cost(variation, CreditsConfig(cost_variation=0)) == 0


def test_a_controlnet_adds_its_percentage_and_loras_nothing() -> None:
    from PIL import Image

    from generation.contract import InputImage, InputRole, LoraWeight

    config = CreditsConfig(cost_imagine=4, cost_variation=2, cost_upscale=3)
    base = request(width=512, height=512, steps=30, num_candidates=8, num_kept=4)
    control = InputImage(InputRole.CONTROL, Image.new("RGB", (8, 8)), source="map.png")
    steered = base.with_changes(controlnet="canny", inputs=(control,))
    assert job_cost(steered, config) == 6  # 4 x 1.5
    assert job_cost(steered, CreditsConfig(cost_controlnet_percent=0)) == 4
    assert job_cost(steered, CreditsConfig(cost_controlnet_percent=100)) == 8
    # Applied before rounding up: 4 x 31/30 x 1.5 = 6.2 → 7 (not 5 x 1.5 = 7.5 → 8).
    assert job_cost(steered.with_changes(steps=31), config) == 7
    assert job_cost(base.with_changes(loras=(LoraWeight("ink", 2.0),)), config) == 4
    variation = steered.with_changes(
        kind=GenerationKind.VARIATION, init_image=Image.new("RGB", (512, 512)), strength=0.7
    )
    assert job_cost(variation, config) == 3
    upscale = variation.with_changes(
        kind=GenerationKind.UPSCALE, width=1024, height=1024, num_candidates=1, num_kept=1
    )
    assert job_cost(upscale, config) == 5  # 3 x 1.5 = 4.5 → 5


# ----- hold: atomic, never negative ----------------------------------------------------------


async def test_fifty_concurrent_submits_with_credits_for_ten(tmp_path: Path) -> None:
    config = make_config(
        tmp_path,
        scheduler={"max_queued_per_user": 100, "max_queue": 100},
        credits={"daily_allowance": 0},
    )
    core = await open_core(config)
    try:
        cost = core.credits.cost(request())
        await core.admin.grant(ALICE.user_id, 10 * cost, actor_id=1)
        results = await asyncio.gather(
            *(core.scheduler.submit(ALICE, request(seed=i)) for i in range(50)),
            return_exceptions=True,
        )
        accepted = [r for r in results if not isinstance(r, BaseException)]
        refused = [r for r in results if isinstance(r, Refused)]
        assert len(accepted) == 10
        assert len(refused) == 40
        assert all(r.code is RefusalCode.INSUFFICIENT_CREDITS for r in refused)
        assert "Not enough credits: this costs" in refused[0].reason
        balance = await core.credits.balance(ALICE.user_id)
        assert balance.granted == 0 and balance.allowance_left == 0
        for job in accepted:
            assert (await finished(core, job.id)).state is JobState.SUCCEEDED
        await assert_consistent(core)
        ledger = await core.credits.ledger(ALICE.user_id, limit=100)
        assert sum(1 for e in ledger if e.kind is LedgerKind.HOLD) == 10
        assert sum(1 for e in ledger if e.kind is LedgerKind.SETTLE) == 10
    finally:
        await core.close(2.0)


async def test_database_refuses_a_negative_balance(core: Core) -> None:
    # Belt and braces under the WHERE clause: the schema itself rejects negative buckets.
    conn = sqlite3.connect(core.db.path)
    try:
        conn.execute("INSERT INTO balances (user_id, granted) VALUES (5, 1)")
        conn.commit()
        with pytest.raises(sqlite3.IntegrityError):
            conn.execute("UPDATE balances SET granted = -1 WHERE user_id = 5")
    finally:
        conn.close()


async def test_ledger_is_append_only(core: Core) -> None:
    await core.admin.grant(ALICE.user_id, 5, actor_id=1)
    conn = sqlite3.connect(core.db.path)
    try:
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            conn.execute("UPDATE ledger SET amount = 500")
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            conn.execute("DELETE FROM ledger")
    finally:
        conn.close()


async def test_consistency_check_catches_a_tampered_balance(core: Core) -> None:
    await core.admin.grant(ALICE.user_id, 5, actor_id=1)
    await assert_consistent(core)
    conn = sqlite3.connect(core.db.path)
    conn.execute("UPDATE balances SET granted = granted + 7 WHERE user_id = ?", (ALICE.user_id,))
    conn.commit()
    conn.close()
    report = await core.credits.check_consistency()
    assert not report.ok
    assert "ledger says" in report.problems[0]


async def test_consistency_check_knows_the_order_of_a_jobs_ledger_rows(core: Core) -> None:
    undelivered = await core.scheduler.submit(ALICE, request())
    assert (await finished(core, undelivered.id)).state is JobState.SUCCEEDED
    assert await core.scheduler.refund_undelivered(undelivered.id, "no Attach Files") > 0
    cancelled = await core.scheduler.submit(ALICE, request("[slow] a fox", steps=50))
    assert await core.scheduler.cancel(cancelled.id)
    assert (await finished(core, cancelled.id)).state is JobState.CANCELLED
    # Settled, then refunded (a result that could not be posted): a legal order.
    await assert_consistent(core)

    # The same rows in an order no code writes: refunded, then recorded as a success and
    # settled. Every balance still adds up; only the order is wrong.
    conn = sqlite3.connect(core.db.path)
    try:
        conn.execute(
            "INSERT INTO ledger (user_id, amount, allowance_delta, granted_delta, kind, job_id, "
            "reason, created_at) VALUES (?, 0, 0, 0, 'settle', ?, '', '2025-03-01T12:00:00')",
            (ALICE.user_id, cancelled.id),
        )
        conn.execute("UPDATE jobs SET state = 'succeeded' WHERE id = ?", (cancelled.id,))
        conn.commit()
    finally:
        conn.close()
    report = await core.credits.check_consistency()
    assert report.problems == (
        f"job {cancelled.id}: succeeded with ledger rows (hold, refund, settle); "
        "expected (hold, settle) or (hold, settle, refund) in that order",
    )


# ----- daily allowance -------------------------------------------------------------------------


async def test_allowance_tops_up_once_per_utc_day_without_accumulating(
    tmp_path: Path, clock: ManualClock
) -> None:
    core = await open_core(make_config(tmp_path, credits={"daily_allowance": 20}), clock)
    try:
        user = ALICE.user_id
        first = await core.credits.balance(user)
        assert (first.allowance_left, first.allowance_level) == (20, 20)
        assert first.resets_at == datetime(2025, 3, 2, tzinfo=UTC)
        job = await core.scheduler.submit(ALICE, request())
        await finished(core, job.id)
        spent = job.cost
        # Later the same day: no second top-up.
        clock.advance(hours=11, minutes=59)
        assert (await core.credits.balance(user)).allowance_left == 20 - spent
        # Next UTC day: back to 20, not 20 + leftover.
        clock.advance(minutes=2)
        assert (await core.credits.balance(user)).allowance_left == 20
        clock.advance(days=3)
        assert (await core.credits.balance(user)).allowance_left == 20
        topups = [
            e for e in await core.credits.ledger(user, 50) if e.kind is LedgerKind.ALLOWANCE_TOPUP
        ]
        # Day 1 (+20), day 2 (+spent back to 20), day 5: nothing was spent, so no row.
        assert [e.amount for e in reversed(topups)] == [20, spent]
        await assert_consistent(core)
    finally:
        await core.close(2.0)


async def test_allowance_is_spent_before_granted_credits_and_refunds_restore_both(
    tmp_path: Path, clock: ManualClock
) -> None:
    config = make_config(tmp_path, credits={"daily_allowance": 3, "cost_imagine": 4}, step_s=0.001)
    core = await open_core(config, clock)
    try:
        big = request("[raise] a red fox", width=512, height=512, steps=30, num_candidates=8)
        assert core.credits.cost(big) == 4
        await core.admin.grant(ALICE.user_id, 10, actor_id=1)
        job = await core.scheduler.submit(ALICE, big)
        balance = await core.credits.balance(ALICE.user_id)
        assert (balance.allowance_left, balance.granted, balance.held) == (0, 9, 4)
        done = await finished(core, job.id)
        assert done.state is JobState.FAILED
        balance = await core.credits.balance(ALICE.user_id)
        assert (balance.allowance_left, balance.granted, balance.held) == (3, 10, 0)
        await assert_consistent(core)
    finally:
        await core.close(2.0)


async def test_refund_after_midnight_drops_only_the_expired_allowance_part(
    tmp_path: Path, clock: ManualClock
) -> None:
    config = make_config(tmp_path, credits={"daily_allowance": 3, "cost_imagine": 4})
    core = await open_core(config, clock)
    await core.admin.grant(ALICE.user_id, 10, actor_id=1)
    # Another user's slow job keeps the worker busy, so Alice's job is still queued at midnight.
    blocker = await core.scheduler.submit(Owner(999), request("[slow] blocker", steps=40))
    big = request("a red fox", width=512, height=512, steps=30, num_candidates=8)
    job = await core.scheduler.submit(ALICE, big)
    try:
        clock.set(datetime(2025, 3, 2, 0, 0, 1, tzinfo=UTC))
        assert await core.scheduler.cancel(job.id, actor_id=ALICE.user_id)
        done = await finished(core, job.id)
        assert done.state is JobState.CANCELLED
        balance = await core.credits.balance(ALICE.user_id)
        # Today's allowance is fresh (3); the 3 taken from yesterday's allowance expired, the 1
        # taken from granted credits came back.
        assert (balance.allowance_left, balance.granted) == (3, 10)
        refund = next(
            e for e in await core.credits.ledger(ALICE.user_id) if e.kind is LedgerKind.REFUND
        )
        assert (refund.allowance_delta, refund.granted_delta) == (0, 1)
        assert "expired" in refund.reason
        await core.scheduler.cancel(blocker.id)
        await finished(core, blocker.id)
        await assert_consistent(core)
    finally:
        await core.close(2.0)


async def test_allowance_levels_user_override_beats_roles_beats_default(
    tmp_path: Path, clock: ManualClock
) -> None:
    config = make_config(
        tmp_path, credits={"daily_allowance": 20, "role_allowances": {7: 50, 8: 30}}
    )
    core = await open_core(config, clock)
    try:
        user = 555
        assert (await core.credits.balance(user, role_ids=())).allowance_level == 20
        assert (await core.credits.balance(user, role_ids=(8,))).allowance_left == 30
        assert (await core.credits.balance(user, role_ids=(7, 8))).allowance_left == 50
        await core.admin.set_role_allowance(8, 80, actor_id=1)
        assert (await core.credits.balance(user, role_ids=(7, 8))).allowance_level == 80
        await core.admin.set_role_allowance(8, None, actor_id=1)
        assert (await core.credits.balance(user, role_ids=(8,))).allowance_level == 30
        balance = await core.admin.set_user_allowance(user, 5, actor_id=1)
        assert (balance.allowance_level, balance.allowance_left) == (5, 5)
        assert (await core.credits.balance(user, role_ids=(7,))).allowance_level == 5
        balance = await core.admin.set_user_allowance(user, None, actor_id=1, role_ids=(7,))
        assert (balance.allowance_level, balance.allowance_override) == (50, None)
        clock.advance(days=1)
        assert (await core.credits.balance(user, role_ids=(7,))).allowance_left == 50
        await assert_consistent(core)
    finally:
        await core.close(2.0)


LEVELS = {"daily_allowance": 5, "role_allowances": {7: 20}, "cost_imagine": 10}
BIG = dict(width=512, height=512, steps=30, num_candidates=8)


async def test_a_level_that_drops_and_rises_again_gives_nothing_back(
    tmp_path: Path, clock: ManualClock
) -> None:
    core = await open_core(make_config(tmp_path, credits=LEVELS), clock)
    member = Owner(ALICE.user_id, role_ids=(7,))
    try:
        for seed in (1, 2):
            job = await core.scheduler.submit(member, request(seed=seed, **BIG))
            assert (await finished(core, job.id)).state is JobState.SUCCEEDED
        assert (await core.credits.balance(member.user_id, (7,))).allowance_left == 0
        for _ in range(3):  # the role is lost and gained again, three times
            lost = await core.credits.balance(member.user_id, role_ids=())
            assert (lost.allowance_level, lost.allowance_left) == (5, 0)
            regained = await core.credits.balance(member.user_id, role_ids=(7,))
            assert (regained.allowance_level, regained.allowance_left) == (20, 0)
        with pytest.raises(Refused) as refused:
            await core.scheduler.submit(member, request(seed=3, **BIG))
        assert refused.value.code is RefusalCode.INSUFFICIENT_CREDITS
        # The same through an admin override going down and up.
        await core.admin.set_user_allowance(member.user_id, 0, actor_id=1)
        balance = await core.admin.set_user_allowance(member.user_id, 30, actor_id=1)
        assert (balance.allowance_level, balance.allowance_left) == (30, 10)
        spent = [e for e in await core.credits.ledger(member.user_id) if e.kind is LedgerKind.HOLD]
        assert -sum(e.allowance_delta for e in spent) == 20
        await assert_consistent(core)
        # A new day starts from the level, whatever was used.
        clock.advance(days=1)
        assert (await core.credits.balance(member.user_id, (7,))).allowance_left == 30
        await assert_consistent(core)
    finally:
        await core.close(2.0)


async def test_a_refund_after_the_level_dropped_gives_back_at_most_the_level(
    tmp_path: Path, clock: ManualClock
) -> None:
    config = make_config(tmp_path, credits=LEVELS)
    core = await open_core(config, clock)
    member = Owner(ALICE.user_id, role_ids=(7,))
    blocker = await core.scheduler.submit(Owner(999), request("[slow] blocker", steps=60))
    try:
        first = await core.scheduler.submit(member, request(seed=1, **BIG))
        second = await core.scheduler.submit(member, request(seed=2, **BIG))
        assert (await core.credits.balance(member.user_id, ())).allowance_left == 0
        assert await core.scheduler.cancel(first.id)
        await finished(core, first.id)
        # Used 20 - 10 = 10 today, level 5: nothing is left, and the refund says why.
        balance = await core.credits.balance(member.user_id)
        assert (balance.allowance_level, balance.allowance_left) == (5, 0)
        assert await core.scheduler.cancel(second.id)
        await finished(core, second.id)
        assert (await core.credits.balance(member.user_id)).allowance_left == 5
        assert (await core.credits.balance(member.user_id, (7,))).allowance_left == 20
        refunds = [
            e for e in await core.credits.ledger(member.user_id) if e.kind is LedgerKind.REFUND
        ]
        assert [e.allowance_delta for e in reversed(refunds)] == [0, 5]
        await core.scheduler.cancel(blocker.id)
        await finished(core, blocker.id)
        await assert_consistent(core)
    finally:
        await core.close(2.0)


async def test_migration_derives_todays_use_from_what_is_left(
    tmp_path: Path, clock: ManualClock
) -> None:
    from bot.core.db import _MIGRATIONS

    config = make_config(tmp_path, credits=LEVELS)
    config.database_path.parent.mkdir(parents=True)
    conn = sqlite3.connect(config.database_path)
    for statement in _MIGRATIONS[1]:
        conn.execute(statement)
    conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    conn.execute("INSERT INTO schema_version VALUES (1)")
    today, now = "2025-03-01", "2025-03-01T11:00:00+00:00"
    conn.execute(
        "INSERT INTO balances (user_id, allowance_left, allowance_level, allowance_day) "
        "VALUES (?, 12, 20, ?)",
        (ALICE.user_id, today),
    )
    for kind, delta in (("allowance_topup", 20), ("allowance_adjust", -8)):
        conn.execute(
            "INSERT INTO ledger (user_id, amount, allowance_delta, granted_delta, kind, "
            "created_at) VALUES (?, ?, ?, 0, ?, ?)",
            (ALICE.user_id, delta, delta, kind, now),
        )
    conn.commit()
    conn.close()

    core = await open_core(config, clock)
    try:
        await assert_consistent(core)
        balance = await core.credits.balance(ALICE.user_id, role_ids=(7,))
        assert (balance.allowance_level, balance.allowance_left) == (20, 12)
        assert (await core.credits.balance(ALICE.user_id, role_ids=())).allowance_left == 0
        assert (await core.credits.balance(ALICE.user_id, role_ids=(7,))).allowance_left == 12
        await assert_consistent(core)
    finally:
        await core.close(2.0)


# ----- admin API ---------------------------------------------------------------------------------


async def test_admin_api_validates_amounts_and_ids(core: Core) -> None:
    with pytest.raises(ValueError, match=r"^amount:"):
        await core.admin.grant(ALICE.user_id, -5, actor_id=1)
    with pytest.raises(ValueError, match=r"^amount:"):
        await core.admin.grant(ALICE.user_id, 0, actor_id=1)
    with pytest.raises(ValueError, match=r"^amount:"):
        await core.admin.grant(ALICE.user_id, MAX_AMOUNT + 1, actor_id=1)
    with pytest.raises(ValueError, match=r"^amount:"):
        await core.admin.grant(ALICE.user_id, 2.5, actor_id=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^amount:"):
        await core.admin.grant(ALICE.user_id, True, actor_id=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^amount:"):
        await core.admin.set_balance(ALICE.user_id, -1, actor_id=1)
    with pytest.raises(ValueError, match=r"^user_id:"):
        await core.admin.grant(-3, 5, actor_id=1)
    with pytest.raises(ValueError, match=r"^amount:"):
        await core.admin.set_user_allowance(ALICE.user_id, 10**9)
    with pytest.raises(ValueError, match=r"^role_id:"):
        await core.admin.set_role_allowance(0, 5)
    with pytest.raises(ValueError, match=r"^reason:"):
        await core.admin.grant(ALICE.user_id, 5, actor_id=1, reason="x" * 501)
    with pytest.raises(ValueError, match=r"^limit:"):
        await core.admin.ledger(ALICE.user_id, limit=0)
    # Nothing above touched the ledger.
    assert await core.admin.ledger(ALICE.user_id) == []


async def test_grant_set_and_ledger(core: Core) -> None:
    balance = await core.admin.grant(ALICE.user_id, 50, actor_id=9, reason="patron")
    assert balance.granted == 50 and balance.available == 70
    balance = await core.admin.set_balance(ALICE.user_id, 12, actor_id=9)
    assert balance.granted == 12
    entries = await core.admin.ledger(ALICE.user_id)
    kinds = [e.kind for e in entries]
    assert kinds == [LedgerKind.SET, LedgerKind.GRANT, LedgerKind.ALLOWANCE_TOPUP]
    assert entries[0].amount == -38 and entries[0].actor_id == 9
    assert entries[1].reason == "patron"
    await assert_consistent(core)


async def test_a_grant_past_the_largest_balance_is_refused_and_writes_nothing(
    core: Core,
) -> None:
    # One grant moves at most MAX_AMOUNT: the largest balance takes many.
    for _ in range(MAX_BALANCE // MAX_AMOUNT - 1):
        await core.admin.grant(ALICE.user_id, MAX_AMOUNT, actor_id=9)
    balance = await core.admin.grant(ALICE.user_id, MAX_AMOUNT - 5, actor_id=9)
    assert balance.granted == MAX_BALANCE - 5
    rows = await core.db.read("SELECT id FROM ledger")
    with pytest.raises(ValueError, match=f"would exceed {MAX_BALANCE}"):
        await core.admin.grant(ALICE.user_id, 6, actor_id=9)
    assert (await core.credits.balance(ALICE.user_id)).granted == MAX_BALANCE - 5
    assert len(await core.db.read("SELECT id FROM ledger")) == len(rows)
    balance = await core.admin.grant(ALICE.user_id, 5, actor_id=9)
    assert balance.granted == MAX_BALANCE
    await assert_consistent(core)


async def test_banned_users_can_submit_nothing_and_lose_their_queue(
    tmp_path: Path, clock: ManualClock
) -> None:
    core = await open_core(make_config(tmp_path), clock)
    try:
        blocker = await core.scheduler.submit(Owner(999), request("[slow] blocker", steps=40))
        queued = await core.scheduler.submit(ALICE, request())
        assert await core.admin.ban(ALICE.user_id, actor_id=1, reason="spam") == 1
        assert (await finished(core, queued.id)).state is JobState.CANCELLED
        with pytest.raises(Refused) as refused:
            await core.scheduler.submit(ALICE, request())
        assert refused.value.reason == "You are banned from using this bot."
        balance = await core.credits.balance(ALICE.user_id)
        assert balance.banned and balance.available == 20
        audit = await core.admin.audit()
        assert audit[0].kind == "ban" and audit[0].reason == "spam"
        await core.admin.unban(ALICE.user_id, actor_id=1)
        job = await core.scheduler.submit(ALICE, request())
        await core.scheduler.cancel(blocker.id)
        assert (await finished(core, job.id)).state is JobState.SUCCEEDED
        await assert_consistent(core)
    finally:
        await core.close(2.0)


def test_resets_at_is_next_utc_midnight() -> None:
    from bot.core.clock import next_utc_midnight

    moment = datetime(2025, 3, 1, 23, 30, tzinfo=UTC) + timedelta(hours=-5)
    assert next_utc_midnight(moment) == datetime(2025, 3, 2, tzinfo=UTC)
