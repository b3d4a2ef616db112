"""A job's LoRAs added into a UNet's own weights for one pipeline call, restored exactly after.

Used instead of peft's LoRA layers when the UNet is compiled or its attention projections are
fused (generation.compiled.uses_fused_loras):

- compiled, peft's layers put the active adapters' names, their weights and which layers each
  one targets into the graph's guards: every new LoRA, combination or weight compiled the UNet
  again, and the first LoRA loaded changed the UNet's structure under every graph;
- with fused projections, the attention reads query, key and value through one fused matmul and
  never calls peft's layers on to_q, to_k and to_v: a LoRA there would be silently dropped.

LoRAs are still loaded, switched and evicted by generation.lora.LoraSet through diffusers, as
without these options (the text encoders keep running them as peft's layers). Around the call,
`fused` takes each UNet's peft layers out of it (the plain layers they wrap go back in, so the
UNet is exactly the module it was before any LoRA), adds the job's active adapters into the
plain layers' weights with peft's own merge (which knows LoRA's variants), and copies the
result into any fused projection. Afterwards the weights are copied back from a copy taken
first, bit for bit (adding and subtracting the change again would drift in half precision over
thousands of jobs), and peft's layers go back in. The copies cost the targeted weights' memory
once more during the job: for a LoRA on every attention projection, 0.17 GiB in float16 for
SD 1.5 (11 % of its UNet's weights) and 1.8 GiB for SDXL (37 %), counted from their configs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any


def _lora_layers(unet: Any) -> list[tuple[Any, str, Any]]:
    """(parent module, attribute, peft LoRA layer) for every LoRA layer in `unet`."""
    from peft.tuners.lora import LoraLayer

    found = []
    for name, module in unet.named_modules():
        if isinstance(module, LoraLayer):
            parent_name, _, attribute = name.rpartition(".")
            found.append((unet.get_submodule(parent_name), attribute, module))
    return found


def _active(layer: Any) -> list[str]:
    """The adapters this layer runs in the current job (LoraSet.active turned them on)."""
    if layer.disable_adapters:
        return []
    return [name for name in layer.active_adapters if name in layer.lora_A]


@contextlib.contextmanager
def fused(unets: Sequence[Any]) -> Iterator[None]:
    """Each of `unets` as its plain self, with the LoRAs active on it in its weights."""
    import torch

    placed: list[tuple[Any, str, Any]] = []
    saved: dict[int, tuple[Any, Any]] = {}
    try:
        with torch.no_grad():
            for unet in unets:
                for parent, attribute, layer in _lora_layers(unet):
                    active = _active(layer)
                    base = layer.get_base_layer()
                    if active:
                        for tensor in (base.weight, getattr(base, "bias", None)):
                            if tensor is not None and id(tensor) not in saved:
                                saved[id(tensor)] = (tensor, tensor.detach().clone())
                        layer.merge(adapter_names=active)
                        # The change is undone from the copies, not by peft's unmerge.
                        layer.merged_adapters.clear()
                    setattr(parent, attribute, base)
                    placed.append((parent, attribute, layer))
            _refresh_fused_projections(unets, saved)
        yield
    finally:
        with torch.no_grad():
            for tensor, copy in saved.values():
                tensor.copy_(copy)
            _refresh_fused_projections(unets, saved)
            for parent, attribute, layer in reversed(placed):
                setattr(parent, attribute, layer)


def _refresh_fused_projections(unets: Sequence[Any], changed: dict[int, Any]) -> None:
    """Copy to_q/to_k/to_v into the fused to_qkv (self-attention) or to_kv (cross-attention)
    of every attention whose projections `changed` holds, as diffusers' fuse_projections
    made them."""
    import torch

    if not changed:
        return
    for unet in unets:
        for module in unet.modules():
            if not getattr(module, "fused_projections", False):
                continue
            names = ("to_k", "to_v") if module.is_cross_attention else ("to_q", "to_k", "to_v")
            parts = [getattr(module, name) for name in names]
            if not any(id(part.weight) in changed for part in parts):
                continue
            fused_layer = module.to_kv if module.is_cross_attention else module.to_qkv
            fused_layer.weight.copy_(torch.cat([part.weight for part in parts]))
            if fused_layer.bias is not None:
                fused_layer.bias.copy_(torch.cat([part.bias for part in parts]))
