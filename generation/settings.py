"""How the engine is set up: which models, where they are cached, and on what device."""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from generation.contract import MAX_LORA_WEIGHT, GenerationRequest, Sampler
from generation.draft import check_draft_sampler

# `source = "tiny"` resolves to random-weight models built in code (generation.tiny); anything
# else is a Hugging Face hub id or a local diffusers folder, loaded with `from_pretrained`.
TINY = "tiny"
TINY_SOURCES = (TINY, "tiny-sdxl")
# The CLIP to rank real images with: the ViT-L/14 that SD 1.x's own text encoder comes from.
REAL_CLIP_MODEL = "openai/clip-vit-large-patch14"
DTYPES = ("auto", "float16", "bfloat16", "float32")
FAMILIES = ("sd", "sdxl")
# Weights that are unpickled when loaded: opening one runs whatever code it carries.
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
SINGLE_FILE_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)


class Preprocessor(StrEnum):
    """How a member's picture becomes a ControlNet's control map (generation.preprocess)."""

    CANNY = "canny"  # edges, with OpenCV
    DEPTH = "depth"  # a depth map from a transformers depth model (DPT)
    # The picture's drawn lines, white on black, found with OpenCV: a classical stand-in for
    # the model-based line-art annotator the line-art ControlNets were trained with.
    LINEART = "lineart"
    # The picture already is a control map: a pose skeleton (OpenPose-style, made elsewhere),
    # a scribble, line art drawn by hand …
    NONE = "none"


class ControlFit(StrEnum):
    """How a control picture of another shape than the image is fitted to it (never squashed:
    a squashed map would bend every line and circle the ControlNet follows)."""

    # Scaled to cover the image and centred: what overhangs is cut (AUTOMATIC1111's default,
    # "Crop and Resize").
    CROP = "crop"
    # Scaled to fit inside the image and centred, the rest black: the whole picture steers,
    # and the ControlNet leaves the bars to the model.
    PAD = "pad"


class CompileMode(StrEnum):
    """torch.compile's modes, for `compile_unet` and `compile_vae`."""

    # Generated kernels, no CUDA graphs: the shortest compilation.
    DEFAULT = "default"
    # CUDA graphs as well: less launch overhead per step, some memory per graph kept.
    REDUCE_OVERHEAD = "reduce-overhead"
    # Kernels chosen by timing candidates: the longest compilation, often the fastest steps.
    MAX_AUTOTUNE = "max-autotune"
    MAX_AUTOTUNE_NO_CUDAGRAPHS = "max-autotune-no-cudagraphs"


# The depth model a DEPTH ControlNet uses unless it names one (the one diffusers' ControlNet
# depth examples use).
DEFAULT_DEPTH_MODEL = "Intel/dpt-large"


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
    # A dedicated inpainting checkpoint (hub id or diffusers folder; "tiny-inpaint" offline)
    # whose 9-channel UNet paints zooms, pans and regions; "" = masked latent blending on the
    # model's own UNet. Only its UNet is loaded: text encoder and VAE are the model's.
    inpaint_source: str = ""
    # A tiny VAE decoder for live previews (diffusers AutoencoderTiny: "madebyollin/taesd" for
    # SD 1.x, "madebyollin/taesdxl" for SDXL, or a folder): truer colours and detail than the
    # linear latent-to-RGB map used when this is "", for a few milliseconds a preview on a GPU.
    preview_decoder: str = ""
    # For a single-file `source` (.safetensors): a local diffusers folder of the same family
    # whose configs, tokenizers and scheduler describe the checkpoint (its weights, if any, are
    # not read), so loading never asks the hub for them.
    config: str = ""
    # A pickled checkpoint (.ckpt) can run code when opened: refused unless the owner says so.
    allow_pickle: bool = False
    description: str = ""

    @property
    def single_file(self) -> bool:
        return self.source.lower().endswith(SINGLE_FILE_SUFFIXES)


@dataclass(frozen=True)
class LoraSpec:
    """A LoRA the server offers: `source` is a .safetensors file, a folder or a hub id."""

    name: str
    source: str
    # The model family it was trained for ("sd" or "sdxl"); only models of it may use it.
    family: str = "sd"
    default_weight: float = 1.0
    # Words the LoRA was trained to respond to, appended to the prompt when it is used.
    trigger_words: tuple[str, ...] = ()
    description: str = ""


