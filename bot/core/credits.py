"""Credits: integer amounts, an append-only ledger, and hold → settle | refund.

Long (about 750 lines) on purpose: the ledger is the one owner of every balance, and every rule
that moves credits (allowance, holds, settles, refunds, grants, the consistency check) runs
inside its transactions; split, those rules would each need the ledger's internals.

A user's spendable credits are two buckets in `balances`: today's free allowance
(`allowance_left`) and granted/purchased credits (`granted`). Every change to either bucket is a
ledger row carrying both deltas, so each balance can be recomputed from the ledger alone
(`check_consistency`).

Rules worth knowing:

* The daily allowance is reset to the user's level on the first touch of each UTC day (submit or
  balance lookup); unused allowance expires and never accumulates. The level is the user's
  override if an admin set one, else the highest level among the roles the member holds (admin
  settings in the database win over config per role), else `credits.daily_allowance`.
* What is left today is always derived from what was used today: `left = max(0, level - used)`.
  A level change (a role lost or gained, an admin override) applies at once, and can never give
  back what was already spent today, however often the level goes down and up.
* A hold takes allowance first, then granted credits, in ONE UPDATE that only matches when the
  two together cover the cost; the same statement records how much came from the allowance.
* A refund gives back exactly what the hold took. The allowance part reduces today's use (so
  what is left grows by at most that, up to the level) only while it is still the UTC day of
  the hold; after midnight it is dropped, because that
  allowance would have expired anyway and the user already got today's full allowance.
  (Refunding it as granted credits instead would let anyone turn free allowance into permanent
  credits by cancelling a job just after midnight.) The ledger row records what was returned.
* Settling records a zero-amount row: the credits already left the balance with the hold.

Costs (all integers, rounded up, at least 1 when the configured base cost is above 0):

* imagine (and a reroll of one): cost_imagine x pixels/512² x steps/30 x candidates/8 x calls
* variation (and its reroll):    cost_variation x pixels/512² x candidates/8 x calls
  (calls: 2 for samplers that evaluate the model twice a step, Heun, DPM2 and DPM++ SDE; else 1)
* upscale:                       cost_upscale x output pixels/1024² (a 2x upscale of 512²
                                 costs cost_upscale; width/height of an upscale are its output);
                                 a creative upscale the same with cost_upscale_creative
* zoom, pan, square, region:     cost_zoom / cost_pan / cost_square / cost_region, scaled like
                                 imagine by the canvas (width x height of the edit's output)
* describe (and its 🔄):          cost_describe, flat (no diffusion, one CLIP pass)
* shorten:                       cost_shorten, flat (one CLIP text pass; free by default)
* a draft (--draft):             cost_draft_percent of the same job at full quality (its own
                                 steps and sampler), rounded up, at least 1
* a ControlNet (imagine, variation, upscale) adds cost_controlnet_percent to the scaled cost
  before rounding: it runs beside the UNet at every step. LoRAs add nothing (a few small
  matrices beside layers the job runs anyway). Edits never carry a ControlNet.

A job's mode then scales its cost (`mode_cost`): relax takes a share, rounded down (free by
default), turbo a multiple, rounded up. A free relax job still has its hold, settle or refund
rows, of 0 credits, so every job goes through the same lifecycle and the same checks.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from datetime import datetime
from fractions import Fraction
from typing import Any

from bot.config import CreditsConfig, ModesConfig
from bot.core.clock import Clock, from_db, next_utc_midnight, to_db, utc_day
from bot.core.db import Database, Transaction
from bot.core.models import (
    Balance,
    ConsistencyReport,
    JobState,
    LedgerEntry,
    LedgerKind,
    Mode,
    RefusalCode,
    Refused,
)
from generation.contract import GenerationRequest, UpscaleMode
from generation.contract import JobKind as GenerationKind

log = logging.getLogger(__name__)

# Admin-entered amounts above this are typos, not intentions.
MAX_AMOUNT = 1_000_000
# A granted balance can never grow past this, whatever sequence of grants is made.
MAX_BALANCE = 100_000_000
MAX_REASON_CHARS = 500

BASE_PIXELS = 512 * 512
UPSCALE_BASE_PIXELS = 1024 * 1024
BASE_STEPS = 30
BASE_CANDIDATES = 8


_EDIT_COSTS: dict[GenerationKind, Callable[[CreditsConfig], int]] = {
    GenerationKind.ZOOM: lambda config: config.cost_zoom,
    GenerationKind.PAN: lambda config: config.cost_pan,
    GenerationKind.SQUARE: lambda config: config.cost_square,
    GenerationKind.REGION: lambda config: config.cost_region,
}


def job_cost(request: GenerationRequest, config: CreditsConfig) -> int:
    """Credits a request costs; see the module docstring for the formulas."""
    pixels = Fraction(request.width * request.height, BASE_PIXELS)
    candidates = Fraction(request.num_candidates, BASE_CANDIDATES)
    model_calls = request.sampler.model_calls_per_step
    if request.kind is GenerationKind.DESCRIBE:
        return max(0, config.cost_describe)
    if request.kind is GenerationKind.SHORTEN:
        return max(0, config.cost_shorten)
    if request.draft is not None:
        # The same job at full quality, then the draft's share of it.
        full = job_cost(
            replace(request, steps=request.draft.steps, sampler=request.draft.sampler, draft=None),
            config,
        )
        share = Fraction(full * config.cost_draft_percent, 100)
        return max(1, math.ceil(share)) if share > 0 else 0
    if request.kind is GenerationKind.IMAGINE or request.kind.is_edit:
        base = _EDIT_COSTS[request.kind](config) if request.kind.is_edit else config.cost_imagine
        scaled = base * pixels * Fraction(request.steps, BASE_STEPS) * candidates * model_calls
    elif request.kind is GenerationKind.VARIATION:
        base = config.cost_variation
        scaled = base * pixels * candidates * model_calls
    else:
        creative = request.upscale_mode is UpscaleMode.CREATIVE
        base = config.cost_upscale_creative if creative else config.cost_upscale
        scaled = base * Fraction(request.width * request.height, UPSCALE_BASE_PIXELS)
    if request.controlnet is not None:
        scaled *= 1 + Fraction(config.cost_controlnet_percent, 100)
    if base <= 0:
        return 0
    return max(1, math.ceil(scaled))


def mode_cost(cost: int, mode: Mode, config: ModesConfig) -> int:
    """What a job of fast cost `cost` costs in `mode`, in whole credits: fast as is; relax
    `relax_cost_percent` of it rounded down (a relax job never costs more than its share, and
    0 % is free); turbo `turbo_cost_percent` of it rounded up (never less than its multiple)."""
    if mode is Mode.RELAX:
        return cost * config.relax_cost_percent // 100
    if mode is Mode.TURBO:
        return -(-cost * config.turbo_cost_percent // 100)
    return cost


def check_user_id(user_id: Any, name: str = "user_id") -> int:
    if not isinstance(user_id, int) or isinstance(user_id, bool) or user_id <= 0:
        raise ValueError(f"{name}: must be a positive integer id, got {user_id!r}")
    return user_id


def check_amount(amount: Any, name: str = "amount", minimum: int = 0) -> int:
    if not isinstance(amount, int) or isinstance(amount, bool):
        raise ValueError(f"{name}: must be a whole number, got {amount!r}")
    if not minimum <= amount <= MAX_AMOUNT:
        raise ValueError(f"{name}: must be between {minimum} and {MAX_AMOUNT}, got {amount}")
    return amount


def check_reason(reason: Any) -> str:
    if not isinstance(reason, str):
        raise ValueError(f"reason: must be text, got {type(reason).__name__}")
    if len(reason) > MAX_REASON_CHARS:
        raise ValueError(f"reason: at most {MAX_REASON_CHARS} characters, got {len(reason)}")
    return reason


def describe_wait(until: datetime, now: datetime) -> str:
    seconds = max(0.0, (until - now).total_seconds())
    if seconds >= 3600:
        return f"{math.ceil(seconds / 3600)} h"
    return f"{max(1, math.ceil(seconds / 60))} min"


def legal_ledger_orders(state: JobState) -> tuple[tuple[str, ...], ...]:
    """The hold/settle/refund rows a job in `state` may have, in the order they are written: a
    queued or running job only its hold; a succeeded one its settle after it (and a refund
    after that when its result could never be delivered); any other end one refund."""
    if not state.terminal:
        return (("hold",),)
    if state is JobState.SUCCEEDED:
        return (("hold", "settle"), ("hold", "settle", "refund"))
    return (("hold", "refund"),)


class CreditsService:
    def __init__(self, db: Database, config: CreditsConfig, clock: Clock) -> None:
        self._db = db
        self._config = config
        self._clock = clock
        # Per-role levels set by admins; merged over config.role_allowances.
        self._role_overrides: dict[int, int] = {}

    async def load(self) -> None:
        rows = await self._db.read("SELECT role_id, amount FROM role_allowances")
        self._role_overrides = {int(r["role_id"]): int(r["amount"]) for r in rows}

    def cost(self, request: GenerationRequest) -> int:
        return job_cost(request, self._config)

    # ----- levels -------------------------------------------------------------------------

    def role_levels(self) -> dict[int, int]:
        return {**self._config.role_allowances, **self._role_overrides}

    def _level_from_roles(self, role_ids: Iterable[int]) -> int:
        levels = self.role_levels()
        matched = [levels[r] for r in role_ids if r in levels]
        return max(matched) if matched else self._config.daily_allowance

    # ----- inside transactions (used by the scheduler too) ----------------------------------

    async def touch(
        self,
        txn: Transaction,
        user_id: int,
        role_ids: Sequence[int] | None,
        actor_id: int | None = None,
    ) -> dict[str, Any]:
        """Create the balance row if needed, reset the allowance on a new UTC day, and apply a
        changed level; returns the row as it now stands.

        `role_ids=None` means "roles unknown": the level stays what it was last computed as.
        """
        now = self._clock()
        today = utc_day(now)
        await txn.execute(
            "INSERT OR IGNORE INTO balances (user_id, allowance_level) VALUES (?, ?)",
            (user_id, self._config.daily_allowance),
        )
        row = await txn.fetchone(
            "SELECT granted, allowance_left, allowance_used, allowance_level, allowance_day, "
            "allowance_override, banned FROM balances WHERE user_id = ?",
            (user_id,),
        )
        assert row is not None
        state = dict(row)
        if state["allowance_override"] is not None:
            level = int(state["allowance_override"])
        elif role_ids is not None:
            level = self._level_from_roles(role_ids)
        else:
            level = int(state["allowance_level"])
        left = int(state["allowance_left"])
        if state["allowance_day"] != today:
            delta = level - left
            await txn.execute(
                "UPDATE balances SET allowance_left = ?, allowance_used = 0, allowance_level = ?, "
                "allowance_day = ? WHERE user_id = ?",
                (level, level, today, user_id),
            )
            if delta:
                await self._append(
                    txn,
                    user_id,
                    LedgerKind.ALLOWANCE_TOPUP,
                    allowance_delta=delta,
                    reason=f"daily allowance for {today}: {level} (unused {left} expired)",
                    now=now,
                )
            state.update(
                allowance_left=level, allowance_used=0, allowance_level=level, allowance_day=today
            )
        elif level != state["allowance_level"]:
            # A new level applies at once (raising it helps today, lowering it cannot be
            # dodged until midnight), measured against what was already used today.
            new_left = max(0, level - int(state["allowance_used"]))
            await txn.execute(
                "UPDATE balances SET allowance_left = ?, allowance_level = ? WHERE user_id = ?",
                (new_left, level, user_id),
            )
            if new_left != left:
                await self._append(
                    txn,
                    user_id,
                    LedgerKind.ALLOWANCE_ADJUST,
                    allowance_delta=new_left - left,
                    reason=f"daily allowance level {state['allowance_level']} -> {level}",
                    actor_id=actor_id,
                    now=now,
                )
            state.update(allowance_left=new_left, allowance_level=level)
        return state

    async def hold(self, txn: Transaction, user_id: int, cost: int) -> tuple[int, int] | None:
        """Take `cost` credits, allowance first; returns (from_allowance, from_granted) or None
        when the balance is short. One statement: SQLite evaluates every SET expression
        against the row as it was, and the WHERE clause makes a short balance match nothing."""
        row = await txn.fetchone(
            "UPDATE balances SET "
            "  last_hold_allowance = min(allowance_left, :cost), "
            "  allowance_used = allowance_used + min(allowance_left, :cost), "
            "  allowance_left = allowance_left - min(allowance_left, :cost), "
            "  granted = granted - (:cost - min(allowance_left, :cost)) "
            "WHERE user_id = :user AND banned = 0 AND allowance_left + granted >= :cost "
            "RETURNING last_hold_allowance",
            {"cost": cost, "user": user_id},
        )
        if row is None:
            return None
        from_allowance = int(row[0])
        return from_allowance, cost - from_allowance

    async def record_hold(
        self, txn: Transaction, user_id: int, job_id: int, split: tuple[int, int], reason: str
    ) -> None:
        await self._append(
            txn,
            user_id,
            LedgerKind.HOLD,
            allowance_delta=-split[0],
            granted_delta=-split[1],
            job_id=job_id,
            reason=reason,
        )

    async def settle(self, txn: Transaction, user_id: int, job_id: int, cost: int) -> None:
        await self._append(
            txn, user_id, LedgerKind.SETTLE, job_id=job_id, reason=f"job succeeded, {cost} spent"
        )

    async def refund(
        self,
        txn: Transaction,
        job: dict[str, Any],
        reason: str,
        actor_id: int | None = None,
    ) -> int:
        """Give a job's hold back (see the module docstring for the allowance rule); returns
        the credits that came back."""
        user_id = int(job["user_id"])
        allowance, granted = int(job["hold_allowance"]), int(job["hold_granted"])
        row = await txn.fetchone(
            "SELECT allowance_left, allowance_used, allowance_level, allowance_day "
            "FROM balances WHERE user_id = ?",
            (user_id,),
        )
        if row is None:
            raise RuntimeError(f"refund: no balance row for user {user_id}")
        left, used = int(row["allowance_left"]), int(row["allowance_used"])
        same_day = row["allowance_day"] == job["hold_day"] == utc_day(self._clock())
        if same_day:
            used -= min(allowance, used)
            new_left = max(left, int(row["allowance_level"]) - used)
        else:
            new_left = left
        await txn.execute(
            "UPDATE balances SET granted = granted + ?, allowance_left = ?, allowance_used = ? "
            "WHERE user_id = ?",
            (granted, new_left, used, user_id),
        )
        back_to_allowance = new_left - left
        if allowance and not same_day:
            reason += f" ({allowance} from the {job['hold_day']} allowance had expired)"
        elif allowance > back_to_allowance:
            reason += f" ({allowance - back_to_allowance} above today's allowance level)"
        await self._append(
            txn,
            user_id,
            LedgerKind.REFUND,
            allowance_delta=back_to_allowance,
            granted_delta=granted,
            job_id=int(job["id"]),
            reason=reason,
            actor_id=actor_id,
        )
        return back_to_allowance + granted

    async def _append(
        self,
        txn: Transaction,
        user_id: int,
        kind: LedgerKind,
        *,
        allowance_delta: int = 0,
        granted_delta: int = 0,
        job_id: int | None = None,
        reason: str = "",
        actor_id: int | None = None,
        now: datetime | None = None,
    ) -> None:
        await txn.execute(
            "INSERT INTO ledger (user_id, amount, allowance_delta, granted_delta, kind, job_id, "
            "reason, actor_id, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                user_id,
                allowance_delta + granted_delta,
                allowance_delta,
                granted_delta,
                kind.value,
                job_id,
                reason,
                actor_id,
                to_db(now or self._clock()),
            ),
        )

    def insufficient(self, cost: int, state: dict[str, Any], jobs: int = 1) -> Refused:
        """The refusal of `jobs` jobs costing `cost` credits together."""
        have = int(state["allowance_left"]) + int(state["granted"])
        now = self._clock()
        wait = describe_wait(next_utc_midnight(now), now)
        what = "this costs" if jobs == 1 else f"these {jobs} jobs cost"
        return Refused(
            f"Not enough credits: {what} {cost}, you have {have} "
            f"(free allowance resets in {wait}).",
            RefusalCode.INSUFFICIENT_CREDITS,
        )

    # ----- service API ---------------------------------------------------------------------

    async def balance(self, user_id: int, role_ids: Sequence[int] | None = None) -> Balance:
        """The user's balance; also performs today's allowance top-up if it is due."""
        check_user_id(user_id)

        async def work(txn: Transaction) -> Balance:
            state = await self.touch(txn, user_id, role_ids)
            return await self._balance_from(txn, user_id, state)

        return await self._db.transaction(work)

    async def _balance_from(self, txn: Transaction, user_id: int, state: dict[str, Any]) -> Balance:
        held = await txn.fetchone(
            "SELECT COALESCE(SUM(cost), 0) FROM jobs WHERE user_id = ? AND state IN (?, ?)",
            (user_id, JobState.QUEUED.value, JobState.RUNNING.value),
        )
        override = state["allowance_override"]
        return Balance(
            user_id=user_id,
            granted=int(state["granted"]),
            allowance_left=int(state["allowance_left"]),
            allowance_level=int(state["allowance_level"]),
            resets_at=next_utc_midnight(self._clock()),
            banned=bool(state["banned"]),
            held=int(held[0]) if held else 0,
            allowance_override=None if override is None else int(override),
        )

    async def grant(
        self, user_id: int, amount: int, actor_id: int | None, reason: str = ""
    ) -> Balance:
        check_user_id(user_id)
        check_amount(amount, minimum=1)
        check_reason(reason)

        def added(granted: int) -> int:
            if granted + amount > MAX_BALANCE:
                raise ValueError(f"amount: the balance would exceed {MAX_BALANCE}")
            return granted + amount

        return await self._change_granted(
            user_id, added, LedgerKind.GRANT, reason or "granted by an admin", actor_id
        )

    async def revoke(
        self, user_id: int, amount: int, actor_id: int | None, reason: str = ""
    ) -> Balance:
        """Take `amount` granted credits back, in one transaction with the check that the member
        has them (a read-then-set from outside could race a grant or a hold)."""
        check_user_id(user_id)
        check_amount(amount, minimum=1)
        check_reason(reason)

        def taken(granted: int) -> int:
            if amount > granted:
                raise ValueError(
                    f"amount: the member has {granted} granted credits, fewer than {amount}"
                )
            return granted - amount

        return await self._change_granted(
            user_id, taken, LedgerKind.REVOKE, reason or "revoked by an admin", actor_id
        )

    async def set_balance(
        self, user_id: int, amount: int, actor_id: int | None, reason: str = ""
    ) -> Balance:
        """Set the granted credits (not the daily allowance) to exactly `amount`."""
        check_user_id(user_id)
        check_amount(amount)
        check_reason(reason)
        return await self._change_granted(
            user_id,
            lambda _granted: amount,
            LedgerKind.SET,
            reason or f"balance set to {amount} by an admin",
            actor_id,
        )

    async def _change_granted(
        self,
        user_id: int,
        new_granted: Callable[[int], int],
        kind: LedgerKind,
        reason: str,
        actor_id: int | None,
    ) -> Balance:
        """What an admin's grant, revoke or set does: `new_granted` turns the member's granted
        credits into the new amount (or raises ValueError to refuse), read and written in one
        transaction with its ledger row."""

        async def work(txn: Transaction) -> Balance:
            state = await self.touch(txn, user_id, None)
            granted = int(state["granted"])
            changed = new_granted(granted)
            await txn.execute(
                "UPDATE balances SET granted = ? WHERE user_id = ?", (changed, user_id)
            )
            await self._append(
                txn,
                user_id,
                kind,
                granted_delta=changed - granted,
                reason=reason,
                actor_id=actor_id,
            )
            state["granted"] = changed
            return await self._balance_from(txn, user_id, state)

        return await self._db.transaction(work)

    async def set_user_allowance(
        self,
        user_id: int,
        amount: int | None,
        actor_id: int | None = None,
        role_ids: Sequence[int] | None = None,
    ) -> Balance:
        """Give one user their own daily allowance level; None goes back to role/config levels
        (computed from `role_ids` if given, else from no roles until the member is next seen).
        The new level applies to what is left today."""
        check_user_id(user_id)
        if amount is not None:
            check_amount(amount)

        async def work(txn: Transaction) -> Balance:
            await self.touch(txn, user_id, None)
            await txn.execute(
                "UPDATE balances SET allowance_override = ? WHERE user_id = ?", (amount, user_id)
            )
            roles = () if role_ids is None else role_ids
            state = await self.touch(txn, user_id, roles, actor_id)
            return await self._balance_from(txn, user_id, state)

        return await self._db.transaction(work)

    async def set_role_allowance(
        self, role_id: int, amount: int | None, actor_id: int | None = None
    ) -> None:
        """Daily allowance level for members of a role (None: back to config); applies the next
        time a member with that role is seen."""
        check_user_id(role_id, "role_id")
        if amount is not None:
            check_amount(amount)
        now = to_db(self._clock())

        async def work(txn: Transaction) -> None:
            if amount is None:
                await txn.execute("DELETE FROM role_allowances WHERE role_id = ?", (role_id,))
            else:
                await txn.execute(
                    "INSERT INTO role_allowances (role_id, amount, actor_id, updated_at) "
                    "VALUES (?, ?, ?, ?) ON CONFLICT(role_id) DO UPDATE SET "
                    "amount = excluded.amount, actor_id = excluded.actor_id, "
                    "updated_at = excluded.updated_at",
                    (role_id, amount, actor_id, now),
                )

            def apply() -> None:
                if amount is None:
                    self._role_overrides.pop(role_id, None)
                else:
                    self._role_overrides[role_id] = amount

            txn.after_commit(apply)

        await self._db.transaction(work)

    async def set_banned(self, txn: Transaction, user_id: int, banned: bool) -> None:
        await self.touch(txn, user_id, None)
        await txn.execute(
            "UPDATE balances SET banned = ? WHERE user_id = ?", (int(banned), user_id)
        )

    async def is_banned(self, user_id: int) -> bool:
        row = await self._db.read_one("SELECT banned FROM balances WHERE user_id = ?", (user_id,))
        return bool(row and row[0])

    async def ledger(
        self,
        user_id: int,
        limit: int = 20,
        guild_id: int | None = None,
        before_id: int | None = None,
    ) -> list[LedgerEntry]:
        """The user's most recent ledger rows, newest first. With `guild_id`, only the rows of
        jobs made in that server, and those of no job (grants, balances set). With
        `before_id`, only rows older than that one (keyset paging: a page never shifts as
        rows are appended)."""
        check_user_id(user_id)
        if not isinstance(limit, int) or not 1 <= limit <= 1000:
            raise ValueError(f"limit: must be between 1 and 1000, got {limit!r}")
        if before_id is not None:
            check_user_id(before_id, "before_id")
        if guild_id is None:
            rows = await self._db.read(
                "SELECT * FROM ledger WHERE user_id = ? AND (? IS NULL OR id < ?) "
                "ORDER BY id DESC LIMIT ?",
                (user_id, before_id, before_id, limit),
            )
        else:
            rows = await self._db.read(
                "SELECT l.* FROM ledger l LEFT JOIN jobs j ON j.id = l.job_id "
                "WHERE l.user_id = ? AND (l.job_id IS NULL OR j.guild_id = ?) "
                "AND (? IS NULL OR l.id < ?) ORDER BY l.id DESC LIMIT ?",
                (user_id, guild_id, before_id, before_id, limit),
            )
        return [
            LedgerEntry(
                id=int(r["id"]),
                user_id=int(r["user_id"]),
                amount=int(r["amount"]),
                allowance_delta=int(r["allowance_delta"]),
                granted_delta=int(r["granted_delta"]),
                kind=LedgerKind(r["kind"]),
                job_id=r["job_id"],
                reason=r["reason"],
                actor_id=r["actor_id"],
                created_at=from_db(r["created_at"]),  # type: ignore[arg-type]
            )
            for r in rows
        ]

    async def check_consistency(self) -> ConsistencyReport:
        """Recompute every balance from the ledger and check every job's hold was settled or
        refunded exactly once (or is still open because the job is active)."""

        async def work(txn: Transaction) -> ConsistencyReport:
            problems: list[str] = []
            sums = {
                int(r["user_id"]): (int(r["a"]), int(r["g"]))
                for r in await txn.fetchall(
                    "SELECT user_id, SUM(allowance_delta) AS a, SUM(granted_delta) AS g "
                    "FROM ledger GROUP BY user_id"
                )
            }
            balances = await txn.fetchall(
                "SELECT user_id, allowance_left, allowance_used, allowance_level, granted "
                "FROM balances"
            )
            seen = set()
            for row in balances:
                user = int(row["user_id"])
                seen.add(user)
                expected = sums.get(user, (0, 0))
                actual = (int(row["allowance_left"]), int(row["granted"]))
                if actual != expected:
                    problems.append(
                        f"user {user}: balance (allowance {actual[0]}, granted {actual[1]}) but "
                        f"ledger says (allowance {expected[0]}, granted {expected[1]})"
                    )
                if actual[0] < 0 or actual[1] < 0:
                    problems.append(f"user {user}: negative balance {actual}")
                derived = max(0, int(row["allowance_level"]) - int(row["allowance_used"]))
                if actual[0] != derived:
                    problems.append(
                        f"user {user}: allowance left {actual[0]} but level "
                        f"{row['allowance_level']} - used {row['allowance_used']} gives {derived}"
                    )
            for user in set(sums) - seen:
                problems.append(f"user {user}: ledger rows but no balance row")

            jobs = await txn.fetchall(
                "SELECT j.id, j.state, j.cost, j.hold_allowance, j.hold_granted, "
                "  SUM(CASE WHEN l.kind = 'hold' THEN l.allowance_delta END) AS hold_a, "
                "  SUM(CASE WHEN l.kind = 'hold' THEN l.granted_delta END) AS hold_g, "
                "  SUM(CASE WHEN l.kind = 'settle' THEN l.amount END) AS settle_amount, "
                "  SUM(CASE WHEN l.kind = 'refund' THEN l.allowance_delta END) AS refund_a, "
                "  SUM(CASE WHEN l.kind = 'refund' THEN l.granted_delta END) AS refund_g "
                "FROM jobs j LEFT JOIN ledger l ON l.job_id = j.id GROUP BY j.id"
            )
            # Each job's hold/settle/refund rows in the order they were written.
            orders: dict[int, list[str]] = {}
            for r in await txn.fetchall(
                "SELECT job_id, kind FROM ledger WHERE job_id IS NOT NULL "
                "AND kind IN ('hold', 'settle', 'refund') ORDER BY id"
            ):
                orders.setdefault(int(r["job_id"]), []).append(str(r["kind"]))
            held = 0
            for job in jobs:
                jid, state = int(job["id"]), JobState(job["state"])
                a, g = int(job["hold_allowance"]), int(job["hold_granted"])
                if a + g != int(job["cost"]):
                    problems.append(f"job {jid}: hold split {a}+{g} != cost {job['cost']}")
                if not state.terminal:
                    held += a + g
                order = tuple(orders.get(jid, ()))
                legal = legal_ledger_orders(state)
                if order not in legal:
                    allowed = " or ".join(f"({', '.join(o)})" for o in legal)
                    problems.append(
                        f"job {jid}: {state.value} with ledger rows "
                        f"({', '.join(order) or 'none'}); expected {allowed} in that order"
                    )
                    continue
                if (job["hold_a"], job["hold_g"]) != (-a, -g):
                    problems.append(f"job {jid}: expected one hold row of ({-a}, {-g})")
                if "settle" in order and job["settle_amount"] != 0:
                    problems.append(f"job {jid}: a settle moves no credits")
                # A refund gives back the granted part; the allowance part only on its day.
                if "refund" in order and (job["refund_g"] != g or not 0 <= job["refund_a"] <= a):
                    problems.append(
                        f"job {jid}: refund ({job['refund_a']}, {job['refund_g']}) does not "
                        f"match hold ({a}, {g})"
                    )
            orphans = await txn.fetchone(
                "SELECT COUNT(*) FROM ledger WHERE kind IN ('hold', 'settle', 'refund') "
                "AND (job_id IS NULL OR job_id NOT IN (SELECT id FROM jobs))"
            )
            if orphans and orphans[0]:
                problems.append(f"{orphans[0]} hold/settle/refund rows without a job")
            totals = {
                str(r[0]): int(r[1])
                for r in await txn.fetchall("SELECT kind, SUM(amount) FROM ledger GROUP BY kind")
            }
            count = await txn.fetchone("SELECT COUNT(*) FROM ledger")
            return ConsistencyReport(
                ok=not problems,
                problems=tuple(problems),
                users_checked=len(seen | set(sums)),
                jobs_checked=len(jobs),
                ledger_rows=int(count[0]) if count else 0,
                credits_held=held,
                totals_by_kind=totals,
            )

        return await self._db.transaction(work)
