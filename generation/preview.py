"""Live previews: the candidates as they stand mid-job, cheaply, a few times per job.

Decoding latents with the VAE costs about as much as a denoising step; a linear map from the 4
latent channels to RGB costs nothing and shows the composition and colours well enough for a
progress message. The factors are the per-family least-squares fits that ComfyUI and
AUTOMATIC1111 use for their "approximate" previews (SD 1.x/2.x and SDXL latents differ).
A model may name a tiny VAE decoder instead (`preview_decoder`, diffusers' AutoencoderTiny,
i.e. TAESD): real detail and colours for a few milliseconds on a GPU.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from PIL import Image

from generation.images import make_grid, png_bytes

# latent channel -> (r, g, b) contribution, and a per-colour offset.
_FACTORS: dict[str, tuple[tuple[float, float, float], ...]] = {
    "sd": (
        (0.3512, 0.2297, 0.3227),
        (0.3250, 0.4974, 0.2350),
        (-0.2829, 0.1762, 0.2721),
        (-0.2120, -0.2616, -0.7177),
    ),
    "sdxl": (
        (0.3651, 0.4232, 0.4341),
        (-0.2533, -0.0042, 0.1068),
        (0.1076, 0.1111, -0.0362),
        (-0.3165, -0.2492, -0.2188),
    ),
}
_BIAS: dict[str, tuple[float, float, float]] = {
    "sd": (0.0, 0.0, 0.0),
    "sdxl": (0.1084, -0.0175, -0.0011),
}
# A preview shows at most this many candidates (Midjourney's 2x2), each at most this wide.
MAX_PREVIEW_IMAGES = 4
MAX_CELL_SIDE = 128


def latents_to_images(latents: Any, family: str) -> list[Image.Image]:
    """One small RGB image per latent (a latent pixel per 8x8 image pixel, doubled)."""
    import torch

    if family not in _FACTORS:
        raise ValueError(f"family: no preview factors for {family!r}")
    if latents.dim() != 4 or latents.shape[1] != 4:
        raise ValueError(f"latents: expected (batch, 4, h, w), got {tuple(latents.shape)}")
    factors = torch.tensor(_FACTORS[family], dtype=torch.float32)
    bias = torch.tensor(_BIAS[family], dtype=torch.float32)
    latents = latents[:MAX_PREVIEW_IMAGES].detach().to("cpu", torch.float32)
    rgb = torch.einsum("bchw,cr->bhwr", latents, factors) + bias
    pixels = ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    images = []
    for array in pixels:
        image = Image.fromarray(array)
        scale = max(1, min(2, MAX_CELL_SIDE // max(image.size)))
        if scale > 1:
            image = image.resize((image.width * scale, image.height * scale))
        images.append(image)
    return images


def decoded_images(latents: Any, decoder: Any) -> list[Image.Image]:
    """One small RGB image per latent through a tiny VAE decoder (AutoencoderTiny). Latents
    larger than a preview cell needs (the decoder upsamples 8x) are area-averaged down first:
    a 1024 px SDXL image decodes at cell size, 64 times less work than at full size."""
    import torch

    parameter = next(decoder.parameters())
    config = decoder.config
    latents = latents[:MAX_PREVIEW_IMAGES].detach()
    height, width = latents.shape[-2:]
    scale = (MAX_CELL_SIDE // 8) / max(height, width)
    if scale < 1:
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        latents = torch.nn.functional.interpolate(latents.float(), size=size, mode="area")
    latents = latents.to(parameter.device, parameter.dtype) / config.scaling_factor
    with torch.inference_mode():
        pixels = decoder.decode(latents + config.shift_factor).sample
    arrays = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    images = []
    for array in arrays.permute(0, 2, 3, 1).cpu().numpy():
        image = Image.fromarray(array)
        image.thumbnail((MAX_CELL_SIDE, MAX_CELL_SIDE))
        images.append(image)
    return images


def preview_png(latents: Any, family: str, decoder: Any = None) -> bytes:
    """A small grid of the current candidates as PNG bytes: through `decoder` when there is
    one, else the family's linear map."""
    if decoder is not None:
        return png_bytes(make_grid(decoded_images(latents, decoder)))
    return png_bytes(make_grid(latents_to_images(latents, family)))


class Previewer:
    """Makes a preview at most every `interval_s` (and never for the last step: the result is
    about to arrive), so previews cost little whatever the step count."""

    def __init__(
        self,
        family: str,
        interval_s: float,
        monotonic: Callable[[], float] = time.monotonic,
        decoder: Any = None,
    ) -> None:
        if interval_s < 0:
            raise ValueError(f"interval_s: must be at least 0, got {interval_s}")
        self.family = family
        self.interval_s = interval_s
        self.decoder = decoder
        self._monotonic = monotonic
        self._last: float | None = None

    def maybe(self, latents: Any, step: int, total: int) -> bytes | None:
        if step >= total:
            return None
        now = self._monotonic()
        if self._last is not None and now - self._last < self.interval_s:
            return None
        self._last = now
        return preview_png(latents, self.family, self.decoder)