@dataclass(frozen=True)
class ControlNetSpec:
    """A ControlNet the server offers: `source` is a diffusers folder or a hub id."""

    name: str
    source: str
    family: str = "sd"
    preprocessor: Preprocessor = Preprocessor.CANNY
    description: str = ""
    # DEPTH only: the depth model (a transformers folder or hub id); "" = DEFAULT_DEPTH_MODEL.
    preprocessor_model: str = ""


# Per-layer IP-Adapter scales that carry style and little content ("InstantStyle"), as
# (layer, scale per attention layer) with layers named like diffusers' set_ip_adapter_scale:
# "down.block_2", "mid", "up.block_0". SDXL: the second attention of the first up block; SD 1.x
# has no layer that clean, and the whole second up block (the first with attention) is used.
StyleLayers = tuple[tuple[str, tuple[float, ...]], ...]
DEFAULT_STYLE_LAYERS: dict[str, StyleLayers] = {
    "sd": (("up.block_1", (1.0, 1.0, 1.0)),),
    "sdxl": (("up.block_0", (0.0, 1.0, 0.0)),),
}
# The tiny models (generation.tiny) have attention in their first up block, three layers.
TINY_STYLE_LAYERS: StyleLayers = (("up.block_0", (0.0, 1.0, 0.0)),)


@dataclass(frozen=True)
class IPAdapterSpec:
    """The image adapter (IP-Adapter) for one model family: its weights and image encoder,
    loaded with diffusers' `load_ip_adapter`. It gives image prompts, /blend, --sref and
    --oref/--cref to every model of that family (generation.conditioning).

    `source = "tiny"` is a random-weight adapter built for the tiny models; it applies to
    them only (a real model of the family then has no adapter)."""

    family: str = "sd"
    # A hub id (h94/IP-Adapter) or a local folder laid out like it.
    source: str = TINY
    subfolder: str = "models"
    weight_name: str = "ip-adapter_sd15.safetensors"
    # Relative to `source` when it contains a "/", else to `subfolder` (diffusers' rule).
    image_encoder_folder: str = "models/image_encoder"
    # () = DEFAULT_STYLE_LAYERS of the family (TINY_STYLE_LAYERS for the tiny adapter).
    style_layers: StyleLayers = ()

    @property
    def tiny(self) -> bool:
        return self.source == TINY

    def style(self) -> StyleLayers:
        if self.style_layers:
            return self.style_layers
        return TINY_STYLE_LAYERS if self.tiny else DEFAULT_STYLE_LAYERS[self.family]


