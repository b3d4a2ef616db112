"""Samplers as users name them (generation.contract.Sampler) to diffusers schedulers, and where
their noise comes from.

What a seed reproduces, per sampler. Every candidate's starting noise comes from its own CPU
`torch.Generator` (seed + i), so it is the same numbers on any device and in a batch or alone.
After that:

- DDIM, Euler, Heun, LMS, DPM2, DPM++ 2M, UniPC (with or without Karras sigmas) add no noise
  while sampling: a seed reproduces the image on any device, alone or in a batch, up to the
  device's floating-point rounding (a few 1/255 steps at most in float16).
- DDPM, Euler a, DPM2 a and DPM++ 2M SDE add fresh noise each step, drawn from the same
  per-candidate CPU generators the pipeline passes to the scheduler: the same as above.
- DPM++ SDE (and its Karras form) draws its noise from a Brownian tree. diffusers builds the
  tree on the latents' device and in their dtype, so CUDA's generator (not the CPU's) and half
  precision would change the numbers; `seed_step_noise` builds one tree per candidate, seeded
  with its seed, on the CPU in float32, and moves each draw to the latents: the same as above.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from generation.contract import Sampler


def make_scheduler(sampler: Sampler, base_config: Any) -> Any:
    """A fresh diffusers scheduler for `sampler`, keeping the model's own noise schedule.

    `from_config` keeps what the model was trained with (betas, prediction type, offsets), so
    v-prediction SD 2.x models stay correct whatever the sampler. The mapping from AUTOMATIC1111
    names follows the table in diffusers' scheduler documentation; "DPM++ SDE" is the
    k-diffusion stochastic sampler A1111 runs (DPMSolverSDEScheduler, on torchsde).
    """
    import diffusers

    name, options = _SCHEDULERS[sampler]
    karras = sampler.value.endswith("_karras")
    if karras:
        options = {**options, "use_karras_sigmas": True}
    return getattr(diffusers, name).from_config(base_config, **options)


_DPMPP_2M = {"algorithm_type": "dpmsolver++", "solver_order": 2}
_DPMPP_2M_SDE = {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}
# Sampler -> (diffusers scheduler class, options); a "_karras" sampler adds Karras sigmas.
_SCHEDULERS: dict[Sampler, tuple[str, dict[str, Any]]] = {
    Sampler.DDIM: ("DDIMScheduler", {}),
    Sampler.DDPM: ("DDPMScheduler", {}),
    Sampler.EULER: ("EulerDiscreteScheduler", {}),
    Sampler.EULER_A: ("EulerAncestralDiscreteScheduler", {}),
    Sampler.HEUN: ("HeunDiscreteScheduler", {}),
    Sampler.LMS: ("LMSDiscreteScheduler", {}),
    Sampler.LMS_KARRAS: ("LMSDiscreteScheduler", {}),
    Sampler.DPM2: ("KDPM2DiscreteScheduler", {}),
    Sampler.DPM2_KARRAS: ("KDPM2DiscreteScheduler", {}),
    Sampler.DPM2_A: ("KDPM2AncestralDiscreteScheduler", {}),
    Sampler.DPM2_A_KARRAS: ("KDPM2AncestralDiscreteScheduler", {}),
    Sampler.DPMPP_2M: ("DPMSolverMultistepScheduler", _DPMPP_2M),
    Sampler.DPMPP_2M_KARRAS: ("DPMSolverMultistepScheduler", _DPMPP_2M),
    Sampler.DPMPP_2M_SDE: ("DPMSolverMultistepScheduler", _DPMPP_2M_SDE),
    Sampler.DPMPP_2M_SDE_KARRAS: ("DPMSolverMultistepScheduler", _DPMPP_2M_SDE),
    Sampler.DPMPP_SDE: ("DPMSolverSDEScheduler", {}),
    Sampler.DPMPP_SDE_KARRAS: ("DPMSolverSDEScheduler", {}),
    Sampler.UNIPC: ("UniPCMultistepScheduler", {}),
}


def seed_step_noise(scheduler: Any, seeds: Sequence[int]) -> None:
    """Make a Brownian-tree sampler's (DPM++ SDE's) step noise depend on the candidates' seeds
    alone: one tree per candidate, seeded with its seed, on the CPU in float32 whatever the
    latents' device and dtype. Other schedulers are left as they are."""
    if not hasattr(scheduler, "noise_sampler_seed"):
        return
    import torch
    from diffusers.schedulers.scheduling_dpmsolver_sde import BrownianTreeNoiseSampler

    scheduler.noise_sampler_seed = list(seeds)
    original = scheduler.step

    # `wraps` keeps step's signature, which diffusers inspects for a `generator` argument.
    @functools.wraps(original)
    def step(model_output: Any, timestep: Any, sample: Any, *args: Any, **kwargs: Any) -> Any:
        if scheduler.noise_sampler is None:  # set_timesteps clears it before each call
            sigmas = scheduler.sigmas.detach().to("cpu", torch.float32)
            on_cpu = BrownianTreeNoiseSampler(
                torch.zeros(sample.shape, dtype=torch.float32),
                float(sigmas[sigmas > 0].min()),
                float(sigmas.max()),
                list(seeds),
            )

            def draw(sigma: Any, sigma_next: Any) -> Any:
                noise = on_cpu(_cpu_scalar(sigma), _cpu_scalar(sigma_next))
                return noise.to(sample.device, sample.dtype)

            scheduler.noise_sampler = draw
        return original(model_output, timestep, sample, *args, **kwargs)

    scheduler.step = step


def _cpu_scalar(value: Any) -> Any:
    import torch

    return torch.as_tensor(value).detach().to("cpu", torch.float32)
