"""Small helpers shared by the generation tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from generation.contract import GenerationRequest, JobKind
from generation.settings import EngineSettings, ModelSpec


def imagine(**changes: object) -> GenerationRequest:
    """A small, fast IMAGINE request; tests change only what they are about."""
    values: dict[str, object] = {
        "kind": JobKind.IMAGINE,
        "prompt": "a lighthouse at dusk",
        "width": 64,
        "height": 64,
        "steps": 4,
        "seed": 42,
        "num_candidates": 2,
        "num_kept": 2,
    }
    values.update(changes)
    return GenerationRequest(**values)  # type: ignore[arg-type]


def tiny_settings(tiny_cache: Path, *models: ModelSpec, **changes: object) -> EngineSettings:
    """Offline settings on the CPU over the tiny model (or `models`), with `changes`."""
    values: dict[str, object] = {
        "models": models or (ModelSpec("tiny", "tiny", base_resolution=128),),
        "cache_dir": tiny_cache,
        "device": "cpu",
        "local_files_only": True,
        **changes,
    }
    return EngineSettings(**values)  # type: ignore[arg-type]


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


# The same picture rendered by two code paths (offloaded or not, say) may differ by a rounding
# step where the CPU's kernels order a sum differently, in float16 above all: seen here, 9 % of
# the values off by 1/255 (mean 0.09). A wrong picture is far outside these limits: the same job
# with another image prompt differs by 6.8/255 on average (73 at most), with none by 12.6.
SAME_PICTURE_MEAN_DIFF = 0.5
SAME_PICTURE_MAX_DIFF = 4


def assert_same_picture(a: Image.Image, b: Image.Image) -> None:
    """Equal within rounding: what "the same result" means across code paths, since bit
    equality depends on the machine's kernels."""
    diff = np.abs(pixels(a) - pixels(b))
    assert diff.max() <= SAME_PICTURE_MAX_DIFF and diff.mean() <= SAME_PICTURE_MEAN_DIFF, (
        f"pictures differ: mean {diff.mean():.3f}, max {diff.max()} (/255)"
    )


def max_diff(a: Image.Image, b: Image.Image) -> int:
    return int(np.abs(pixels(a) - pixels(b)).max())
