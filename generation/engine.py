"""Running jobs: a request checked against the settings, its inputs prepared, all its candidates
in one batched pipeline call, decoded and ranked with CLIP. Loading the models it runs on is
generation/loading.py; what happens between denoising steps is generation/steps.py.

Over 500 lines because one job's run (validation, inputs, the batched call with its out-of-memory
retries, decoding, ranking) is one sequence, read best in one place.

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
import logging
import math
import threading
import time
from collections.abc import Iterator
from typing import Any

from PIL import Image

from generation import lora_fusion, outpaint
from generation.compiled import uses_fused_loras
from generation.conditioning import check_inputs, plan_conditioning, ranking_references
from generation.contract import (
    MAX_PIXELS,
    MAX_SEED,
    GenerationRequest,
    GenerationResult,
    JobKind,
    ProgressCallback,
    UpscaleMode,
)
from generation.controlnet import ControlJob
from generation.decoding import decode_latents, kept_dtype
from generation.describe import describe_picture
from generation.esrgan import EsrganUpscaler
from generation.init_latents import encode_edit, encode_picture
from generation.ip_adapter import NO_PICTURES, Conditioning, ImageAdapter
from generation.ip_adapter import prepare as prepare_conditioning
from generation.loading import LoadedModel, ModelStore, quiet_library_progress
from generation.lora import LoraSet, apply_trigger_words, requested_loras
from generation.preview import Previewer
from generation.ranking import select_candidates
from generation.samplers import make_scheduler, seed_step_noise
from generation.settings import EngineSettings, ModelSpec
from generation.shorten import shorten
from generation.steps import StepState, check_cancel, on_step_end, record_denoised
from generation.taste import compact, personal_scores, space_for
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


def create_engine(settings: EngineSettings, *, offload_stand_in: bool = False) -> DiffusersEngine:
    """The engine for these settings. Loads nothing until the first job (or `warm_up`).

    Also turns off the libraries' console progress bars: in a worker they only garble logs,
    and progress is reported through the engine's callback instead. `offload_stand_in`: see
    `DiffusersEngine`.
    """
    quiet_library_progress()
    return DiffusersEngine(settings, offload_stand_in=offload_stand_in)


def candidate_seeds(seed: int, count: int) -> tuple[int, ...]:
    """seed, seed+1, … wrapping inside the valid seed range, so each one can be asked for alone."""
    return tuple((seed + i) % (MAX_SEED + 1) for i in range(count))


class DiffusersEngine(ModelStore):
    """Runs one job at a time on the models it loads on demand (generation.loading), ranks
    candidates with CLIP."""

    def __init__(self, settings: EngineSettings, *, offload_stand_in: bool = False) -> None:
        """`offload_stand_in`: honour `cpu_offload` on a device that is not CUDA, the device
        standing in for the GPU that modules are moved to and from (the CPU in the tests), so
        that every offload hook runs somewhere before a GPU is the first place it runs."""
        super().__init__(settings, offload_stand_in=offload_stand_in)
        # Largest batch that fit in memory, per output pixel count, learned from OOM retries.
        self._batch_limits: dict[int, int] = {}
        # Per model: the smallest batched VAE decode (latent values) that ran out of memory.
        self._batched_decode_limits: dict[str, int] = {}
        self._upscaler = EsrganUpscaler(settings.upscaler, self.device)
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
        if request.kind is not JobKind.IMAGINE and not request.kind.makes_text:
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
        if request.kind is JobKind.SHORTEN:
            with self._lock:
                return self._shorten(request, cancel)
        with self._lock, self._loras_active(spec, request) as request:
            return self._generate(spec, request, progress, cancel)

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
        check_cancel(cancel)

        before = time.perf_counter()
        loaded = self._pipelines(spec)
        ranker = self._clip()
        timings["load_s"] = time.perf_counter() - before
        check_cancel(cancel)

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
        check_cancel(cancel)

        before = time.perf_counter()
        references = ranking_references(request)
        if references:
            scored = ranker.score_against_images(references, images)
        else:
            scored = ranker.score(_ranking_text(request), images)
        # --p: the member's taste joins the prompt similarity (generation/taste.py); every
        # candidate's embedding goes back, compact, so the bot can learn from the picks.
        space = space_for(self.settings.clip_model, scored.image_embeds.shape[1])
        ranking, personalized = personal_scores(
            scored.scores, scored.image_embeds, request.personalize, space
        )
        keep = select_candidates(
            ranking, scored.image_embeds, request.num_kept, chaos=request.chaos
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
            embeddings=compact(scored.image_embeds, space),
            personalized=personalized,
        )

    def _denoising_strength(
        self,
        loaded: LoadedModel,
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

    def _conditioning(self, loaded: LoadedModel, request: GenerationRequest) -> Conditioning:
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
        check_cancel(cancel)
        picture = request.inputs[0].image
        captioner = self._captioner()
        caption = captioner.caption(picture) if captioner is not None else ""
        check_cancel(cancel)
        texts = describe_picture(ranker, picture, seed=request.seed, caption=caption)
        return GenerationResult(
            images=(),
            seeds=(request.seed,),
            clip_scores=(),
            timings_s={"total_s": time.perf_counter() - started},
            texts=texts,
        )

    def _shorten(
        self, request: GenerationRequest, cancel: threading.Event | None
    ) -> GenerationResult:
        """A SHORTEN: each word's weight to the CLIP ranker's text tower and shorter prompts
        (shorten.py); the numbers ride in `clip_scores` (Shortened.scores)."""
        started = time.perf_counter()
        ranker = self._clip()
        check_cancel(cancel)
        found = shorten(request.prompt, ranker.text_embeddings)
        return GenerationResult(
            images=(),
            seeds=(request.seed,),
            clip_scores=found.scores(),
            timings_s={"total_s": time.perf_counter() - started},
            texts=found.prompts,
        )

    def _prepare_init_image(self, request: GenerationRequest) -> Image.Image:
        image = request.init_image
        assert image is not None
        image = image.convert("RGB")
        size = (request.width, request.height)
        if request.kind is JobKind.UPSCALE and request.upscale_mode is UpscaleMode.SUBTLE:
            upscaled = self._upscaler.upscale(image, size)
            if upscaled is not None:
                return upscaled
        if image.size != size:
            # Lanczos keeps edges crisp; the img2img pass then invents the missing detail.
            image = image.resize(size, Image.Resampling.LANCZOS)
        return image

    # ----------------------------------------------------------------------------- diffusion

    def _diffuse(
        self,
        loaded: LoadedModel,
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
            state = StepState(
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
        loaded: LoadedModel,
        request: GenerationRequest,
        seeds: tuple[int, ...],
        prompt_kwargs: dict[str, Any],
        init_image: Image.Image | None,
        state: StepState,
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
            record_denoised(scheduler, state)
        pipe.scheduler = scheduler

        kwargs: dict[str, Any] = {
            "num_inference_steps": request.steps,
            "guidance_scale": request.guidance,
            # Decoded here rather than by the pipeline, so that running out of memory while
            # decoding costs a second decode, not the whole denoising again.
            "output_type": "latent",
            "generator": generators,
            "callback_on_step_end": functools.partial(on_step_end, state=state),
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

    def _encode_prompt(self, loaded: LoadedModel, request: GenerationRequest) -> dict[str, Any]:
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
