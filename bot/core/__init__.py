"""The core between the front ends and the GPU: jobs, fair scheduling, workers and credits.

No Discord types anywhere in here, and nothing imports torch at module level: the worker child
process is the only place the generation engine is loaded. Start with `Core.open(config)`.
"""

from bot.core.clock import Clock, ManualClock, system_clock
from bot.core.credits import MAX_AMOUNT, job_cost
from bot.core.execute import WorkItem, WorkOutcome
from bot.core.models import (
    ActiveJob,
    AuditEntry,
    Balance,
    CancelNotSaved,
    ConsistencyReport,
    Delivery,
    EndingDelayed,
    Finished,
    ImageExpired,
    Job,
    JobEvent,
    JobKind,
    JobResult,
    JobState,
    LedgerEntry,
    LedgerKind,
    Mode,
    Owner,
    ProgressUpdate,
    Queued,
    QueueSnapshot,
    RefusalCode,
    Refused,
    Started,
)
from bot.core.scheduler import Scheduler, Subscription
from bot.core.service import AdminService, Core
from bot.core.workers import InProcessWorker, ProcessWorker, Worker

__all__ = [
    "MAX_AMOUNT",
    "ActiveJob",
    "AdminService",
    "AuditEntry",
    "Balance",
    "CancelNotSaved",
    "Clock",
    "ConsistencyReport",
    "Core",
    "Delivery",
    "EndingDelayed",
    "Finished",
    "ImageExpired",
    "InProcessWorker",
    "Job",
    "JobEvent",
    "JobKind",
    "JobResult",
    "JobState",
    "LedgerEntry",
    "LedgerKind",
    "ManualClock",
    "Mode",
    "Owner",
    "ProcessWorker",
    "ProgressUpdate",
    "QueueSnapshot",
    "Queued",
    "RefusalCode",
    "Refused",
    "Scheduler",
    "Started",
    "Subscription",
    "WorkItem",
    "WorkOutcome",
    "Worker",
    "job_cost",
    "system_clock",
]
