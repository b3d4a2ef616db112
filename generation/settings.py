"""How the engine is set up: which models, where they are cached, and on what device."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from generation.contract import Sampler

# `source = "tiny"` resolves to random-weight models built in code (generation.tiny); anything
# else is a Hugging Face hub id or a local diffusers folder, loaded with `from_pretrained`.
TINY = "tiny"
TINY_SOURCES = (TINY, "tiny-sdxl")
# The CLIP to rank real images with: the ViT-L/14 that SD 1.x's own text encoder comes from.
REAL_CLIP_MODEL = "openai/clip-vit-large-patch14"
DTYPES = ("auto", "float16", "bfloat16", "float32")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    source: str
    # Side of the square the model was trained at; `--ar` sizes are derived from its area.
    base_resolution: int = 512
    # "sd" (1.x/2.x) or "sdxl"; decides which Auto pipeline family and prompt encoder apply.
    family: str = "sd"
    # A VAE to use instead of the model's own (a hub id or a folder), e.g.
    # "madebyollin/sdxl-vae-fp16-fix": SDXL's stock VAE overflows in float16 and is decoded in
    # float32, which needs about twice the memory.
    vae: str = ""
    # This model's dtype, overriding the engine's ("" = the engine's).
    dtype: str = ""


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
    # Small cards: keep only the module that is running on the GPU (CUDA only; slower per job).
    cpu_offload: bool = False
    # Decode every image in tiles, not only the large ones: less VAE memory, slightly slower.
    vae_tiling: bool = False
    # Loaded models beyond this many are unloaded, least recently used first.
    max_loaded_models: int = 2
    extra: dict[str, str] = field(default_factory=dict)

    def model(self, name: str | None = None) -> ModelSpec:
        wanted = name or self.default_model
        for spec in self.models:
            if spec.name == wanted:
                return spec
        names = ", ".join(spec.name for spec in self.models)
        raise ValueError(f"model: unknown model {wanted!r}; configured: {names}")

    def validate(self) -> None:
        """Refuse settings that would start but give wrong results; ValueError names the key."""
        if self.max_loaded_models < 1:
            raise ValueError(f"max_loaded_models: must be at least 1, got {self.max_loaded_models}")
        for spec in self.models:
            if spec.dtype and spec.dtype not in DTYPES:
                raise ValueError(
                    f"models.dtype: model {spec.name!r} has dtype {spec.dtype!r}; "
                    f"one of {', '.join(DTYPES)}"
                )
        real = [spec for spec in self.models if spec.source not in TINY_SOURCES]
        if self.clip_model == TINY and real:
            # The tiny CLIP has random weights: its ranking of real images is noise.
            raise ValueError(
                f"clip_model: 'tiny' is a random-weight CLIP that cannot rank the images of "
                f"model {real[0].name!r} ({real[0].source}); set clip_model = "
                f'"{REAL_CLIP_MODEL}" (or another CLIP on the Hugging Face hub or in a folder)'
            )
