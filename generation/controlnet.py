"""ControlNet: structure from a member's picture (edges, depth …) steering a job.

A ControlNet pipeline is made from a model's loaded pipeline with `from_pipe(..., controlnet=)`:
it shares the UNet, VAE and text encoders (and so any LoRA loaded into them), adding only the
ControlNet's own weights. The Auto pipelines pick the class: StableDiffusion(XL)ControlNet for
text-to-image, its Img2Img sibling for variations and upscales. ControlNet weights are loaded
once and shared by the models that use them; the pipelines built on a model live with that model
and go when it is unloaded, and a ControlNet no loaded model uses goes then too. With cpu_offload
a ControlNet rests on the CPU like the model's own modules: it moves to the device when it runs
and back after the job (`ControlJob.release`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from PIL import Image

from generation.contract import GenerationRequest, InputRole
from generation.offload import offload_hook
from generation.preprocess import Preprocessors
from generation.settings import ControlNetSpec, EngineSettings

log = logging.getLogger(__name__)

# (class, source, dtype) -> a loaded model: the engine's loader (fp16 variants, cache folder).
Loader = Callable[[Any, str, Any], Any]


@dataclass
class ControlJob:
    """One job's ControlNet: the model, the control map at the output size, and its weight."""

    spec: ControlNetSpec
    model: Any
    control_map: Image.Image
    weight: float
    # The model's ControlNet pipelines, kept with the model's other pipelines.
    pipes: dict[tuple[str, bool], Any]
    # With cpu_offload, the hook that puts the ControlNet back on the CPU (`release`).
    offload: Any = None

    def pipeline(self, base: Any, img2img: bool) -> Any:
        """The ControlNet pipeline over `base`'s modules (built on first use, then kept)."""
        key = (self.spec.name, img2img)
        pipe = self.pipes.get(key)
        if pipe is None:
            from diffusers import AutoPipelineForImage2Image, AutoPipelineForText2Image

            auto = AutoPipelineForImage2Image if img2img else AutoPipelineForText2Image
            pipe = auto.from_pipe(base, controlnet=self.model)
            pipe.set_progress_bar_config(disable=True)
            self.pipes[key] = pipe
        return pipe

    def call_kwargs(self, img2img: bool, count: int) -> dict[str, Any]:
        """Pipeline arguments: text-to-image takes the map as `image`; img2img, whose `image`
        is the picture being varied, as `control_image`, one per candidate (its list form)."""
        if img2img:
            return {
                "control_image": [self.control_map] * count,
                "controlnet_conditioning_scale": self.weight,
            }
        return {"image": self.control_map, "controlnet_conditioning_scale": self.weight}

    def release(self) -> None:
        """After the job: an offloaded ControlNet goes back to the CPU. Its hook brought it to
        the device for the first step and nothing in the pipeline call sends it back."""
        if self.offload is not None:
            self.offload.offload()


class ControlNets:
    """Loads ControlNets and preprocessors once; prepares each job's `ControlJob`."""

    def __init__(self, settings: EngineSettings, device: str, dtype: Any, loader: Loader) -> None:
        self.settings = settings
        self.device = device
        self.dtype = dtype
        self._loader = loader
        self.preprocessors = Preprocessors(
            device, settings.cache_dir, settings.local_files_only, dtype
        )
        self._models: dict[str, Any] = {}
        # With cpu_offload, each loaded ControlNet's offload hook, by the same key.
        self._offloads: dict[str, Any] = {}

    def prepare(
        self,
        request: GenerationRequest,
        pipes: dict[tuple[str, bool], Any],
        dtype: Any,
        *,
        offload: bool = False,
    ) -> ControlJob | None:
        """The job's ControlNet with its control map, or None when the job has none. With
        `offload` (the engine's cpu_offload) the ControlNet is loaded onto the CPU with an
        offload hook; the caller calls the job's `release` when the pipeline call is over."""
        if request.controlnet is None:
            return None
        if request.kind.is_edit:
            # Zoom, pan and region edits repaint a changed canvas with an inpainting UNet, which
            # neither the map nor the ControlNet fits; the edit builders leave it out
            # (generation.contract._edit) and the bot tells the member. This catches a request
            # made some other way.
            log.info(
                "%s job: ControlNet %s not applied to an edit", request.kind, request.controlnet
            )
            return None
        spec = self.settings.controlnet(request.controlnet)
        (control,) = request.inputs_for(InputRole.CONTROL)
        control_map = self.preprocessors.control_map(
            control.image, spec, (request.width, request.height), self.settings.controlnet_fit
        )
        model = self.model(spec, dtype, offload=offload)
        return ControlJob(
            spec=spec,
            model=model,
            control_map=control_map,
            weight=request.controlnet_weight,
            pipes=pipes,
            offload=self._offloads.get(self._key(spec, dtype)),
        )

    @staticmethod
    def _key(spec: ControlNetSpec, dtype: Any) -> str:
        return f"{spec.name}:{dtype}"

    def model(self, spec: ControlNetSpec, dtype: Any, *, offload: bool = False) -> Any:
        key = self._key(spec, dtype)
        model = self._models.get(key)
        if model is None:
            from diffusers import ControlNetModel

            started = time.perf_counter()
            try:
                model = self._loader(ControlNetModel, spec.source, dtype)
            except OSError as exc:
                raise RuntimeError(
                    f"controlnet: cannot load {spec.name!r} from {spec.source!r} ({exc}); use "
                    "a diffusers ControlNet folder (config.json inside) or a Hugging Face id"
                ) from exc
            if offload:
                # Not chained after a text encoder, as an inpaint_source UNet is: one ControlNet
                # serves every model that uses it. diffusers' own offloaded ControlNet pipelines
                # hook it the same way and offload it when the call ends.
                self._offloads[key] = offload_hook(model, self.device)
            else:
                model.to(self.device)
            self._models[key] = model
            log.info("loaded ControlNet %s in %.2fs", spec.name, time.perf_counter() - started)
        return model

    def release_unused(self, pipes: Iterable[dict[tuple[str, bool], Any]]) -> None:
        """Drop the ControlNets none of `pipes` (the loaded models' ControlNet pipelines) use:
        kept, they would hold the memory that unloading a model under max_loaded_models frees."""
        in_use = {id(pipe.controlnet) for model_pipes in pipes for pipe in model_pipes.values()}
        for key, model in list(self._models.items()):
            if id(model) not in in_use:
                del self._models[key]
                self._offloads.pop(key, None)

    def close(self) -> None:
        self._models.clear()
        self._offloads.clear()
        self.preprocessors.close()