@dataclass(frozen=True)
class EngineSettings:
    models: tuple[ModelSpec, ...] = (ModelSpec(name=TINY, source=TINY, base_resolution=128),)
    default_model: str = TINY
    clip_model: str = TINY
    # A BLIP captioner whose caption leads /describe's suggestions (generation/caption.py): a
    # hub id or folder, "tiny" (random weights, for tests), "" for none.
    caption_model: str = ""
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
    # Upscale (Creative): a hires fix strong enough to add detail.
    upscale_strength_creative: float = 0.55
    # Zoom, pan, square and region edits painted by a model's own 4-channel UNet (no
    # inpaint_source) start from the pre-filled canvas noised to this strength, so the
    # pre-fill steers them (generation.outpaint.edit_strength); 0.8 is the default of
    # AUTOMATIC1111's outpainting scripts. A 9-channel inpainting UNet always paints at 1.0.
    edit_strength: float = 0.8
    upscaler: str = "auto"  # auto | hires | realesrgan
    local_files_only: bool = False
    # Small cards: keep only the module that is running on the GPU (CUDA only; slower per job).
    cpu_offload: bool = False
    # Decode every image in tiles, not only the large ones: less VAE memory, slightly slower.
    vae_tiling: bool = False
    # Loaded models beyond this many are unloaded, least recently used first.
    max_loaded_models: int = 2
    # LoRAs kept loaded per model (each holds its weights in GPU memory); beyond this many the
    # least recently used is unloaded, and loaded again by the next job that asks for it.
    max_loaded_loras: int = 4
    # Live previews of a job that asks for them: at most one per this many seconds.
    preview_interval_s: float = 2.0
    # `--draft` (generation.draft): this many steps at most, with this sampler (deterministic
    # and one model call a step, so the draft shows what Enhance renders, and is cheap).
    draft_steps: int = 8
    draft_sampler: Sampler = Sampler.UNIPC
    # Speed options, off until measured on the card that serves (bench/gpu_check.py times
    # them; README "Speed options"). torch.compile each model's UNet (its inpainting UNet too):
    # the first job of each kind compiles (a minute or more), the later ones run faster; what
    # a job switches (adapter, --tile, LoRAs) is kept compile-safe (generation/compiled.py).
    compile_unet: bool = False
    # The VAE decoder too (its first decode at each size compiles).
    compile_vae: bool = False
    compile_mode: CompileMode = CompileMode.DEFAULT
    # torch.compile's backend: "inductor" generates kernels; tests name one that counts graphs.
    compile_backend: str = "inductor"
    # Attention's query, key and value projections as one matmul (diffusers'
    # fuse_qkv_projections), in the UNet and the VAE.
    fuse_qkv_projections: bool = False
    # Decode a job's images in one VAE call instead of one at a time (VAE slicing); out of
    # memory, one at a time again, and that load is remembered.
    vae_batched_decode: bool = False
    loras: tuple[LoraSpec, ...] = ()
    controlnets: tuple[ControlNetSpec, ...] = ()
    # How a control picture of another shape than the image is fitted to it.
    controlnet_fit: ControlFit = ControlFit.CROP
    # Image adapters per model family; the tiny ones serve only the tiny models.
    ip_adapters: tuple[IPAdapterSpec, ...] = (
        IPAdapterSpec(family="sd"),
        IPAdapterSpec(family="sdxl"),
    )
    extra: dict[str, str] = field(default_factory=dict)

    def model(self, name: str | None = None) -> ModelSpec:
        wanted = name or self.default_model
        for spec in self.models:
            if spec.name == wanted:
                return spec
        names = ", ".join(spec.name for spec in self.models)
        raise ValueError(f"model: unknown model {wanted!r}; configured: {names}")

    def lora(self, name: str) -> LoraSpec:
        for spec in self.loras:
            if spec.name == name:
                return spec
        offered = ", ".join(spec.name for spec in self.loras) or "none"
        raise ValueError(f"lora: unknown LoRA {name!r}; offered: {offered}")

    def controlnet(self, name: str) -> ControlNetSpec:
        for spec in self.controlnets:
            if spec.name == name:
                return spec
        offered = ", ".join(spec.name for spec in self.controlnets) or "none"
        raise ValueError(f"controlnet: unknown ControlNet {name!r}; offered: {offered}")

    def loras_for(self, model: str | None = None) -> tuple[LoraSpec, ...]:
        """The LoRAs that fit `model` (its family), for listings and autocomplete."""
        family = self.model(model).family
        return tuple(spec for spec in self.loras if spec.family == family)

    def controlnets_for(self, model: str | None = None) -> tuple[ControlNetSpec, ...]:
        family = self.model(model).family
        return tuple(spec for spec in self.controlnets if spec.family == family)

    def check_add_ons(self, request: GenerationRequest) -> None:
        """The request's LoRAs and ControlNet exist and fit its model; ValueError names them.

        Cheap (no torch), so the bot can refuse before charging anything.
        """
        model = self.model(request.model)
        for wanted in request.loras:
            lora = self.lora(wanted.name)
            if lora.family != model.family:
                raise ValueError(
                    f"lora: {lora.name!r} is made for {lora.family} models, but model "
                    f"{model.name!r} is {model.family}"
                )
        if request.controlnet is not None:
            controlnet = self.controlnet(request.controlnet)
            if controlnet.family != model.family:
                raise ValueError(
                    f"controlnet: {controlnet.name!r} is made for {controlnet.family} models, "
                    f"but model {model.name!r} is {model.family}"
                )

    def ip_adapter_for(self, model: str | None = None) -> IPAdapterSpec | None:
        """The image adapter `model` uses, or None: then image prompts fall back to img2img and
        style/object references are refused (generation.conditioning.check_inputs). Cheap."""
        spec = self.model(model)
        tiny_model = spec.source in TINY_SOURCES
        for adapter in self.ip_adapters:
            if adapter.family == spec.family and adapter.tiny == tiny_model:
                return adapter
        return None

    def validate(self) -> None:
        """Refuse settings that would start but give wrong results; ValueError names the key."""
        _validate_ip_adapters(self.ip_adapters)
        if self.preview_interval_s < 0:
            raise ValueError(
                f"preview_interval_s: must be at least 0, got {self.preview_interval_s}"
            )
        if not isinstance(self.controlnet_fit, ControlFit):
            raise ValueError(
                f"controlnet_fit: {self.controlnet_fit!r}; one of "
                + ", ".join(f.value for f in ControlFit)
            )
        if not isinstance(self.compile_mode, CompileMode):
            raise ValueError(
                f"compile_mode: {self.compile_mode!r}; one of "
                + ", ".join(m.value for m in CompileMode)
            )
        if not self.compile_backend.strip():
            raise ValueError("compile_backend: empty; 'inductor' unless a test names another")
        if not 1 <= self.draft_steps <= self.max_steps:
            raise ValueError(
                f"draft_steps: must be between 1 and max_steps ({self.max_steps}), "
                f"got {self.draft_steps}"
            )
        if not isinstance(self.draft_sampler, Sampler):
            raise ValueError(f"draft_sampler: must be a Sampler, got {self.draft_sampler!r}")
        check_draft_sampler(self.draft_sampler)
        if not 0.0 < self.edit_strength <= 1.0:
            raise ValueError(f"edit_strength: must be in (0, 1], got {self.edit_strength}")
        if self.max_loaded_loras < 1:
            raise ValueError(f"max_loaded_loras: must be at least 1, got {self.max_loaded_loras}")
        if self.max_loaded_models < 1:
            raise ValueError(f"max_loaded_models: must be at least 1, got {self.max_loaded_models}")
        for spec in self.models:
            if spec.dtype and spec.dtype not in DTYPES:
                raise ValueError(
                    f"models.dtype: model {spec.name!r} has dtype {spec.dtype!r}; "
                    f"one of {', '.join(DTYPES)}"
                )
            _check_family("models", spec.name, spec.family)
            if spec.single_file:
                _check_single_file(spec)
        self._validate_add_ons()
        real = [spec for spec in self.models if spec.source not in TINY_SOURCES]
        if self.clip_model == TINY and real:
            # The tiny CLIP has random weights: its ranking of real images is noise.
            raise ValueError(
                f"clip_model: 'tiny' is a random-weight CLIP that cannot rank the images of "
                f"model {real[0].name!r} ({real[0].source}); set clip_model = "
                f'"{REAL_CLIP_MODEL}" (or another CLIP on the Hugging Face hub or in a folder)'
            )

    def _validate_add_ons(self) -> None:
        families = {spec.family for spec in self.models}
        for kind, specs in (("loras", self.loras), ("controlnets", self.controlnets)):
            names = [spec.name for spec in specs]
            for name in names:
                if not name.strip() or names.count(name) > 1:
                    raise ValueError(f"{kind}.name: {name!r} is empty or given twice")
            for spec in specs:
                _check_family(kind, spec.name, spec.family)
                if spec.family not in families:
                    raise ValueError(
                        f"{kind}.family: {spec.name!r} is for {spec.family} models, but no "
                        f"configured model is {spec.family} (models: "
                        + ", ".join(f"{m.name} ({m.family})" for m in self.models)
                        + ")"
                    )
        for lora in self.loras:
            if not 0.0 <= lora.default_weight <= MAX_LORA_WEIGHT:
                raise ValueError(
                    f"loras.default_weight: {lora.name!r} has {lora.default_weight:g}; "
                    f"between 0 and {MAX_LORA_WEIGHT:g}"
                )
            if lora.source.lower().endswith(PICKLE_SUFFIXES):
                raise ValueError(
                    f"loras.source: {lora.name!r} is a pickled file ({lora.source}), which can run "
                    "code when opened; convert it to .safetensors"
                )
            if _looks_local(lora.source):
                _check_local_weights("loras.source", lora.name, Path(lora.source))
        for controlnet in self.controlnets:
            if not isinstance(controlnet.preprocessor, Preprocessor):
                raise ValueError(
                    f"controlnets.preprocessor: {controlnet.name!r} has "
                    f"{controlnet.preprocessor!r}; one of "
                    + ", ".join(p.value for p in Preprocessor)
                )
            if _looks_local(controlnet.source):
                _check_local_weights("controlnets.source", controlnet.name, Path(controlnet.source))


