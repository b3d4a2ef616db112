"""DPM++ SDE's step noise depends on the candidates' seeds alone: one Brownian tree per
candidate, built on the CPU in float32 whatever the latents' device and dtype. Half precision
stands in here for the GPU (no GPU on this machine): both made diffusers' own trees draw other
numbers than a CPU float32 run."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from generation.contract import Sampler
from generation.samplers import make_scheduler, seed_step_noise
from generation.tiny import sd15_scheduler

SHAPE = (4, 8, 8)


def first_step_noise(
    sampler: Sampler, seeds: list[int], dtype: torch.dtype, *, seeded: bool = True
) -> torch.Tensor:
    """The noise a DPM++ SDE scheduler draws between its first two sigmas, for latents of
    `dtype`, with the engine's seeding (or diffusers' own when not `seeded`)."""
    scheduler = make_scheduler(sampler, sd15_scheduler().config)
    if seeded:
        seed_step_noise(scheduler, seeds)
    else:
        scheduler.noise_sampler_seed = list(seeds)
    scheduler.set_timesteps(5)
    sample = torch.zeros((len(seeds), *SHAPE), dtype=dtype)
    scheduler.step(torch.zeros_like(sample), scheduler.timesteps[0], sample)
    sigmas = scheduler.sigmas
    return scheduler.noise_sampler(sigmas[0], sigmas[1])


@pytest.mark.parametrize("sampler", [Sampler.DPMPP_SDE, Sampler.DPMPP_SDE_KARRAS])
def test_the_noise_is_the_same_in_half_precision_and_per_candidate(sampler: Sampler) -> None:
    full = first_step_noise(sampler, [3, 4], torch.float32)
    half = first_step_noise(sampler, [3, 4], torch.bfloat16)
    assert half.dtype == torch.bfloat16 and half.device == full.device
    # The same numbers, rounded to the latents' dtype.
    assert torch.equal(half, full.to(torch.bfloat16))
    # Candidate 4's noise in the batch is its noise alone.
    alone = first_step_noise(sampler, [4], torch.float32)
    assert torch.equal(full[1], alone[0])
    assert not torch.equal(full[0], full[1])


def test_diffusers_own_trees_follow_the_latents_dtype() -> None:
    """Why the engine seeds the trees itself: left to diffusers, bfloat16 latents get a
    bfloat16 tree whose draws are not the float32 ones rounded."""
    full = first_step_noise(Sampler.DPMPP_SDE, [3, 4], torch.float32, seeded=False)
    try:
        half = first_step_noise(Sampler.DPMPP_SDE, [3, 4], torch.bfloat16, seeded=False)
    except (RuntimeError, TypeError):
        return  # it cannot even draw them
    assert not torch.equal(half, full.to(torch.bfloat16))


def test_other_samplers_are_left_alone() -> None:
    scheduler: Any = make_scheduler(Sampler.EULER_A, sd15_scheduler().config)
    step = scheduler.step
    seed_step_noise(scheduler, [1, 2])
    assert scheduler.step == step
