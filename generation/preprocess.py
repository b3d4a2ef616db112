"""Control maps: a member's picture turned into what a ControlNet was trained on.

Canny edges and line art come from OpenCV; depth from a transformers depth-estimation model
(DPT), loaded once and kept. Pose has no preprocessor here: an OpenPose skeleton is made
elsewhere and given with a ControlNet whose preprocessor is "none". The map is made at the
output size, so edge widths and depth detail match the image being generated, and is returned
to the bot to show beside the result. A picture of another shape than the image is fitted,
never squashed (`fit_picture`): cropped to cover it, or padded with black after the
preprocessor ran (a black bar is "nothing here" to every ControlNet; drawn first, its border
would become an edge).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from PIL import Image

from generation.settings import DEFAULT_DEPTH_MODEL, ControlFit, ControlNetSpec, Preprocessor

log = logging.getLogger(__name__)

# OpenCV's usual pair for photos (the thresholds the ControlNet canny model card uses).
CANNY_LOW = 100
CANNY_HIGH = 200


def canny(image: Image.Image, low: int = CANNY_LOW, high: int = CANNY_HIGH) -> Image.Image:
    """White edges on black, as an RGB image of the same size."""
    import cv2
    import numpy as np

    if not 0 <= low < high:
        raise ValueError(f"canny: thresholds must satisfy 0 <= low < high, got {low}, {high}")
    gray = np.asarray(image.convert("L"), dtype=np.uint8)
    edges = cv2.Canny(gray, low, high)
    return Image.fromarray(edges).convert("RGB")


# Line art: how far (in pixels at 512 px) a pixel is compared with its surroundings, how much
# darker than them it must be to count as a line, and how quickly a line reaches full white.
LINEART_SIGMA_AT_512 = 2.0
LINEART_FLOOR = 8
LINEART_GAIN = 4.0


def lineart(image: Image.Image) -> Image.Image:
    """The picture's lines, white on black (as line-art ControlNets expect), RGB, same size.

    A line is where the picture is darker than its neighbourhood: the difference between a
    Gaussian blur of the grey picture and the picture itself, amplified. Flat areas go black
    whatever their shade, and lines keep soft grey levels like a drawn stroke. It is a classical
    approximation of the learned annotator (lllyasviel's "lineart"), close on drawings and
    clean photos, noisier on textured ones.
    """
    import cv2
    import numpy as np

    gray = np.asarray(image.convert("L"), dtype=np.float32)
    sigma = max(1.0, LINEART_SIGMA_AT_512 * min(image.size) / 512)
    surroundings = cv2.GaussianBlur(gray, (0, 0), sigmaX=sigma)
    darker = np.clip((surroundings - gray) * LINEART_GAIN, 0, 255)
    darker[darker < LINEART_FLOOR] = 0
    return Image.fromarray(darker.round().astype(np.uint8)).convert("RGB")


# Shapes closer than this (relative difference of width/height) count as the same: rounding
# a size to multiples of 64 changes an aspect by up to a few percent.
SAME_SHAPE = 0.02


def _same_shape(picture: tuple[int, int], size: tuple[int, int]) -> bool:
    ratio = (picture[0] / picture[1]) / (size[0] / size[1])
    return abs(ratio - 1.0) <= SAME_SHAPE


def fit_box(picture: tuple[int, int], size: tuple[int, int], fit: ControlFit) -> tuple[int, ...]:
    """Where the scaled picture lies on a canvas of `size`: (left, top, width, height); for
    CROP it overhangs (negative left or top), for PAD it lies inside."""
    if _same_shape(picture, size):
        return (0, 0, *size)
    scale_w, scale_h = size[0] / picture[0], size[1] / picture[1]
    scale = max(scale_w, scale_h) if fit is ControlFit.CROP else min(scale_w, scale_h)
    width = max(1, round(picture[0] * scale))
    height = max(1, round(picture[1] * scale))
    return ((size[0] - width) // 2, (size[1] - height) // 2, width, height)


def fit_picture(image: Image.Image, size: tuple[int, int], fit: ControlFit) -> Image.Image:
    """`image` at `size`, its shape kept: scaled to cover and centre-cropped (CROP), or scaled
    to fit (PAD: the returned image is the fitted picture alone, `fit_box` says where it goes).
    A picture of (nearly) the image's shape is only resized."""
    left, top, width, height = fit_box(image.size, size, fit)
    scaled = (
        image
        if image.size == (width, height)
        else image.resize((width, height), Image.Resampling.LANCZOS)
    )
    if fit is ControlFit.CROP or (width, height) == size:
        return scaled.crop((-left, -top, -left + size[0], -top + size[1]))
    return scaled


def fit_note(picture: tuple[int, int], size: tuple[int, int], fit: ControlFit) -> str:
    """For the job's reply: how a control picture of another shape was fitted ("" when it had
    the image's shape)."""
    if _same_shape(picture, size):
        return ""
    wider = picture[0] / picture[1] > size[0] / size[1]
    shown = f"control picture ({picture[0]}x{picture[1]})"
    if fit is ControlFit.CROP:
        cut = "its left and right sides" if wider else "its top and bottom"
        return f"{shown} cropped to the image's shape ({size[0]}x{size[1]}): {cut} cut off"
    bars = "above and below" if wider else "left and right"
    return (
        f"{shown} fitted inside the image ({size[0]}x{size[1]}) with black bars {bars}, "
        "which the ControlNet leaves free"
    )


class Preprocessors:
    """Makes control maps; holds the model-based preprocessors once loaded."""

    def __init__(
        self, device: str, cache_dir: Path, local_files_only: bool, dtype: Any = None
    ) -> None:
        self.device = device
        self.cache_dir = cache_dir
        self.local_files_only = local_files_only
        self.dtype = dtype
        self._depth: dict[str, tuple[Any, Any]] = {}

    def control_map(
        self,
        image: Image.Image,
        spec: ControlNetSpec,
        size: tuple[int, int],
        fit: ControlFit = ControlFit.CROP,
    ) -> Image.Image:
        """`image` as `spec`'s ControlNet expects it, `size` (width, height), RGB; a picture of
        another shape fitted as `fit` says."""
        fitted = fit_picture(image.convert("RGB"), size, fit)
        mapped = self._map(fitted, spec)
        if mapped.size == size:
            return mapped
        # PAD: the map of the picture, centred on black.
        left, top, _, _ = fit_box(image.size, size, fit)
        canvas = Image.new("RGB", size, (0, 0, 0))
        canvas.paste(mapped, (left, top))
        return canvas

    def _map(self, image: Image.Image, spec: ControlNetSpec) -> Image.Image:
        preprocessor = spec.preprocessor
        if preprocessor is Preprocessor.CANNY:
            return canny(image)
        if preprocessor is Preprocessor.LINEART:
            return lineart(image)
        if preprocessor is Preprocessor.DEPTH:
            return self.depth(image, spec.preprocessor_model or DEFAULT_DEPTH_MODEL)
        if preprocessor is Preprocessor.NONE:
            return image
        accepted = ", ".join(p.value for p in Preprocessor)
        raise ValueError(
            f"preprocessor: ControlNet {spec.name!r} asks for unknown preprocessor "
            f"{preprocessor!r}; accepted: {accepted}"
        )

    def depth(self, image: Image.Image, source: str) -> Image.Image:
        """Relative depth (near is bright), normalised to 0–255, as RGB at `image`'s size."""
        import numpy as np
        import torch

        model, processor = self._depth_model(source)
        inputs = processor(images=image, return_tensors="pt")
        pixel_values = inputs["pixel_values"].to(self.device, model.dtype)
        with torch.inference_mode():
            predicted = model(pixel_values=pixel_values).predicted_depth
        depth = torch.nn.functional.interpolate(
            predicted.unsqueeze(1).float(),
            size=(image.height, image.width),
            mode="bicubic",
            align_corners=False,
        )[0, 0]
        low, high = float(depth.min()), float(depth.max())
        # A flat prediction has no relative depth to show: all mid-grey rather than a
        # division by zero.
        scaled = (depth - low) / (high - low) if high > low else torch.full_like(depth, 0.5)
        array = (scaled.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
        return Image.fromarray(np.ascontiguousarray(array)).convert("RGB")

    def _depth_model(self, source: str) -> tuple[Any, Any]:
        loaded = self._depth.get(source)
        if loaded is not None:
            return loaded
        from transformers import AutoImageProcessor, AutoModelForDepthEstimation

        started = time.perf_counter()
        kwargs: dict[str, Any] = {"local_files_only": self.local_files_only}
        if not Path(source).is_dir():
            kwargs["cache_dir"] = str(self.cache_dir / "hub")
        try:
            processor = AutoImageProcessor.from_pretrained(source, **kwargs)
            model = AutoModelForDepthEstimation.from_pretrained(source, **kwargs)
        except OSError as exc:
            raise RuntimeError(f"preprocessor: cannot load depth model {source!r} ({exc})") from exc
        model.to(self.device)
        if self.dtype is not None:
            model.to(self.dtype)
        model.eval()
        log.info("loaded depth model %s in %.2fs", source, time.perf_counter() - started)
        self._depth[source] = (model, processor)
        return model, processor

    def close(self) -> None:
        self._depth.clear()
