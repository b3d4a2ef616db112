"""The image adapter (IP-Adapter) at work: loading it into a model, embedding pictures, and
attaching it to the UNet only while a job that uses it runs.

`load_ip_adapter` replaces the UNet's attention processors and makes the UNet demand image
embeddings on every call, which would break every other job on the shared pipelines (plain
text-to-image, the outpaint and ControlNet routines). So the adapter is loaded once, its
processors (as generation.ip_attention's, whose scales are tensors a compiled UNet reads) and
projection are kept aside, and `Conditioning.applied` puts them in for one job and restores the
plain ones after, whatever happens: switching costs no disk reads.

The adapter is loaded with one slot per role (conditioning.ADAPTER_ROLES) so a job can have an
image prompt, a style and an object reference at once, each at its own per-layer scale; the
slots share one copy of the weights.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from generation.conditioning import (
    ADAPTER_ROLES,
    NO_CONDITIONING,
    ConditioningPlan,
    style_scales,
)
from generation.offload import offload_hook
from generation.settings import IPAdapterSpec, check_adapter_weight_name

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AdapterSource:
    """Where `load_ip_adapter` finds an adapter: a folder or hub id and the names inside it."""

    source: str
    subfolder: str
    weight_name: str
    image_encoder_folder: str


def resolve_adapter_source(spec: IPAdapterSpec, cache_dir: Path) -> AdapterSource:
    """The configured adapter, or the tiny one (built on first use) for `source = "tiny"`."""
    if spec.tiny:
        from generation import tiny

        folder = tiny.ensure_tiny_ip_adapter(cache_dir, spec.family)
        return AdapterSource(
            str(folder),
            tiny.TINY_IP_ADAPTER_SUBFOLDER,
            tiny.TINY_IP_ADAPTER_WEIGHTS,
            tiny.TINY_IP_ADAPTER_ENCODER,
        )
    # Checked at start-up too; settings made in code reach here without that.
    check_adapter_weight_name(spec.weight_name)
    return AdapterSource(spec.source, spec.subfolder, spec.weight_name, spec.image_encoder_folder)


class ImageAdapter:
    """One model's IP-Adapter, loaded into its text-to-image pipeline and then detached."""

    def __init__(
        self,
        pipe: Any,
        spec: IPAdapterSpec,
        cache_dir: Path,
        *,
        local_files_only: bool,
        device: str,
        offload: bool = False,
    ) -> None:
        from diffusers.models.embeddings import ImageProjection
        from transformers import CLIPImageProcessorPil

        started = time.perf_counter()
        self.spec = spec
        self.device = device
        where = resolve_adapter_source(spec, cache_dir)
        unet = pipe.unet
        plain = dict(unet.attn_processors)
        kwargs: dict[str, Any] = {"local_files_only": local_files_only}
        if not Path(where.source).is_dir():
            kwargs["cache_dir"] = str(cache_dir / "hub")
        try:
            pipe.load_ip_adapter(
                where.source,
                subfolder=where.subfolder,
                weight_name=[where.weight_name] * len(ADAPTER_ROLES),
                image_encoder_folder=where.image_encoder_folder,
                **kwargs,
            )
        except (OSError, ValueError) as exc:
            unet.set_attn_processor(dict(plain))
            raise RuntimeError(
                f"ip_adapters: cannot load the {spec.family} image adapter from "
                f"{where.source!r} ({exc})"
            ) from exc
        self._projection = unet.encoder_hid_proj
        self._hid_type = unet.config.encoder_hid_dim_type
        _share_slot_weights(unet.attn_processors.values(), self._projection)
        from generation.ip_attention import scaled_processors

        # Scales in tensors, so a compiled UNet runs every job's pictures in one graph.
        self._processors = scaled_processors(dict(unet.attn_processors))
        self.encoder = pipe.image_encoder
        self._encoder_offload: Any = None
        if offload:
            # load_ip_adapter put the encoder where the offloaded pipeline's modules rest (the
            # CPU) and outside their offload hooks, while pictures go to `device`: it gets a
            # hook of its own, moving it there to embed and back after (`embed`).
            self._encoder_offload = offload_hook(self.encoder, device)
        size = int(self.encoder.config.image_size)
        # The PIL processor with CLIP's own normalisation: the default one needs torchvision.
        self.preprocess = CLIPImageProcessorPil(
            size={"shortest_edge": size}, crop_size={"height": size, "width": size}
        )
        first = self._projection.image_projection_layers[0]
        # "Plus" adapters read the encoder's penultimate hidden states, plain ones its embedding.
        self.hidden_states = not isinstance(first, ImageProjection)
        self._plain = plain
        self._empty: Any = None
        self._detach(unet)
        log.info(
            "loaded image adapter %s for %s in %.2fs",
            where.source,
            spec.family,
            time.perf_counter() - started,
        )

    def embed(self, images: Sequence[Image.Image], weights: Sequence[float]) -> tuple[Any, Any]:
        """(picture, empty-picture) embeddings, each (1, 1, …): the pictures' weighted mean.

        The mean of unit-ish CLIP embeddings is shorter than any of them; it is scaled back to
        their mean length so a blend steers as firmly as one picture.
        """
        import torch

        dtype = next(self.encoder.parameters()).dtype
        pixels = self.preprocess(
            images=[image.convert("RGB") for image in images], return_tensors="pt"
        )["pixel_values"].to(self.device, dtype)
        with torch.inference_mode():
            if self.hidden_states:
                embeds = self.encoder(pixels, output_hidden_states=True).hidden_states[-2]
                empty = self.encoder(
                    torch.zeros_like(pixels[:1]), output_hidden_states=True
                ).hidden_states[-2]
            else:
                embeds = self.encoder(pixels).image_embeds
                empty = torch.zeros_like(embeds[:1])
        if self._encoder_offload is not None:
            self._encoder_offload.offload()
        embeds = embeds.float()
        self._empty = empty.float().unsqueeze(1).to(dtype)
        total = float(sum(weights))
        shares = [w / total for w in weights] if total > 0 else [1.0 / len(images)] * len(images)
        share = torch.tensor(shares, dtype=embeds.dtype, device=embeds.device)
        share = share.view(-1, *([1] * (embeds.dim() - 1)))
        mean = (embeds * share).sum(dim=0, keepdim=True)
        if len(images) > 1:
            lengths = embeds.flatten(1).norm(dim=1)
            length = mean.flatten(1).norm(dim=1).clamp_min(1e-6)
            mean = mean * (lengths.mean() / length).view(-1, *([1] * (mean.dim() - 1)))
        return mean.unsqueeze(1).to(dtype), self._empty

    def empty(self) -> Any:
        """The empty-picture embedding (what an unused slot and guidance's negative get)."""
        if self._empty is None:
            self.embed([Image.new("RGB", (8, 8))], [1.0])
        return self._empty

    @contextlib.contextmanager
    def attached(self, pipe: Any, scales: list[Any]) -> Iterator[None]:
        """The adapter in `pipe`'s UNet with these per-slot scales, for one pipeline call."""
        unet = pipe.unet
        unet.set_attn_processor(dict(self._processors))
        unet.encoder_hid_proj = self._projection
        unet.config.encoder_hid_dim_type = self._hid_type
        try:
            pipe.set_ip_adapter_scale(scales)
            from generation.ip_attention import sync_scales

            sync_scales(unet.attn_processors.values())
            yield
        finally:
            self._detach(unet)

    def _detach(self, unet: Any) -> None:
        unet.set_attn_processor(dict(self._plain))
        unet.encoder_hid_proj = None
        # diffusers' own unload_ip_adapter resets the config attribute the same way.
        unet.config.encoder_hid_dim_type = None


