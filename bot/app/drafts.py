"""What a member is told about a draft (`--draft`, generation/draft.py): what it cost beside
the full render it stands in for, and how to get that render (✨ Enhance)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from bot.config import CreditsConfig, ModesConfig
from bot.core.credits import job_cost, mode_cost
from bot.core.models import Job
from generation.contract import GenerationRequest


def is_draft(job: Job) -> bool:
    return bool(job.request_data.get("draft"))


def draft_notes(
    job: Job, request: GenerationRequest, credits: CreditsConfig, modes: ModesConfig
) -> tuple[str, ...]:
    """The reply's line for a draft: its cost beside the same job's at full quality, both in
    the mode the job runs in (`job.cost` is the mode's price already)."""
    if request.draft is None:
        return ()
    fast = job_cost(
        replace(request, steps=request.draft.steps, sampler=request.draft.sampler, draft=None),
        credits,
    )
    full = mode_cost(fast, job.mode, modes)
    return (
        f"💨 Draft: {_credits(job.cost)} instead of {_credits(full)} at full quality; press "
        "✨ Enhance under an image to render it at full quality (an ordinary job)",
    )


def _credits(amount: Any) -> str:
    return f"{amount} credit{'s' if amount != 1 else ''}"
