"""The IP-Adapter's attention with its scales in a tensor, so a compiled UNet runs every job's
pictures through one graph.

diffusers' IPAdapterAttnProcessor2_0 keeps each slot's scale as a Python float and skips a slot
whose scale is 0. Compiled, both end up in the graph's guards: every new --iw, --sw or --ow (and
every mix of used and unused slots) would compile the UNet again. This processor is the same
attention, but:

- run eagerly (the UNet not compiled), it is diffusers' own code, unchanged;
- compiled, it reads the scales from `scale_values`, a tensor `sync_scales` fills in place after
  diffusers' `set_ip_adapter_scale` set the floats, and runs every slot (an unused one is
  multiplied by 0: a few extra attention rows over 4 or 16 picture tokens).

Masked IP-Adapter attention (diffusers' ip_adapter_masks) is not used by the engine and is left
to diffusers' code.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0


class ScaledIPAdapterAttnProcessor(IPAdapterAttnProcessor2_0):
    """diffusers' IP-Adapter attention sharing `loaded`'s layers, with its scales in a tensor."""

    # One scale per slot (a buffer: it moves with the UNet).
    scale_values: torch.Tensor

    def __init__(self, loaded: IPAdapterAttnProcessor2_0) -> None:
        # Not IPAdapterAttnProcessor2_0.__init__: that would allocate new projections only to
        # replace them with `loaded`'s.
        torch.nn.Module.__init__(self)
        self.hidden_size = loaded.hidden_size
        self.cross_attention_dim = loaded.cross_attention_dim
        self.num_tokens = loaded.num_tokens
        self.scale = list(loaded.scale)
        self.to_k_ip = loaded.to_k_ip
        self.to_v_ip = loaded.to_v_ip
        device = self.to_k_ip[0].weight.device
        self.register_buffer(
            "scale_values", torch.zeros(len(self.scale), device=device), persistent=False
        )
        self.sync_scales()

    def sync_scales(self) -> None:
        """Copy the slots' scales (floats, as diffusers' set_ip_adapter_scale leaves them) into
        `scale_values`, in place: the compiled graph reads that tensor."""
        values = []
        for scale in self.scale:
            if isinstance(scale, (list, tuple)):
                # Per-picture scales come only with masks, which the engine does not use.
                raise ValueError(f"ip-adapter scale: one value per slot, got {scale!r}")
            values.append(float(scale))
        self.scale_values.copy_(torch.tensor(values, dtype=self.scale_values.dtype))

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Any = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        scale: float = 1.0,
        ip_adapter_masks: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if (
            not torch.compiler.is_compiling()
            or ip_adapter_masks is not None
            or not isinstance(encoder_hidden_states, tuple)
        ):
            return super().__call__(
                attn,
                hidden_states,
                encoder_hidden_states,
                attention_mask,
                temb,
                scale,
                ip_adapter_masks,
            )
        return self._every_slot(attn, hidden_states, encoder_hidden_states, attention_mask, temb)

    def _every_slot(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: tuple[torch.Tensor, list[torch.Tensor]],
        attention_mask: torch.Tensor | None,
        temb: torch.Tensor | None,
    ) -> torch.Tensor:
        """diffusers' IPAdapterAttnProcessor2_0.__call__ without masks, each slot weighed by
        its entry of `scale_values` and none skipped."""
        residual = hidden_states
        text_states, ip_hidden_states = encoder_hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = text_states.shape
        if attention_mask is not None:
            mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = mask.view(batch_size, attn.heads, -1, mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if attn.norm_cross:
            text_states = attn.norm_encoder_hidden_states(text_states)
        key = attn.to_k(text_states)
        value = attn.to_v(text_states)
        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        hidden_states = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
        )
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        for slot, (states, to_k_ip, to_v_ip) in enumerate(
            zip(ip_hidden_states, self.to_k_ip, self.to_v_ip, strict=True)
        ):
            ip_key = to_k_ip(states).view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            ip_value = to_v_ip(states).view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            current = F.scaled_dot_product_attention(
                query, ip_key, ip_value, attn_mask=None, dropout_p=0.0, is_causal=False
            )
            current = current.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
            current = current.to(query.dtype)
            hidden_states = hidden_states + self.scale_values[slot].to(query.dtype) * current
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2)
            hidden_states = hidden_states.reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def scaled_processors(processors: dict[str, Any]) -> dict[str, Any]:
    """`processors` with each of diffusers' IP-Adapter attentions as a ScaledIPAdapterAttnProcessor
    over the same layers (the others as they are)."""
    return {
        name: ScaledIPAdapterAttnProcessor(processor)
        if type(processor) is IPAdapterAttnProcessor2_0
        else processor
        for name, processor in processors.items()
    }


def sync_scales(processors: Any) -> None:
    for processor in processors:
        if isinstance(processor, ScaledIPAdapterAttnProcessor):
            processor.sync_scales()
