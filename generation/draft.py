"""Draft mode (`--draft`, Midjourney v7's): a fast, cheap render to choose from, and Enhance,
which renders a chosen draft image at full quality.

A draft is the member's job with fewer steps (`draft_steps`) and a sampler that gets far in
few steps (`draft_sampler`); the request keeps the job's own steps and sampler in
`GenerationRequest.draft`, so Enhance is the same request with those put back, the seed of
the chosen image and one candidate. Composition survives because both renders start from the
same seed's noise and both samplers are deterministic solvers of the same diffusion ODE: the
draft stops on a coarse path, the full render follows it finely. A sampler that adds fresh
noise at every step (ancestral, SDE, DDPM) would draw another picture from the same seed, so
it can't be the draft sampler (`check_draft_sampler`).

Pure: no torch, so the bot can build drafts and Enhance requests before queueing anything.
"""

from __future__ import annotations

from dataclasses import replace

from generation.contract import DRAFT_KINDS, Draft, GenerationRequest, Sampler

# Samplers that add fresh noise at every step: from one seed they draw a different picture at
# another step count, so a draft made with one would not show what Enhance renders.
STOCHASTIC_SAMPLERS = frozenset(
    {
        Sampler.DDPM,
        Sampler.EULER_A,
        Sampler.DPM2_A,
        Sampler.DPM2_A_KARRAS,
        Sampler.DPMPP_2M_SDE,
        Sampler.DPMPP_2M_SDE_KARRAS,
        Sampler.DPMPP_SDE,
        Sampler.DPMPP_SDE_KARRAS,
    }
)


def check_draft_sampler(sampler: Sampler) -> None:
    """ValueError (naming `draft_sampler`) unless `sampler` suits drafts: deterministic, so the
    draft shows the composition Enhance keeps, and one model call a step, so it is cheap."""
    if sampler in STOCHASTIC_SAMPLERS:
        raise ValueError(
            f"draft_sampler: {sampler.value} adds fresh noise at every step, so a draft would "
            "not show the picture Enhance renders from the same seed; use a deterministic one "
            "such as unipc, dpmpp_2m or ddim"
        )
    if sampler.model_calls_per_step > 1:
        raise ValueError(
            f"draft_sampler: {sampler.value} runs the model twice a step, which is not cheap; "
            "use one such as unipc, dpmpp_2m or ddim"
        )


def make_draft(request: GenerationRequest, *, steps: int, sampler: Sampler) -> GenerationRequest:
    """`request` as a draft: at most `steps` steps with `sampler`, remembering its own."""
    if request.kind not in DRAFT_KINDS:
        raise ValueError(f"--draft: a {request.kind.value} can't be a draft")
    if request.draft is not None:
        return request
    if request.sampler in STOCHASTIC_SAMPLERS:
        # Enhance renders with this sampler from the draft's seed, and it would draw another
        # picture there: the member would pay for one that is not the draft they chose.
        raise ValueError(
            f"--draft: {request.sampler.value} adds fresh noise at every step, so ✨ Enhance "
            "would draw another picture from the draft's seed; with --draft use a "
            "deterministic sampler (--sampler dpmpp_2m, unipc or ddim), or leave --draft out"
        )
    full = Draft(steps=request.steps, sampler=request.sampler)
    return replace(request, steps=min(steps, request.steps), sampler=sampler, draft=full)


def enhance_request(draft: GenerationRequest, seed: int) -> GenerationRequest:
    """Enhance: the draft image of `seed` rendered at full quality, one candidate (the one the
    member chose), with the job's own steps and sampler back."""
    if draft.draft is None:
        raise ValueError("enhance: only a draft can be enhanced")
    return replace(
        draft,
        steps=draft.draft.steps,
        sampler=draft.draft.sampler,
        draft=None,
        seed=seed,
        num_candidates=1,
        num_kept=1,
        chaos=0,
    )
