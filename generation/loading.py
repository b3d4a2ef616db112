"""Loading models and keeping them loaded: each model's pipelines (least recently used dropped past
`max_loaded_models`), its inpainting UNet and preview decoder, the CLIP ranker and the captioner,
all through `from_pretrained` with the half-size fp16 weights where a repository has them.

`ModelStore` is what the engine (generation/engine.py, which runs the jobs) is built on: it owns
the loaded models, the device they live on and the lock that lets one job at a time use them.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from generation import outpaint
from generation.caption import Captioner, resolve_caption_source
from generation.compiled import apply_speed_options, apply_to_extra_unet
from generation.controlnet import ControlNets
from generation.lora import LoraSet
from generation.ranking import ClipRanker, resolve_clip_source
from generation.settings import TINY, EngineSettings, ModelSpec
from generation.single_file import load_single_file

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """One model's pipelines, kept across jobs."""

    spec: ModelSpec
    text2img: Any
    img2img: Any
    scheduler_config: Any
    load_s: float
    prompt_encoder: Any = None
    # LoRAs loaded into this model, and ControlNet pipelines over its modules (they go with it).
    loras: LoraSet | None = None
    controlnet_pipes: dict[tuple[str, bool], Any] = field(default_factory=dict)
    # The inpainting pipeline edits use (generation.outpaint), built on first use.
    inpaint: Any = None
    # With cpu_offload, the hook that moves an inpaint_source UNet back to the CPU.
    inpaint_offload: Any = None
    # The model's preview_decoder (AutoencoderTiny), loaded by the first job with previews;
    # False when it could not be loaded (previews fall back to the linear map).
    preview_decoder: Any = None
    # The image adapter (generation.ip_adapter), loaded by the first job with pictures.
    image_adapter: Any = None


def quiet_library_progress() -> None:
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def resolve_device(setting: str) -> str:
    import torch

    if setting != "auto":
        if setting == "cuda" and not torch.cuda.is_available():
            raise ValueError("device: 'cuda' was configured but torch sees no CUDA device")
        return setting
    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return "mps"
    return "cpu"


