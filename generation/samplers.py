"""Samplers as users name them (generation.contract.Sampler) to diffusers schedulers."""

from __future__ import annotations

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
