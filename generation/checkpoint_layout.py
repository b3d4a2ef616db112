"""Diffusers components in the original single-file checkpoint layout (CompVis / Stability).

Community checkpoints (DreamBooth output, model-sharing sites) are one .safetensors file with
the original repositories' key names: the UNet under `model.diffusion_model.`, the VAE under
`first_stage_model.`, SD 1.x's CLIP text encoder under `cond_stage_model.transformer.`, SDXL's
two encoders under `conditioner.embedders.0.transformer.` (CLIP) and
`conditioner.embedders.1.model.` (OpenCLIP, with fused attention projections). The project
writes its tiny models in that layout so the single-file loading path (diffusers'
`from_single_file`, generation.single_file) is exercised offline exactly as a real file is.

The block numbering is derived from each model's config (layers per block, which up blocks
have attention), so any SD 1.x / SDXL-shaped UNet converts, not only the full-size ones.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

_RESNET_PARTS = (
    ("norm1.", "in_layers.0."),
    ("conv1.", "in_layers.2."),
    ("time_emb_proj.", "emb_layers.1."),
    ("norm2.", "out_layers.0."),
    ("conv2.", "out_layers.3."),
    ("conv_shortcut.", "skip_connection."),
)
_VAE_ATTENTION_PARTS = (
    ("group_norm.", "norm."),
    ("to_q.", "q."),
    ("to_k.", "k."),
    ("to_v.", "v."),
    ("to_out.0.", "proj_out."),
)
_OPEN_CLIP_PARTS = (
    ("text_model.encoder.layers.", "transformer.resblocks."),
    (".self_attn.", ".attn."),
    (".layer_norm1.", ".ln_1."),
    (".layer_norm2.", ".ln_2."),
    (".mlp.fc1.", ".mlp.c_fc."),
    (".mlp.fc2.", ".mlp.c_proj."),
    ("text_model.final_layer_norm.", "ln_final."),
)


def original_state_dict(pipe: Any) -> dict[str, Any]:
    """The pipeline's UNet, VAE and text encoder(s) as one original-layout state dict."""
    state: dict[str, Any] = {}
    state.update(_prefixed("model.diffusion_model.", unet_to_original(pipe.unet)))
    state.update(_prefixed("first_stage_model.", vae_to_original(pipe.vae)))
    encoder_2 = getattr(pipe, "text_encoder_2", None)
    if encoder_2 is None:
        state.update(
            _prefixed("cond_stage_model.transformer.", clip_to_original(pipe.text_encoder))
        )
    else:
        state.update(
            _prefixed("conditioner.embedders.0.transformer.", clip_to_original(pipe.text_encoder))
        )
        state.update(_prefixed("conditioner.embedders.1.model.", open_clip_to_original(encoder_2)))
    return state


def save_single_file(pipe: Any, path: Path) -> Path:
    """Write the pipeline as one original-layout .safetensors checkpoint."""
    from safetensors.torch import save_file

    state = {key: value.detach().contiguous() for key, value in original_state_dict(pipe).items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))
    return path


def unet_to_original(unet: Any) -> dict[str, Any]:
    config = unet.config
    per_block = config.layers_per_block
    if not isinstance(per_block, int):
        raise ValueError(f"unet: layers_per_block must be one number, got {per_block!r}")
    renames = [
        ("time_embedding.linear_1.", "time_embed.0."),
        ("time_embedding.linear_2.", "time_embed.2."),
        ("add_embedding.linear_1.", "label_emb.0.0."),
        ("add_embedding.linear_2.", "label_emb.0.2."),
        ("conv_in.", "input_blocks.0.0."),
        ("conv_norm_out.", "out.0."),
        ("conv_out.", "out.2."),
        ("mid_block.resnets.0.", "middle_block.0."),
        ("mid_block.attentions.0.", "middle_block.1."),
        ("mid_block.resnets.1.", "middle_block.2."),
    ]
    # The original UNet is a flat list of input blocks: conv_in, then per level its layers
    # (resnet + attention) and a downsampler; output blocks hold one more layer per level,
    # the level's upsampler riding on its last one.
    for level in range(len(config.down_block_types)):
        for layer in range(per_block):
            index = 1 + level * (per_block + 1) + layer
            renames.append((f"down_blocks.{level}.resnets.{layer}.", f"input_blocks.{index}.0."))
            renames.append((f"down_blocks.{level}.attentions.{layer}.", f"input_blocks.{index}.1."))
        downsample = (level + 1) * (per_block + 1)
        renames.append(
            (f"down_blocks.{level}.downsamplers.0.conv.", f"input_blocks.{downsample}.0.op.")
        )
    for level, block_type in enumerate(config.up_block_types):
        for layer in range(per_block + 1):
            index = level * (per_block + 1) + layer
            renames.append((f"up_blocks.{level}.resnets.{layer}.", f"output_blocks.{index}.0."))
            renames.append((f"up_blocks.{level}.attentions.{layer}.", f"output_blocks.{index}.1."))
        last = level * (per_block + 1) + per_block
        slot = 2 if "CrossAttn" in block_type else 1
        renames.append((f"up_blocks.{level}.upsamplers.0.", f"output_blocks.{last}.{slot}."))
    converted = {}
    for key, value in unet.state_dict().items():
        new = _rename(key, renames)
        if ".resnets." in key:
            new = _replace_parts(new, _RESNET_PARTS)
        converted[new] = value
    return converted


