"""A job's starting picture in latent space, encoded once for all of its candidates.

Given a picture per candidate, diffusers' img2img and inpainting pipelines run the VAE encoder
once per candidate (twice for an inpainting canvas: the picture and the masked picture), eight
times over for one job and in float32 for SDXL's stock VAE, though every candidate starts from
the same picture. The engine encodes it here once and hands the pipeline the latents, repeated;
a pipeline given 4-channel latents skips its own encoder.

The encoder's posterior is taken at its mode (diffusers' `sample_mode="argmax"`) rather than
sampled with each candidate's generator: its spread is a rounding error next to the noise the
sampler adds, and a picture then has one latent whatever the candidate, so a candidate is the
same alone or in a batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from PIL import Image

from generation.decoding import kept_dtype

__all__ = ["EditLatents", "encode_edit", "encode_picture"]


def _pixels(pipe: Any, image: Image.Image) -> Any:
    """The picture as the pipeline would prepare it: (1, 3, H, W) float32 in [-1, 1]."""
    return pipe.image_processor.preprocess(image, height=image.height, width=image.width).float()


def _encode(pipe: Any, pixels: Any, *, upcast: bool, normalise: bool) -> Any:
    """VAE latents of `pixels`, scaled as the pipeline that takes them scales its own.

    `upcast`: SDXL pipelines encode in float32 when the VAE asks for it (`force_upcast`);
    `normalise`: SDXL img2img shifts and scales by the VAE's latents_mean/std when it has them
    (its inpainting pipeline does not).
    """
    import torch

    vae = pipe.vae
    device = pipe._execution_device
    with kept_dtype(vae), torch.inference_mode():
        if upcast and vae.dtype == torch.float16 and vae.config.force_upcast:
            vae.to(torch.float32)
        latents = vae.encode(pixels.to(device, vae.dtype)).latent_dist.mode().float()
    config = vae.config
    mean = getattr(config, "latents_mean", None)
    std = getattr(config, "latents_std", None)
    if normalise and mean is not None and std is not None:
        mean = torch.tensor(mean).view(1, -1, 1, 1).to(latents.device)
        std = torch.tensor(std).view(1, -1, 1, 1).to(latents.device)
        return (latents - mean) * config.scaling_factor / std
    return latents * config.scaling_factor


def encode_picture(pipe: Any, image: Image.Image, family: str) -> Any:
    """The img2img start (a variation, an upscale, an image prompt): (1, 4, h, w) latents."""
    sdxl = family == "sdxl"
    return _encode(pipe, _pixels(pipe, image), upcast=sdxl, normalise=sdxl)


@dataclass(frozen=True)
class EditLatents:
    """What an inpainting pipeline takes in place of the canvas picture, once per job."""

    # The canvas (4-channel UNet: the start and the kept latents blended back each step);
    # None for a 9-channel UNet at full strength, which never uses it.
    image: Any
    # The canvas with the painted area blanked, which a 9-channel UNet sees beside its latents;
    # a 4-channel UNet never looks at it, and gets the canvas latents again.
    masked: Any

    def pipeline_kwargs(self, count: int) -> dict[str, Any]:
        image = self.image if self.image is not None else self.masked
        return {
            "image": image.repeat(count, 1, 1, 1),
            "masked_image_latents": self.masked.repeat(count, 1, 1, 1),
        }


def encode_edit(
    pipe: Any, canvas: Image.Image, mask: Image.Image, family: str, *, needs_image: bool
) -> EditLatents:
    """The latents of an edit's canvas for `pipe` (an inpainting pipeline): one VAE encode.

    A 9-channel UNet needs the masked canvas (and the canvas itself only below full strength,
    `needs_image`); a 4-channel UNet needs only the canvas.
    """
    import torch

    upcast = family == "sdxl"
    pixels = _pixels(pipe, canvas)
    if pipe.unet.config.in_channels == 4:
        latents = _encode(pipe, pixels, upcast=upcast, normalise=False)
        return EditLatents(image=latents, masked=latents)
    # As the pipelines blank it: the painted area (mask >= 0.5 after binarising) set to 0.
    binary = pipe.mask_processor.preprocess(mask, height=canvas.height, width=canvas.width)
    masked_pixels = pixels * (binary < 0.5).to(torch.float32)
    masked = _encode(pipe, masked_pixels, upcast=upcast, normalise=False)
    image = _encode(pipe, pixels, upcast=upcast, normalise=False) if needs_image else None
    return EditLatents(image=image, masked=masked)
