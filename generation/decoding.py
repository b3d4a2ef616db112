"""Latents to images: the VAE decode a diffusers SD/SDXL pipeline does after its last step,
done by the engine itself so that running out of memory there costs a second decode, not the
denoising again. The VAE is shared between jobs, so every change to it is undone on exit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from PIL import Image


@contextlib.contextmanager
def vae_tiling(vae: Any, enabled: bool) -> Iterator[None]:
    """Tiled VAE decode for this call only; the VAE is shared, so the old state is restored."""
    if not enabled or not hasattr(vae, "enable_tiling"):
        yield
        return
    was_tiling = bool(getattr(vae, "use_tiling", False))
    vae.enable_tiling()
    try:
        yield
    finally:
        if not was_tiling:
            vae.disable_tiling()


@contextlib.contextmanager
def vae_slicing(vae: Any, enabled: bool) -> Iterator[None]:
    """One image per VAE call (`enabled`) or the whole batch in one, for this call only."""
    if not hasattr(vae, "use_slicing"):
        yield
        return
    was_slicing = bool(vae.use_slicing)
    vae.use_slicing = enabled
    try:
        yield
    finally:
        vae.use_slicing = was_slicing


@contextlib.contextmanager
def kept_dtype(module: Any) -> Iterator[None]:
    """Put `module` back in its dtype on exit, however the code inside changed it or failed.

    SDXL pipelines move a float16 VAE to float32 to encode and decode, and only move it back
    when that succeeded: the VAE is shared, so one failure would break every later job.
    """
    dtype = module.dtype
    try:
        yield
    finally:
        if module.dtype != dtype:
            module.to(dtype)


def decode_latents(
    pipe: Any, latents: Any, tiled: bool, upcast: bool, sliced: bool = True
) -> list[Image.Image]:
    """What a diffusers SD/SDXL pipeline does after its last step, to PIL images.

    `upcast`: SDXL's stock VAE overflows in float16 (`force_upcast` in its config), so it is
    decoded in float32, as its pipelines do; a fixed VAE (sdxl-vae-fp16-fix) stays in float16.
    `sliced`: one image at a time (the peak memory of one image), else all in one call.
    """
    import torch

    vae = pipe.vae
    with kept_dtype(vae), vae_tiling(vae, tiled), vae_slicing(vae, sliced):
        if upcast and vae.dtype == torch.float16 and vae.config.force_upcast:
            vae.to(torch.float32)
        latents = latents.to(dtype=vae.dtype)
        mean = getattr(vae.config, "latents_mean", None)
        std = getattr(vae.config, "latents_std", None)
        if mean is not None and std is not None:
            mean = torch.tensor(mean).view(1, -1, 1, 1).to(latents.device, latents.dtype)
            std = torch.tensor(std).view(1, -1, 1, 1).to(latents.device, latents.dtype)
            latents = latents * std / vae.config.scaling_factor + mean
        else:
            latents = latents / vae.config.scaling_factor
        decoded = vae.decode(latents, return_dict=False)[0]
    watermark = getattr(pipe, "watermark", None)
    if watermark is not None:
        decoded = watermark.apply_watermark(decoded)
    return list(pipe.image_processor.postprocess(decoded, output_type="pil"))