def vae_to_original(vae: Any) -> dict[str, Any]:
    levels = len(vae.config.down_block_types)
    renames = [
        ("encoder.conv_norm_out.", "encoder.norm_out."),
        ("decoder.conv_norm_out.", "decoder.norm_out."),
    ]
    for coder in ("encoder", "decoder"):
        renames += [
            (f"{coder}.mid_block.resnets.0.", f"{coder}.mid.block_1."),
            (f"{coder}.mid_block.resnets.1.", f"{coder}.mid.block_2."),
            (f"{coder}.mid_block.attentions.0.", f"{coder}.mid.attn_1."),
        ]
    for level in range(levels):
        renames.append((f"encoder.down_blocks.{level}.resnets.", f"encoder.down.{level}.block."))
        renames.append(
            (f"encoder.down_blocks.{level}.downsamplers.0.", f"encoder.down.{level}.downsample.")
        )
        # The decoder's levels are numbered from the bottom in the original.
        original = levels - 1 - level
        renames.append((f"decoder.up_blocks.{level}.resnets.", f"decoder.up.{original}.block."))
        renames.append(
            (f"decoder.up_blocks.{level}.upsamplers.0.", f"decoder.up.{original}.upsample.")
        )
    converted = {}
    for key, value in vae.state_dict().items():
        new = _rename(key, renames).replace(".conv_shortcut.", ".nin_shortcut.")
        if ".attentions." in key:
            new = _replace_parts(new, _VAE_ATTENTION_PARTS)
            if value.ndim == 2:
                # The original attention projections are 1x1 convolutions.
                value = value.reshape(*value.shape, 1, 1)
        converted[new] = value
    return converted


def clip_to_original(encoder: Any) -> dict[str, Any]:
    """transformers' CLIPTextModel keys as the original checkpoints write them (`text_model.`
    first: newer transformers releases flatten that level away)."""
    return {
        key if key.startswith("text_model.") else f"text_model.{key}": value
        for key, value in encoder.state_dict().items()
    }


def open_clip_to_original(encoder: Any) -> dict[str, Any]:
    """A CLIPTextModelWithProjection in OpenCLIP's layout: q/k/v fused into one projection,
    the text projection as a transposed matrix."""
    import torch

    state = dict(encoder.state_dict())
    converted: dict[str, Any] = {
        "token_embedding.weight": state.pop("text_model.embeddings.token_embedding.weight"),
        "positional_embedding": state.pop("text_model.embeddings.position_embedding.weight"),
        "text_projection": state.pop("text_projection.weight").T,
    }
    fused: dict[str, dict[str, Any]] = {}
    for key, value in state.items():
        for kind in ("weight", "bias"):
            for letter in "qkv":
                suffix = f".self_attn.{letter}_proj.{kind}"
                if key.endswith(suffix):
                    layer = _replace_parts(key.removesuffix(suffix) + ".", _OPEN_CLIP_PARTS)
                    fused.setdefault(f"{layer}attn.in_proj_{kind}", {})[letter] = value
                    break
            else:
                continue
            break
        else:
            if "position_ids" not in key:
                converted[_replace_parts(key, _OPEN_CLIP_PARTS)] = value
    for key, parts in fused.items():
        converted[key] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return converted


def _prefixed(prefix: str, state: dict[str, Any]) -> dict[str, Any]:
    return {prefix + key: value for key, value in state.items()}


def _rename(key: str, renames: Iterable[tuple[str, str]]) -> str:
    for old, new in renames:
        if key.startswith(old):
            return new + key[len(old) :]
    return key


def _replace_parts(key: str, parts: Iterable[tuple[str, str]]) -> str:
    for old, new in parts:
        key = key.replace(old, new)
    return key