def resolve_dtype(setting: str, device: str) -> Any:
    import torch

    if setting == "auto":
        # Half precision only where kernels for it are fast; CPU fp16 is slow and lossy.
        return torch.float16 if device in ("cuda", "mps") else torch.float32
    return {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[setting]


class ModelStore:
    """The models an engine has loaded, loaded on first use and kept across jobs."""

    def __init__(self, settings: EngineSettings, *, offload_stand_in: bool = False) -> None:
        """`offload_stand_in`: honour `cpu_offload` on a device that is not CUDA, the device
        standing in for the GPU that modules are moved to and from (the CPU in the tests), so
        that every offload hook runs somewhere before a GPU is the first place it runs."""
        settings.validate()
        self.settings = settings
        self.device = resolve_device(settings.device)
        self.dtype = resolve_dtype(settings.dtype, self.device)
        self.max_loaded_models = settings.max_loaded_models
        # Offloading moves modules between the GPU and the CPU; without a GPU there is nothing
        # to save, so the setting is ignored rather than refused (the same config serves both).
        self.cpu_offload = settings.cpu_offload and (self.device == "cuda" or offload_stand_in)
        if settings.cpu_offload and not self.cpu_offload:
            log.warning("cpu_offload is set but the engine runs on %s: ignored", self.device)
        self._loaded: OrderedDict[str, LoadedModel] = OrderedDict()
        self._ranker: ClipRanker | None = None
        self._caption_model: Captioner | None = None
        # Pipelines, their schedulers and conv padding are shared state: one job at a time.
        self._lock = threading.Lock()
        self._controlnets = ControlNets(
            settings,
            self.device,
            self.dtype,
            lambda kind, source, dtype: self._from_pretrained(kind, source, dtype),
        )

    def warm_up(self, model: str | None = None) -> None:
        """Load the model's pipelines and the CLIP ranker now instead of in the first job."""
        with self._lock:
            self._pipelines(self.settings.model(model))
            self._clip()

    def pipelines(self, model: str | None = None) -> tuple[Any, Any]:
        """The (text-to-image, image-to-image) diffusers pipelines of a model, loaded if needed.

        They are shared with the engine's jobs: do not use them while a job runs.
        """
        with self._lock:
            loaded = self._pipelines(self.settings.model(model))
            return loaded.text2img, loaded.img2img

    def ranker(self) -> ClipRanker:
        """The CLIP ranker, loaded if needed."""
        with self._lock:
            return self._clip()

    def loaded_models(self) -> tuple[str, ...]:
        """Names of the models held in memory, least recently used first: the scheduler sends
        a job to a worker that already holds its model."""
        with self._lock:
            return tuple(self._loaded)

    def close(self) -> None:
        """Drop loaded models and return their memory (the engine can load them again)."""
        with self._lock:
            self._loaded.clear()
            self._ranker = None
            self._caption_model = None
            self._controlnets.close()
            self._free_cuda()

    def unload_lora(self, model: str, name: str) -> None:
        """Drop a LoRA's weights from a loaded model (loaded again by the next job using it)."""
        with self._lock:
            loaded = self._loaded.get(model)
            if loaded is not None and loaded.loras is not None:
                loaded.loras.unload(name)

    def _preview_decoder(self, loaded: LoadedModel) -> Any:
        """The model's tiny preview decoder, or None for the linear map. A decoder that can't be
        loaded costs the member nothing: it is logged and previews go on without it."""
        source = loaded.spec.preview_decoder
        if not source or loaded.preview_decoder is False:
            return None
        if loaded.preview_decoder is None:
            from diffusers import AutoencoderTiny

            try:
                decoder = self._from_pretrained(
                    AutoencoderTiny, source, self.model_dtype(loaded.spec)
                )
            except (OSError, ValueError) as exc:
                log.warning(
                    "model %s: preview_decoder %r not loaded (%s); previews use the linear map",
                    loaded.spec.name,
                    source,
                    exc,
                )
                loaded.preview_decoder = False
                return None
            # A few MB: it stays on the device, with cpu_offload too.
            loaded.preview_decoder = decoder.to(self.device).eval()
        return loaded.preview_decoder

    def _inpaint_pipeline(self, loaded: LoadedModel) -> Any:
        """The model's inpainting pipeline: its own modules, with the 9-channel UNet of its
        `inpaint_source` when it names one (loaded once, kept with the model)."""
        if loaded.inpaint is None:
            unet = None
            if loaded.spec.inpaint_source:
                from diffusers import UNet2DConditionModel

                source = loaded.spec.inpaint_source
                if source == "tiny-inpaint":
                    from generation.tiny import ensure_tiny_inpaint

                    source = str(ensure_tiny_inpaint(self.settings.cache_dir))
                dtype = self.model_dtype(loaded.spec)
                try:
                    unet = self._from_pretrained(
                        UNet2DConditionModel, source, dtype, subfolder="unet"
                    )
                except OSError as exc:
                    raise RuntimeError(
                        f"model {loaded.spec.name!r}: cannot load its inpaint_source "
                        f"{loaded.spec.inpaint_source!r} ({exc})"
                    ) from exc
                if self.cpu_offload:
                    # The model's offload hooks cover its own modules only: this UNet gets its
                    # own, and goes back to the CPU after each edit (_call_pipeline).
                    loaded.inpaint_offload = outpaint.offload_unet(
                        unet, loaded.text2img, self.device
                    )
                else:
                    unet.to(self.device)
                apply_to_extra_unet(unet, self.settings)
            loaded.inpaint = outpaint.inpaint_pipeline(loaded.text2img, unet)
        return loaded.inpaint

    def _pipelines(self, spec: ModelSpec) -> LoadedModel:
        loaded = self._loaded.get(spec.name)
        if loaded is not None:
            self._loaded.move_to_end(spec.name)
            return loaded
        while len(self._loaded) >= self.max_loaded_models:
            # Only the name is kept: holding the popped pipelines while freeing would keep them.
            name = next(iter(self._loaded))
            del self._loaded[name]
            self._controlnets.release_unused(
                [loaded.controlnet_pipes for loaded in self._loaded.values()]
            )
            log.info("unloading model %s to make room for %s", name, spec.name)
            self._free_cuda()
        loaded = self._load(spec)
        self._loaded[spec.name] = loaded
        return loaded

    def model_dtype(self, spec: ModelSpec) -> Any:
        return resolve_dtype(spec.dtype, self.device) if spec.dtype else self.dtype

    def _load(self, spec: ModelSpec) -> LoadedModel:
        from diffusers import AutoencoderKL, AutoPipelineForImage2Image, AutoPipelineForText2Image

        started = time.perf_counter()
        source = self._model_source(spec)
        dtype = self.model_dtype(spec)
        kwargs: dict[str, Any] = {}
        if spec.family == "sd":
            # The bot moderates images itself; SD's safety checker would cost 1.2 GB and
            # silently black out images.
            kwargs["safety_checker"] = None
            kwargs["requires_safety_checker"] = False
        log.info("loading model %s from %s", spec.name, source)
        try:
            if spec.vae:
                kwargs["vae"] = self._from_pretrained(AutoencoderKL, spec.vae, dtype)
            if spec.single_file:
                text2img = load_single_file(spec, dtype, **kwargs)
            else:
                text2img = self._from_pretrained(AutoPipelineForText2Image, source, dtype, **kwargs)
        except OSError as exc:
            raise RuntimeError(
                f"model {spec.name!r}: cannot load {source!r} ({exc}). Use a Hugging Face id "
                "that can be downloaded, or a local diffusers folder (model_index.json inside)."
            ) from exc
        family = "sdxl" if "XL" in type(text2img).__name__ else "sd"
        if family != spec.family:
            log.warning(
                "model %s is configured as %s but loaded as %s", spec.name, spec.family, family
            )
            spec = replace(spec, family=family)
        if self.cpu_offload:
            text2img.enable_model_cpu_offload(device=self.device)
        else:
            text2img.to(self.device)
        if self.device == "cuda":
            self._tune_for_cuda(text2img)
        # At rest the VAE works one image at a time, which caps its peak memory at one image's
        # (8 SDXL images at once need 16 GB or more); vae_batched_decode decodes a job's images
        # in one call when memory allows (_decode).
        text2img.vae.enable_slicing()
        apply_speed_options(text2img, self.settings)
        text2img.set_progress_bar_config(disable=True)
        img2img = AutoPipelineForImage2Image.from_pipe(text2img)
        img2img.set_progress_bar_config(disable=True)
        load_s = time.perf_counter() - started
        log.info("loaded %s (%s) in %.2fs", spec.name, type(text2img).__name__, load_s)
        return LoadedModel(
            spec=spec,
            text2img=text2img,
            img2img=img2img,
            scheduler_config=text2img.scheduler.config,
            load_s=load_s,
        )

    def _from_pretrained(self, kind: Any, source: str, dtype: Any, **kwargs: Any) -> Any:
        """`kind.from_pretrained(source)`, with the half-size fp16 weights where there are some.

        Most hub repositories carry an `fp16` variant beside the float32 weights; loading it in
        half precision downloads and reads half as much. Repositories and folders without one
        are loaded from their full weights.
        """
        import torch

        kwargs["dtype"] = dtype
        kwargs["local_files_only"] = self.settings.local_files_only
        if not Path(source).is_dir():
            kwargs["cache_dir"] = str(self.settings.cache_dir / "hub")
        if dtype in (torch.float16, torch.bfloat16):
            try:
                return kind.from_pretrained(source, variant="fp16", **kwargs)
            except (OSError, ValueError) as exc:
                # diffusers says ValueError for a pipeline without the variant, OSError for a
                # single model; a real loading error comes back from the plain load below. The
                # message, not the exception, goes to the log: a kept log record would keep
                # its traceback's frames, and with them the half-loaded model, alive.
                log.info("%s has no fp16 variant (%s); loading its full weights", source, str(exc))
        return kind.from_pretrained(source, **kwargs)

    def _model_source(self, spec: ModelSpec) -> str:
        if spec.source == TINY:
            from generation.tiny import ensure_tiny_sd

            return str(ensure_tiny_sd(self.settings.cache_dir))
        if spec.source == "tiny-sdxl":
            from generation.tiny import ensure_tiny_sdxl

            return str(ensure_tiny_sdxl(self.settings.cache_dir))
        return spec.source

    def _tune_for_cuda(self, pipe: Any) -> None:
        import torch
        from diffusers.models.attention_processor import AttnProcessor2_0

        # SDPA (flash / memory-efficient attention) for the UNet and VAE; channels-last convs
        # run faster on tensor cores.
        for name in ("unet", "vae"):
            module = getattr(pipe, name, None)
            if module is not None and hasattr(module, "set_attn_processor"):
                with contextlib.suppress(Exception):
                    module.set_attn_processor(AttnProcessor2_0())
        if getattr(pipe, "unet", None) is not None:
            pipe.unet.to(memory_format=torch.channels_last)

    def _clip(self) -> ClipRanker:
        if self._ranker is None:
            started = time.perf_counter()
            source = resolve_clip_source(self.settings.clip_model, self.settings.cache_dir)
            self._ranker = ClipRanker(
                source,
                device=self.device,
                dtype=self.dtype,
                cache_dir=self.settings.cache_dir / "hub",
                local_files_only=self.settings.local_files_only,
            )
            log.info("loaded CLIP %s in %.2fs", source, time.perf_counter() - started)
        return self._ranker

    def _captioner(self) -> Captioner | None:
        """The [generation] caption_model, loaded on the first /describe; None without one."""
        if not self.settings.caption_model:
            return None
        if self._caption_model is None:
            started = time.perf_counter()
            source = resolve_caption_source(self.settings.caption_model, self.settings.cache_dir)
            self._caption_model = Captioner(
                source,
                device=self.device,
                dtype=self.dtype,
                cache_dir=self.settings.cache_dir / "hub",
                local_files_only=self.settings.local_files_only,
            )
            log.info("loaded captioner %s in %.2fs", source, time.perf_counter() - started)
        return self._caption_model

    def _free_cuda(self) -> None:
        import gc

        import torch

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
