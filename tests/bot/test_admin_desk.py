"""The admin desk (bot/app/admin.py) both front ends call: its rights, its scoping, the rows it
writes, its pages and its live view, on a real core with a real SQLite file. The core has no
worker, so submitted jobs stay queued where the tests can look at them."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from bot.app.access import AdminScope
from bot.app.actions import Actor
from bot.app.admin import (
    OWNER_ONLY,
    AdminDesk,
    AdminOp,
    AdminRefused,
    AdminSeat,
    AuditFilter,
    Membership,
    admin_servers,
    open_desk,
    seat_for,
)
from bot.app.application import ImagineApp, open_core
from bot.app.live import LiveBoard
from bot.config import Config, DiscordConfig
from bot.core.clock import system_clock
from bot.core.models import LedgerKind
from tests.bot.test_bad_input import _config

MAIN, SECOND, STRANGER = 1001, 1002, 1003
OWNER, MOD_ROLE = 7, 555
ALICE, BOB, CAROL = 11, 12, 13  # Alice and Carol are members of MAIN, Bob of SECOND
owner = AdminSeat(OWNER, AdminScope.OWNER, SECOND)
main_admin = AdminSeat(21, AdminScope.SERVER, MAIN)
second_admin = AdminSeat(22, AdminScope.SERVER, SECOND)
nobody = AdminSeat(23, AdminScope.NONE, MAIN)


def _settings() -> DiscordConfig:
    return DiscordConfig(
        guild_ids=(MAIN, SECOND),
        admin_user_ids=frozenset({OWNER}),
        admin_role_ids=frozenset({MOD_ROLE}),
    )


@dataclasses.dataclass
class Desk:
    desk: AdminDesk
    board: LiveBoard
    app: ImagineApp
    config: Config


@pytest.fixture
async def d(tmp_path: Path) -> AsyncIterator[Desk]:
    config = _config(tmp_path)
    settings = _settings()
    discord = dataclasses.replace(
        config.discord,
        guild_ids=settings.guild_ids,
        admin_user_ids=settings.admin_user_ids,
        admin_role_ids=settings.admin_role_ids,
    )
    config = dataclasses.replace(config, discord=discord)
    core = await open_core(config, lambda _c: False, workers=[], workers_join_later=True)
    try:
        desk = open_desk(core)
        board = LiveBoard(desk, core.scheduler.add_listener, system_clock)
        yield Desk(desk, board, ImagineApp(config, core), config)
    finally:
        await core.close(drain_timeout_s=1.0)


async def _tables(d: Desk) -> dict[str, list[tuple[Any, ...]]]:
    state = {}
    for table in ("ledger", "balances", "role_allowances", "audit", "settings", "jobs"):
        rows = await d.app.core.db.read(f"SELECT * FROM {table} ORDER BY rowid")
        state[table] = [tuple(row) for row in rows]
    return state


async def test_a_grant_writes_one_grant_row_by_the_admin_with_the_reason(d: Desk) -> None:
    balance = await d.desk.grant(owner, ALICE, 40, "prize")
    assert balance.granted == 40
    (row,) = await d.app.core.db.read("SELECT * FROM ledger WHERE kind = 'grant'")
    assert (row["user_id"], row["granted_delta"], row["actor_id"], row["reason"]) == (
        ALICE,
        40,
        OWNER,
        "prize",
    )
    report = await d.app.core.credits.check_consistency()
    assert report.ok, report


async def test_a_revoke_takes_back_granted_credits_and_never_more(d: Desk) -> None:
    await d.desk.grant(owner, ALICE, 10)
    balance = await d.desk.revoke(owner, ALICE, 4, "too generous")
    assert balance.granted == 6
    with pytest.raises(ValueError, match="has 6 granted credits, fewer than 7"):
        await d.desk.revoke(owner, ALICE, 7)
    assert (await d.desk.balance(owner, ALICE)).granted == 6
    page = await d.desk.ledger(owner, ALICE)
    revoke = page.items[0]
    assert (revoke.kind, revoke.granted_delta, revoke.actor_id, revoke.reason) == (
        LedgerKind.REVOKE,
        -4,
        OWNER,
        "too generous",
    )
    assert (await d.app.core.credits.check_consistency()).ok


async def _everything(d: Desk, seat: AdminSeat) -> dict[AdminOp, Any]:
    """Every operation, each tried once; what each raised (or None)."""
    calls = {
        AdminOp.CREDITS_GRANT: lambda: d.desk.grant(seat, ALICE, 1_000_000),
        AdminOp.CREDITS_REVOKE: lambda: d.desk.revoke(seat, ALICE, 1),
        AdminOp.CREDITS_SET: lambda: d.desk.set_balance(seat, ALICE, 0),
        AdminOp.CREDITS_SHOW: lambda: d.desk.balance(seat, ALICE),
        AdminOp.QUOTA_USER: lambda: d.desk.set_user_allowance(seat, ALICE, 1_000_000),
        AdminOp.QUOTA_ROLE: lambda: d.desk.set_role_allowance(seat, MOD_ROLE, 1_000_000),
        AdminOp.QUOTAS_SHOW: lambda: d.desk.allowance_tiers(seat),
        AdminOp.BAN: lambda: d.desk.ban(seat, ALICE, "gone"),
        AdminOp.UNBAN: lambda: d.desk.unban(seat, ALICE),
        AdminOp.LEDGER: lambda: d.desk.ledger(seat, ALICE),
        AdminOp.AUDIT: lambda: d.desk.audit(seat),
        AdminOp.QUEUE_SHOW: lambda: d.desk.queue(seat),
        AdminOp.QUEUE_PAUSE: lambda: d.desk.pause(seat),
        AdminOp.QUEUE_RESUME: lambda: d.desk.resume(seat),
    }
    outcome: dict[AdminOp, Any] = {}
    for op, call in calls.items():
        try:
            await call()
            outcome[op] = None
        except AdminRefused as exc:
            outcome[op] = exc
    try:
        d.desk.workers(seat)
        outcome[AdminOp.WORKERS] = None
    except AdminRefused as exc:
        outcome[AdminOp.WORKERS] = exc
    return outcome


async def test_a_server_admin_is_refused_what_every_server_shares_and_changes_nothing(
    d: Desk,
) -> None:
    await d.desk.grant(owner, ALICE, 5)
    before = await _tables(d)
    outcome = await _everything(d, main_admin)
    assert set(outcome) == set(AdminOp)
    refused = {op for op, error in outcome.items() if error is not None}
    assert refused == OWNER_ONLY
    for op in refused:
        assert "only the bot's owners" in str(outcome[op]), op
    # Reading a balance touches today's allowance row; nothing else may differ.
    after = await _tables(d)
    assert {k: v for k, v in after.items() if k != "balances"} == {
        k: v for k, v in before.items() if k != "balances"
    }


async def test_a_non_admin_is_refused_everything(d: Desk) -> None:
    before = await _tables(d)
    outcome = await _everything(d, nobody)
    assert all(error is not None for error in outcome.values()), outcome
    assert all("Only this server's managers" in str(e) for e in outcome.values())
    assert await _tables(d) == before


async def test_an_owner_may_do_everything(d: Desk) -> None:
    outcome = await _everything(d, owner)
    assert outcome == {op: None for op in AdminOp}


async def _wait_queued(d: Desk, count: int) -> None:
    for _ in range(200):
        if d.app.core.scheduler.queued_count >= count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"fewer than {count} jobs queued")


async def test_a_server_admin_sees_their_servers_part_of_ledger_audit_queue_only(
    d: Desk,
) -> None:
    await d.desk.grant(owner, ALICE, 100)
    await d.desk.grant(owner, BOB, 100)
    (alice_job,) = await d.app.imagine(Actor(ALICE, MAIN, 1), "a lighthouse")
    (alice_there,) = await d.app.imagine(Actor(ALICE, SECOND, 2), "a harbour")
    (bob_job,) = await d.app.imagine(Actor(BOB, SECOND, 2), "a boat")
    await d.app.core.audit.record("prompt_blocked", "word", user_id=ALICE, guild_id=MAIN)
    await d.app.core.audit.record("prompt_blocked", "word", user_id=BOB, guild_id=SECOND)
    await d.desk.ban(owner, CAROL, "spam")

    ledger = await d.desk.ledger(main_admin, ALICE, 50)
    jobs = {e.job_id for e in ledger.items}
    assert alice_job.job.id in jobs and alice_there.job.id not in jobs
    assert any(e.kind is LedgerKind.GRANT for e in ledger.items)
    everything = await d.desk.ledger(owner, ALICE, 50)
    assert alice_there.job.id in {e.job_id for e in everything.items}

    audit = await d.desk.audit(main_admin, 50)
    assert [(e.user_id, e.guild_id) for e in audit.items] == [(ALICE, MAIN)]
    assert {e.kind for e in (await d.desk.audit(owner, 50)).items} == {"prompt_blocked", "ban"}

    queue = await d.desk.queue(second_admin)
    assert {a.job.id for a in queue.queued} == {alice_there.job.id, bob_job.job.id}
    live = await d.board.view(second_admin)
    assert {w.job_id for w in live.waiting} == {alice_there.job.id, bob_job.job.id}
    assert live.workers is None and live.backend is None
    full = await d.board.view(owner)
    assert {w.job_id for w in full.waiting} == {
        alice_job.job.id,
        alice_there.job.id,
        bob_job.job.id,
    }
    assert full.workers == () and full.backend == "local worker processes"
    assert sorted(w.position or 0 for w in full.waiting) == [1, 2, 3]
    assert all(w.waited_s >= 0 for w in full.waiting)


async def test_ledger_and_audit_pages_follow_each_other_without_gaps_or_repeats(
    d: Desk,
) -> None:
    for amount in range(1, 8):
        await d.desk.grant(owner, ALICE, amount, f"grant {amount}")
        await d.app.core.audit.record("prompt_blocked", f"r{amount}", user_id=ALICE, guild_id=MAIN)
    seen: list[str] = []
    before = None
    while True:
        page = await d.desk.ledger(owner, ALICE, 3, before)
        seen += [e.reason for e in page.items]
        # Rows written while paging never shift the pages that follow.
        await d.desk.grant(owner, ALICE, 100, "meanwhile")
        if page.next_before is None:
            break
        before = page.next_before
    # The first touch of the day tops up the allowance: the oldest row.
    assert seen == [f"grant {n}" for n in range(7, 0, -1)] + [seen[-1]]
    assert "allowance" in seen[-1]

    reasons: list[str] = []
    cursor = None
    while True:
        audit = await d.desk.audit(owner, 2, AuditFilter(kinds=("prompt_blocked",)), cursor)
        reasons += [e.reason for e in audit.items]
        if audit.next_before is None:
            break
        cursor = audit.next_before
    assert reasons == [f"r{n}" for n in range(7, 0, -1)]


async def test_audit_filters_by_kind_member_and_date(d: Desk) -> None:
    core = d.app.core
    await core.audit.record("prompt_blocked", "a", user_id=ALICE, guild_id=MAIN)
    await core.audit.record("nsfw_flag", "b", user_id=CAROL, guild_id=MAIN)
    await d.desk.pause(owner)
    page = await d.desk.audit(owner, 10, AuditFilter(kinds=("nsfw_flag", "pause")))
    assert [e.kind for e in page.items] == ["pause", "nsfw_flag"]
    page = await d.desk.audit(main_admin, 10, AuditFilter(user_id=CAROL))
    assert [e.reason for e in page.items] == ["b"]
    now = system_clock()
    assert (await d.desk.audit(owner, 10, AuditFilter(since=now + timedelta(hours=1)))).items == ()
    assert (await d.desk.audit(owner, 10, AuditFilter(until=now - timedelta(hours=1)))).items == ()
    window = AuditFilter(since=now - timedelta(hours=1), until=now + timedelta(hours=1))
    assert len((await d.desk.audit(owner, 10, window)).items) == 3
    with pytest.raises(ValueError, match="kind: 'drop table'"):
        await d.desk.audit(owner, 10, AuditFilter(kinds=("drop table",)))
    with pytest.raises(ValueError, match="limit"):
        await d.desk.audit(owner, 1000)


async def test_the_live_views_follow_a_submit_and_end_when_closing(d: Desk) -> None:
    closing = asyncio.Event()
    views = d.board.views(main_admin, poll_s=0.05, refresh_s=60, closing=closing)
    first = await anext(views)
    assert first is not None and first.waiting == ()
    (job,) = await d.app.imagine(Actor(ALICE, MAIN, 1), "a lighthouse")
    await _wait_queued(d, 1)
    for _ in range(100):
        view = await anext(views)
        if view is not None:
            break
    assert view is not None and [w.job_id for w in view.waiting] == [job.job.id]
    # Another server's job changes nothing this admin sees: only ticks.
    await d.app.imagine(Actor(BOB, SECOND, 2), "a boat")
    await _wait_queued(d, 2)
    ticks = [await anext(views) for _ in range(5)]
    assert ticks == [None] * 5
    closing.set()
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(anext(views), 2)


class Roles:
    """The servers as a front end would report them (the edge the web asks)."""

    def __init__(self, members: dict[tuple[int, int], Membership]) -> None:
        self.members = members
        self.asked: list[tuple[int, int]] = []

    def owner_ids(self) -> frozenset[int]:
        return frozenset({OWNER, 8})

    async def membership(self, guild_id: int, user_id: int) -> Membership | None:
        self.asked.append((guild_id, user_id))
        return self.members.get((guild_id, user_id))


async def test_seats_off_discord_follow_the_same_rule_as_in_an_interaction() -> None:
    settings = _settings()
    roles = Roles(
        {
            (MAIN, 30): Membership((), manage_guild=True),
            (MAIN, 31): Membership((MOD_ROLE,), manage_guild=False),
            (MAIN, 32): Membership((MAIN,), manage_guild=False),  # @everyone only
            (STRANGER, 33): Membership((), manage_guild=True),
        }
    )

    async def scope(user: int, guild: int | None) -> AdminScope:
        return (await seat_for(settings, roles, user, guild)).scope

    assert await scope(OWNER, None) is AdminScope.OWNER
    assert await scope(8, STRANGER) is AdminScope.OWNER  # the application's owner
    assert await scope(30, MAIN) is AdminScope.SERVER
    assert await scope(31, MAIN) is AdminScope.SERVER
    assert await scope(32, MAIN) is AdminScope.NONE
    assert await scope(30, SECOND) is AdminScope.NONE  # not a member there
    assert await scope(33, STRANGER) is AdminScope.NONE  # an unlisted server
    assert await scope(30, None) is AdminScope.NONE
    # An unlisted server is never even asked about.
    assert (STRANGER, 33) not in roles.asked
    assert await admin_servers(settings, roles, 30) == (MAIN,)
    assert await admin_servers(settings, roles, OWNER) == (MAIN, SECOND)


async def test_a_server_admin_looks_only_at_members_of_their_server(d: Desk) -> None:
    roles = Roles({(MAIN, ALICE): Membership((MOD_ROLE,), False)})
    membership = await d.desk.require_member(main_admin, roles, ALICE, "alice")
    assert membership is not None and membership.role_ids == (MOD_ROLE,)
    with pytest.raises(AdminRefused, match="bob isn't a member of this server"):
        await d.desk.require_member(main_admin, roles, BOB, "bob")
    # Owners look at anyone.
    assert await d.desk.require_member(owner, roles, BOB, "bob") is None


def test_a_servers_own_settings_are_its_admins_and_the_owners(d: Desk) -> None:
    d.desk.check_server(main_admin, MAIN)
    d.desk.check_server(owner, MAIN)
    with pytest.raises(AdminRefused, match="only your own server's settings"):
        d.desk.check_server(second_admin, MAIN)
    with pytest.raises(AdminRefused, match="Only this server's managers"):
        d.desk.check_server(nobody, MAIN)