def _share_slot_weights(processors: Any, projection: Any) -> None:
    """The role slots were loaded from one file: point them all at the first slot's tensors."""
    for processor in processors:
        for name in ("to_k_ip", "to_v_ip"):
            layers = getattr(processor, name, None)
            if layers is None:
                continue
            for layer in list(layers)[1:]:
                layer.weight = layers[0].weight
    first, *others = list(projection.image_projection_layers)
    for layer in others:
        for name, shared in list(first.named_parameters()):
            module_name, _, attr = name.rpartition(".")
            setattr(layer.get_submodule(module_name), attr, shared)


@dataclass
class Conditioning:
    """A job's conditioning, ready for the pipeline call (see ConditioningPlan)."""

    plan: ConditioningPlan
    adapter: ImageAdapter | None = None
    style_layers: tuple[tuple[str, tuple[float, ...]], ...] = ()
    # Per slot: (picture embedding, empty-picture embedding).
    embeds: list[tuple[Any, Any]] = field(default_factory=list)

    @property
    def init_image(self) -> Image.Image | None:
        return self.plan.init_image

    @property
    def strength(self) -> float | None:
        return self.plan.strength

    def pipeline_kwargs(self, count: int, *, per_candidate: bool, guidance: float) -> dict:
        """`ip_adapter_image_embeds` for a call making `count` images: one row per prompt in
        the list form (`per_candidate`), else one row the pipeline repeats; with classifier-free
        guidance (guidance > 1) the empty-picture rows come first, as diffusers expects."""
        if self.adapter is None:
            return {}
        import torch

        rows = count if per_candidate else 1
        embeds = []
        for positive, negative in self.embeds:
            parts = [negative] * rows + [positive] * rows if guidance > 1 else [positive] * rows
            embeds.append(torch.cat(parts, dim=0))
        return {"ip_adapter_image_embeds": embeds}

    def applied(self, pipe: Any) -> contextlib.AbstractContextManager[None]:
        if self.adapter is None:
            return contextlib.nullcontext()
        scales: list[Any] = []
        for slot in self.plan.slots:
            if slot.style_only and slot.scale != 0:
                scales.append(style_scales(self.style_layers, slot.scale))
            else:
                scales.append(slot.scale)
        return self.adapter.attached(pipe, scales)


NO_PICTURES = Conditioning(plan=NO_CONDITIONING)


def prepare(plan: ConditioningPlan, adapter: ImageAdapter | None) -> Conditioning:
    """Embed the plan's pictures (off the pipeline call, once per job)."""
    if not plan.uses_adapter:
        return Conditioning(plan=ConditioningPlan(plan.init_image, plan.strength))
    if adapter is None:
        raise RuntimeError("an image adapter is needed for this job but none is loaded")
    embeds = []
    for slot in plan.slots:
        if slot.images:
            embeds.append(adapter.embed(slot.images, slot.weights))
        else:
            # An unused slot runs at scale 0, which diffusers skips; it still needs a tensor.
            embeds.append((adapter.empty(), adapter.empty()))
    return Conditioning(
        plan=plan, adapter=adapter, style_layers=adapter.spec.style(), embeds=embeds
    )
