"""How the engine is set up: which models, where they are cached, and on what device."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from generation.contract import Sampler

# `source = "tiny"` resolves to random-weight models built in code (generation.tiny); anything
# else is a Hugging Face hub id or a local diffusers folder, loaded with `from_pretrained`.
TINY = "tiny"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    source: str
    # Side of the square the model was trained at; `--ar` sizes are derived from its area.
    base_resolution: int = 512
    # "sd" (1.x/2.x) or "sdxl"; decides which Auto pipeline family and prompt encoder apply.
    family: str = "sd"


@dataclass(frozen=True)
class EngineSettings:
    models: tuple[ModelSpec, ...] = (ModelSpec(name=TINY, source=TINY, base_resolution=128),)
    default_model: str = TINY
    clip_model: str = TINY
    cache_dir: Path = Path("data/models")
    device: str = "auto"  # auto | cuda | cpu | mps
    dtype: str = "auto"  # auto | float16 | bfloat16 | float32
    default_steps: int = 30
    default_guidance: float = 7.0
    default_sampler: Sampler = Sampler.DPMPP_2M_KARRAS
    num_candidates: int = 8
    num_kept: int = 4
    max_pixels: int = 1024 * 1024
    max_steps: int = 100
    variation_strength_subtle: float = 0.35
    variation_strength_strong: float = 0.7
    upscale_strength: float = 0.3
    upscaler: str = "auto"  # auto | hires | realesrgan
    local_files_only: bool = False
    extra: dict[str, str] = field(default_factory=dict)

    def model(self, name: str | None = None) -> ModelSpec:
        wanted = name or self.default_model
        for spec in self.models:
            if spec.name == wanted:
                return spec
        names = ", ".join(spec.name for spec in self.models)
        raise ValueError(f"model: unknown model {wanted!r}; configured: {names}")