def _validate_ip_adapters(adapters: tuple[IPAdapterSpec, ...]) -> None:
    seen: set[tuple[str, bool]] = set()
    for adapter in adapters:
        _check_family("ip_adapters", adapter.source, adapter.family)
        key = (adapter.family, adapter.tiny)
        if key in seen:
            raise ValueError(f"ip_adapters.family: two adapters for {adapter.family} models")
        seen.add(key)
        if not adapter.tiny and not adapter.weight_name.strip():
            raise ValueError(f"ip_adapters.weight_name: {adapter.source!r} needs one")
        if not adapter.tiny:
            check_adapter_weight_name(adapter.weight_name)
        for layer, scales in adapter.style_layers:
            if not _STYLE_LAYER.fullmatch(layer) or not scales:
                raise ValueError(
                    f"ip_adapters.style_layers: {layer!r} should be like 'up.block_0', "
                    "'down.block_2' or 'mid', with a list of scales"
                )


_STYLE_LAYER = re.compile(r"(up|down)\.block_\d+|mid")


def check_adapter_weight_name(weight_name: str) -> None:
    """diffusers unpickles an adapter file whatever its name unless it ends in .safetensors (a
    .bin, .pt or .ckpt runs any code it carries when opened), so only those are loaded."""
    if not weight_name.strip().lower().endswith(".safetensors"):
        raise ValueError(
            f"ip_adapters.weight_name: {weight_name!r} is not a .safetensors file; any other "
            "file is loaded as a pickle, which can run code when opened; convert it to "
            ".safetensors"
        )


