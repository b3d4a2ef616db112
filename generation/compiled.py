"""Speed options applied to a model as it loads: torch.compile of its UNet and VAE decoder, and
fused attention projections; and what keeps a compiled UNet from recompiling per job.

torch.compile (Dynamo) compiles a graph for what it saw and guards it with every Python value
it read on the way: a float attribute, a flag, a module's type or the set of a dict's keys. A job
that changes one of those compiles again (a minute or more for SDXL on a GPU). So every switch a
job throws on the shared UNet changes tensors, not Python values, or takes one of a few graphs
that are compiled once and then kept side by side:

- Image prompts and references (IP-Adapter): the adapter's attention is attached for the job
  (generation/ip_adapter.py), one more graph. Its per-slot scales (--iw, --sw, --ow/--cw, per
  layer for a style) live in a tensor filled in place (generation/ip_attention.py), and the
  compiled graph runs every slot, an unused one at scale 0, so no weight or mix of pictures
  compiles again.
- LoRAs: added into the UNet's own weights for the pipeline call and restored exactly after
  (generation/lora_fusion.py), with peft's LoRA layers out of the UNet meanwhile. The compiled
  UNet is always the plain one: loading, evicting, combining or reweighing LoRAs compiles
  nothing.
- `--tile` changes the computation itself (wrap-around padding in every convolution): its own
  graph, for the UNet and the VAE decoder.
- A ControlNet's residuals, the edits' 9-channel inpainting UNet and SDXL's stock VAE decoded in
  float32 each take their own graph too.
- Sizes: the first job at a new size or batch compiles once more, with the sizes as variables;
  that graph then serves every size.

So the graphs are bounded by the combinations of those switches (a few dozen at the very most,
COMPILE_VARIANTS), not by the number of jobs. Dynamo's default limit of 8 graphs per function
would drop to eager once reached; it is raised to COMPILE_VARIANTS.
"""

from __future__ import annotations

import logging
from typing import Any

from generation.settings import CompileMode, EngineSettings

log = logging.getLogger(__name__)

# Dynamo's limit on graphs per compiled function (the UNet's forward), raised from its default
# of 8: --tile x adapter x ControlNet x static/dynamic sizes is 16 for one UNet, and the models a
# worker keeps (max_loaded_models) and their inpainting UNets share the forward's graphs.
COMPILE_VARIANTS = 64


def compile_options(settings: EngineSettings) -> dict[str, Any]:
    """torch.compile's arguments for these settings."""
    options: dict[str, Any] = {"backend": settings.compile_backend}
    if settings.compile_mode is not CompileMode.DEFAULT:
        options["mode"] = settings.compile_mode.value
    return options


def _configure_dynamo() -> None:
    import torch._dynamo

    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, COMPILE_VARIANTS)
    config.accumulated_recompile_limit = max(
        config.accumulated_recompile_limit, 4 * COMPILE_VARIANTS
    )
    # A graph that fails to compile (no C compiler for Triton's launchers, an operation the
    # backend can't lower) runs eagerly, with the reason in the log, instead of failing every
    # job of the bot; bench/gpu_check.py turns this off to see such failures.
    config.suppress_errors = True


def compile_unet(unet: Any, settings: EngineSettings) -> None:
    """Compile `unet` in place (the module stays itself: pipelines and loaders keep working)."""
    _configure_dynamo()
    # Loading a LoRA marks every weight as needing no gradient, and the compiled graphs are
    # guarded on that flag: set it at once (the engine never trains), so a LoRA compiles nothing.
    unet.requires_grad_(False)
    _hold_adapter_projection_slot(unet)
    unet.compile(**compile_options(settings))
    log.info("UNet compiled with %s", compile_options(settings))


def _hold_adapter_projection_slot(unet: Any) -> None:
    """Keep the UNet's empty `encoder_hid_proj` among its submodules from the start.

    The UNet's constructor sets it to None as a plain attribute; attaching the IP-Adapter makes
    it a submodule, and detaching leaves None there. Graphs guard where it is found, so every
    graph compiled before the first image prompt would compile again after it."""
    if getattr(unet, "encoder_hid_proj", None) is None and "encoder_hid_proj" not in unet._modules:
        if "encoder_hid_proj" in unet.__dict__:
            del unet.encoder_hid_proj
        unet.register_module("encoder_hid_proj", None)


def compile_vae_decoder(vae: Any, settings: EngineSettings) -> None:
    _configure_dynamo()
    vae.requires_grad_(False)
    vae.decoder.compile(**compile_options(settings))
    log.info("VAE decoder compiled with %s", compile_options(settings))


def apply_speed_options(pipe: Any, settings: EngineSettings) -> None:
    """The speed options of `settings` on a freshly loaded text-to-image pipeline: fused
    projections first (compiled graphs must see the final modules), then compilation."""
    if settings.fuse_qkv_projections:
        fuse_projections(pipe.unet)
        fuse_projections(pipe.vae)
    if settings.compile_unet:
        compile_unet(pipe.unet, settings)
    if settings.compile_vae:
        compile_vae_decoder(pipe.vae, settings)


def apply_to_extra_unet(unet: Any, settings: EngineSettings) -> None:
    """The same for a UNet loaded beside the model (its inpainting UNet)."""
    if settings.fuse_qkv_projections:
        fuse_projections(unet)
    if settings.compile_unet:
        compile_unet(unet, settings)


def fuse_projections(model: Any) -> None:
    """Query, key and value as one matmul in every attention of `model` (diffusers'
    fuse_qkv_projections). The separate projections stay: the IP-Adapter's attention and the
    LoRA fusion use them (a LoRA's change to them is copied into the fused one, lora_fusion)."""
    fuse = getattr(model, "fuse_qkv_projections", None)
    if fuse is None:
        log.warning("%s cannot fuse its attention projections", type(model).__name__)
        return
    fuse()


def uses_fused_loras(settings: EngineSettings) -> bool:
    """Whether LoRAs must be added into the UNet's weights for each call (lora_fusion) instead of
    running as peft's layers: a compiled UNet would recompile for each LoRA and weight, and a
    fused query/key/value projection would bypass peft's layers on them."""
    return settings.compile_unet or settings.fuse_qkv_projections
