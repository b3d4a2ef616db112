"""The core's vocabulary: jobs, owners, balances, ledger rows, events and refusals.

Everything is a frozen dataclass or a `str` enum with no Discord types, so the Discord front end,
the console front end and the tests all speak the same language.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from generation.contract import CandidateEmbeddings


class JobKind(StrEnum):
    IMAGINE = "imagine"
    VARIATION = "variation"
    UPSCALE = "upscale"
    # Same settings as the parent job with a new seed; the request says what is generated.
    REROLL = "reroll"
    # Post-grid edits of one image (generation.outpaint): each a new grid.
    ZOOM = "zoom"
    PAN = "pan"
    SQUARE = "square"
    REGION = "region"
    # Prompt suggestions for a member's picture; the result has texts and no images.
    DESCRIBE = "describe"
    # Which words of a prompt matter to CLIP and shorter prompts (texts, no images).
    SHORTEN = "shorten"
    # A draft's image rendered at full quality (the request is the draft's kind, without it).
    ENHANCE = "enhance"


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    # Generated, but withheld by the output check (moderation); refunded like a failure.
    REFUSED = "refused"

    @property
    def terminal(self) -> bool:
        return self not in (JobState.QUEUED, JobState.RUNNING)


ACTIVE_STATES = (JobState.QUEUED, JobState.RUNNING)


class Mode(StrEnum):
    """How a job is scheduled and charged (bot/core/mode_queue.py, credits.mode_cost): every
    waiting turbo job starts before any fast job, every fast one before any relax one."""

    TURBO = "turbo"
    FAST = "fast"
    RELAX = "relax"

    @property
    def rank(self) -> int:
        """Dispatch order: lower starts first."""
        return _MODE_RANKS[self]


_MODE_RANKS = {Mode.TURBO: 0, Mode.FAST: 1, Mode.RELAX: 2}


class LedgerKind(StrEnum):
    ALLOWANCE_TOPUP = "allowance_topup"
    ALLOWANCE_ADJUST = "allowance_adjust"
    GRANT = "grant"
    # Granted credits taken back by an owner (a negative granted_delta, never below zero).
    REVOKE = "revoke"
    SET = "set"
    HOLD = "hold"
    SETTLE = "settle"
    REFUND = "refund"


class RefusalCode(StrEnum):
    BANNED = "banned"
    PAUSED = "paused"
    CLOSING = "closing"
    USER_QUEUE_FULL = "user_queue_full"
    QUEUE_FULL = "queue_full"
    INSUFFICIENT_CREDITS = "insufficient_credits"
    INVALID = "invalid"
    # Relax mode is switched off where the member asked for it, or a relax cap is reached.
    RELAX_OFF = "relax_off"
    RELAX_LIMIT = "relax_limit"


class Refused(Exception):
    """A submit that was turned away at once; nothing was queued and nothing was charged.

    `reason` is written for the user and can be shown as is.
    """

    def __init__(self, reason: str, code: RefusalCode = RefusalCode.INVALID) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


class CancelNotSaved(Exception):
    """A cancel that could not be written to the database (the disk is full, the database is
    locked), so it was not acknowledged and nothing changed: the job goes on. An acknowledged
    cancel must outlive a restart, which only a written one does. `reason` is written for the
    user and can be shown as is."""

    def __init__(self, job_id: int) -> None:
        self.job_id = job_id
        self.reason = (
            f"Job {job_id} could not be cancelled just now (the bot could not save the "
            "cancel); it is still going. Please try again in a moment."
        )
        super().__init__(self.reason)


EXPIRED_MESSAGE = "This image has expired: old results are deleted to save space."


class ImageExpired(LookupError):
    """The job's images were deleted by the retention policy (`[storage]`); the message is
    written for the user."""

    def __init__(self, job_id: int) -> None:
        super().__init__(EXPIRED_MESSAGE)
        self.job_id = job_id
        self.reason = EXPIRED_MESSAGE


@dataclass(frozen=True)
class Owner:
    user_id: int
    guild_id: int | None = None
    channel_id: int | None = None
    # The member's Discord roles at submit time: they decide allowance level and priority tier.
    role_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class JobResult:
    """What a succeeded job produced. Paths are relative to the data folder."""

    image_paths: tuple[str, ...]
    grid_path: str | None
    seeds: tuple[int, ...]
    clip_scores: tuple[float, ...]
    timings_s: Mapping[str, float] = field(default_factory=dict)
    candidate_indices: tuple[int, ...] = ()
    width: int = 0
    height: int = 0
    # A describe's prompt suggestions (it has no images).
    texts: tuple[str, ...] = ()
    # The map a ControlNet followed (edges, depth …), shown beside the result.
    control_map_path: str | None = None
    # Whether the member's taste (--p) took part in the ranking.
    personalized: bool = False
    # Every ranked candidate's compact CLIP embedding: stored in its own table with the job's
    # end (bot/core/taste.py), never in the result's JSON.
    embeddings: CandidateEmbeddings | None = field(default=None, compare=False, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "personalized": self.personalized,
            "texts": list(self.texts),
            "control_map_path": self.control_map_path,
            "image_paths": list(self.image_paths),
            "grid_path": self.grid_path,
            "seeds": list(self.seeds),
            "clip_scores": list(self.clip_scores),
            "timings_s": dict(self.timings_s),
            "candidate_indices": list(self.candidate_indices),
            "width": self.width,
            "height": self.height,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> JobResult:
        return cls(
            image_paths=tuple(data["image_paths"]),
            grid_path=data.get("grid_path"),
            seeds=tuple(int(s) for s in data["seeds"]),
            clip_scores=tuple(float(s) for s in data["clip_scores"]),
            timings_s=dict(data.get("timings_s", {})),
            candidate_indices=tuple(data.get("candidate_indices", ())),
            width=int(data.get("width", 0)),
            height=int(data.get("height", 0)),
            texts=tuple(str(t) for t in data.get("texts", ())),
            control_map_path=data.get("control_map_path"),
            personalized=bool(data.get("personalized", False)),
        )


@dataclass(frozen=True)
class Job:
    id: int
    owner: Owner
    kind: JobKind
    # The generation request as stored (GenerationRequest.to_json()); the source image of a
    # variation/upscale is a file, see `init_image_path` and `JobStore.request`.
    request_data: Mapping[str, Any]
    state: JobState
    cost: int
    attempts: int
    created_at: datetime
    parent_job_id: int | None = None
    parent_index: int | None = None
    init_image_path: str | None = None
    tier: int = 0
    error: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    result: JobResult | None = None
    # When the retention policy deleted the job's image files (the row and result stay).
    images_expired_at: datetime | None = None
    # When the retention policy erased the job's prompt, request and result (the row stays
    # with what the ledger needs: owner, kind, state, cost and holds).
    pruned_at: datetime | None = None
    mode: Mode = Mode.FAST

    @property
    def images_expired(self) -> bool:
        return self.images_expired_at is not None

    @property
    def prompt(self) -> str:
        return str(self.request_data.get("prompt", ""))

    @property
    def seed(self) -> int:
        return int(self.request_data.get("seed", 0))

    def image_path(self, data_dir: Path, index: int) -> Path:
        """Absolute path of kept image `index` (0-based, best first) of a succeeded job;
        raises ImageExpired once the retention policy deleted it."""
        if self.result is None:
            raise LookupError(f"job {self.id} has no result ({self.state.value})")
        if self.images_expired:
            raise ImageExpired(self.id)
        if not 0 <= index < len(self.result.image_paths):
            raise IndexError(f"index: job {self.id} has {len(self.result.image_paths)} images")
        return data_dir / self.result.image_paths[index]

    def grid_file(self, data_dir: Path) -> Path | None:
        if self.result is None or self.result.grid_path is None:
            return None
        return data_dir / self.result.grid_path


@dataclass(frozen=True)
class Balance:
    user_id: int
    granted: int
    allowance_left: int
    allowance_level: int
    resets_at: datetime
    banned: bool
    # Credits held by this user's queued and running jobs (already taken from the two above).
    held: int = 0
    allowance_override: int | None = None

    @property
    def available(self) -> int:
        return self.granted + self.allowance_left


@dataclass(frozen=True)
class LedgerEntry:
    id: int
    user_id: int
    amount: int
    allowance_delta: int
    granted_delta: int
    kind: LedgerKind
    job_id: int | None
    reason: str
    actor_id: int | None
    created_at: datetime


@dataclass(frozen=True)
class AuditEntry:
    id: int
    kind: str
    user_id: int | None
    actor_id: int | None
    job_id: int | None
    guild_id: int | None
    channel_id: int | None
    reason: str
    prompt: str | None
    created_at: datetime


@dataclass(frozen=True)
class ActiveJob:
    job: Job
    # 1 = next to run; None while running.
    position: int | None


@dataclass(frozen=True)
class QueueSnapshot:
    paused: bool
    running: tuple[ActiveJob, ...]
    queued: tuple[ActiveJob, ...]
    worker_slots: int


@dataclass(frozen=True)
class ConsistencyReport:
    ok: bool
    problems: tuple[str, ...]
    users_checked: int
    jobs_checked: int
    ledger_rows: int
    # Credits held by queued/running jobs right now.
    credits_held: int
    # Sum of ledger amounts per kind, e.g. {"hold": -40, "refund": 12, "grant": 100}.
    totals_by_kind: Mapping[str, int]

    def __str__(self) -> str:
        head = "ledger consistent" if self.ok else f"{len(self.problems)} problems"
        return (
            f"{head}: {self.users_checked} users, {self.jobs_checked} jobs, "
            f"{self.ledger_rows} ledger rows, {self.credits_held} held"
            + "".join(f"\n  - {p}" for p in self.problems[:20])
        )


@dataclass(frozen=True)
class Delivery:
    """What the front end recorded about delivering one part (e.g. "result") of a job."""

    job_id: int
    key: str
    state: str  # "claimed" | "done" | "undelivered" (can never be delivered; refunded)
    info: Mapping[str, Any]
    updated_at: datetime


# Events the scheduler emits for a job; the front end renders one message per job from them.
@dataclass(frozen=True)
class Queued:
    job_id: int
    position: int


@dataclass(frozen=True)
class Started:
    job_id: int
    attempt: int


@dataclass(frozen=True)
class ProgressUpdate:
    job_id: int
    step: int
    total: int
    # A small PNG of the candidates so far, when the job asked for previews; an update without
    # one leaves the last preview standing.
    preview_png: bytes | None = field(default=None, repr=False, compare=False)

    @property
    def fraction(self) -> float:
        return self.step / self.total if self.total else 0.0


@dataclass(frozen=True)
class EndingDelayed:
    """The job's run is over but how it ended (settled, refunded or re-queued) could not be
    written yet, `failures` times: the core keeps trying, and nothing is charged twice."""

    job_id: int
    failures: int


@dataclass(frozen=True)
class Finished:
    job: Job

    @property
    def job_id(self) -> int:
        return self.job.id


JobEvent = Queued | Started | ProgressUpdate | EndingDelayed | Finished