def _check_family(kind: str, name: str, family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"{kind}.family: {name!r} has {family!r}; one of {', '.join(FAMILIES)}")


def _looks_local(source: str) -> bool:
    """A path rather than a hub id: hub ids are `owner/name` and never start like a path."""
    return source.startswith(("/", ".", "~")) or source.lower().endswith(SINGLE_FILE_SUFFIXES)


# Where an owner gets a single-file model's `config` folder: the configs, tokenizers and
# scheduler of the family's base model, without its weights (a few hundred kilobytes).
CONFIG_REPOS = {
    "sd": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
}


def check_single_file_safety(spec: ModelSpec) -> None:
    """The refusals a single-file model meets before anything opens it (ValueError naming the
    key): a pickle without `allow_pickle`, and no local `config` folder to describe it."""
    path = Path(spec.source).expanduser()
    if path.suffix.lower() in PICKLE_SUFFIXES and not spec.allow_pickle:
        raise ValueError(
            f"models.source: model {spec.name!r} is a pickled checkpoint ({path.name}): opening "
            "one can run any code it carries. Convert it to .safetensors, or set "
            "allow_pickle = true for this model if you trust where it came from"
        )
    if not spec.config:
        repo = CONFIG_REPOS.get(spec.family, CONFIG_REPOS["sd"])
        raise ValueError(
            f"models.config: model {spec.name!r} is a single file ({path.name}) and needs "
            f"`config`, a local diffusers folder of its family ({spec.family}: its "
            "model_index.json, component configs, tokenizers and scheduler; no weights), so "
            "that nothing is fetched from the hub. On a machine with internet: hf download "
            f"{repo} --include '*.json' --include '*.txt' --local-dir {spec.family}-config, "
            "then copy that folder here and set config to its path"
        )


def _check_single_file(spec: ModelSpec) -> None:
    check_single_file_safety(spec)
    _check_local_weights("models.source", spec.name, Path(spec.source))
    config = Path(spec.config).expanduser()
    try:
        index = json.loads((config / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(
            f"models.config: model {spec.name!r}: {config} is not a diffusers folder "
            f"(model_index.json: {exc})"
        ) from exc
    family = "sdxl" if "XL" in str(index.get("_class_name", "")) else "sd"
    if family != spec.family:
        raise ValueError(
            f"models.config: model {spec.name!r} is family {spec.family!r} but its config "
            f"{config} is an {family} pipeline ({index.get('_class_name')})"
        )


def _check_local_weights(key: str, name: str, path: Path) -> None:
    """The file exists and, for .safetensors, its header reads (a truncated download or an HTML
    error page saved under the name fails here, at start-up, instead of on a member's job)."""
    path = path.expanduser()
    if not path.exists():
        raise ValueError(f"{key}: {name!r}: {path} does not exist")
    if path.is_dir() or path.suffix.lower() != ".safetensors":
        return
    reason = safetensors_problem(path, lora=key.startswith("loras"))
    if reason:
        raise ValueError(f"{key}: {name!r}: {path.name} is not a usable safetensors file: {reason}")


def safetensors_problem(path: Path, lora: bool = False) -> str:
    """Why `path` is not a readable safetensors file (or, `lora`, holds no LoRA weights), or ""
    when its header reads."""
    try:
        with path.open("rb") as file:
            head = file.read(8)
            if len(head) < 8:
                return "shorter than a safetensors header"
            (length,) = struct.unpack("<Q", head)
            size = path.stat().st_size
            if length > size - 8 or length > 100_000_000:
                return f"the header claims {length} bytes but the file has {size}"
            header = json.loads(file.read(length))
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    except (ValueError, UnicodeDecodeError):
        return "its header is not JSON (truncated or not a safetensors file)"
    if not isinstance(header, dict) or not any(k != "__metadata__" for k in header):
        return "it holds no tensors"
    if lora and not any("lora" in k.lower() for k in header):
        return "it holds no LoRA weights (no lora_ tensors; a full checkpoint is a model)"
    return ""
