"""Small random-weight Stable Diffusion and CLIP models, built in code with fixed seeds.

Long (about 650 lines) on purpose: it holds one idea, the stand-in models, one short builder per
kind the engine loads (SD 1.5, SDXL, inpainting, CLIP, the captioner, ControlNets, adapters,
LoRAs), kept together so their shared seeds and shapes stay in one place.

The model hub cannot be reached from every machine this project runs on (CI included), so the
project builds its own stand-ins from configs and saves them in the normal diffusers /
transformers folder layout. The engine then loads them back through exactly the same
`from_pretrained` path as real weights, which is the point: tests exercise the real loading,
scheduling, batching and decoding code, only the weights are noise.

Shapes follow measured facts: the VAE has four levels so it downsamples 8x like real SD (the
two-level VAE of the diffusers test models downsamples 2x and is ~50x slower at 256 px).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from generation.settings import EngineSettings

log = logging.getLogger(__name__)

TINY_SD_DIR = "tiny-sd"
TINY_CLIP_DIR = "tiny-clip"
TINY_CAPTION_DIR = "tiny-blip"
TINY_SDXL_DIR = "tiny-sdxl"
# Model source that resolves to the tiny SDXL-shaped pipeline (for SDXL code paths offline).
TINY_SDXL = "tiny-sdxl"
# An inpainting checkpoint folder (a `unet/` with 9 input channels) matching the tiny SD model.
TINY_INPAINT_DIR = "tiny-inpaint"
TINY_INPAINT = "tiny-inpaint"
# Bump when the architecture or seed changes so stale caches are rebuilt rather than reused.
TINY_VERSION = 1
_MARKER = "imagine-bot-tiny.json"
TINY_SEED = 1234
# Side of the square the tiny UNet's `sample_size` corresponds to; settings.TINY uses the same.
TINY_BASE_RESOLUTION = 128

_build_lock = threading.Lock()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table (a fixed public mapping)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes), strict=True))


def tiny_tokenizer_files() -> tuple[dict[str, int], list[str]]:
    """A valid CLIP BPE vocabulary: every byte, plus merges of lowercase letter pairs.

    A tiny text encoder does not need the real 49,408-token vocabulary; letter-pair merges keep
    ordinary prompts well inside the 77-token window so truncation behaves like the real thing.
    """
    chars = list(_bytes_to_unicode().values())
    vocab_list = chars + [c + "</w>" for c in chars]
    merges = []
    letters = "abcdefghijklmnopqrstuvwxyz"
    for first in letters:
        for second in letters:
            merges.append(f"{first} {second}</w>")
            merges.append(f"{first} {second}")
            vocab_list.append(f"{first}{second}</w>")
            vocab_list.append(f"{first}{second}")
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(vocab_list)}
    return vocab, merges


def _tiny_tokenizer():  # -> CLIPTokenizer
    from transformers import CLIPTokenizer

    vocab, merges = tiny_tokenizer_files()
    # Write real vocab.json/merges.txt and load them, the way a downloaded tokenizer is loaded.
    with tempfile.TemporaryDirectory() as scratch:
        vocab_file = Path(scratch, "vocab.json")
        merges_file = Path(scratch, "merges.txt")
        vocab_file.write_text(json.dumps(vocab), encoding="utf-8")
        merges_file.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        tokenizer = CLIPTokenizer.from_pretrained(scratch, model_max_length=77)
    return tokenizer


def sd15_scheduler():  # -> DDIMScheduler
    """SD 1.5's own scheduler config; samplers are swapped per job with `from_config`."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def sdxl_scheduler():  # -> EulerDiscreteScheduler
    """SDXL base's own scheduler config; samplers are swapped per job with `from_config`."""
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
    )


def _tiny_sd_unet(in_channels: int):  # -> UNet2DConditionModel
    """The tiny SD 1.x UNet, random weights from torch's current seed; `in_channels` is 4 for
    text-to-image, 9 for an inpainting checkpoint's UNet."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=TINY_BASE_RESOLUTION // 8,
        in_channels=in_channels,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )


def build_tiny_sd(folder: Path, seed: int = TINY_SEED) -> None:
    """Build the tiny SD 1.x-shaped pipeline and save it (diffusers layout) into `folder`."""
    import torch
    from diffusers import (
        AutoencoderKL,
        StableDiffusionPipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = _tiny_tokenizer()
    torch.manual_seed(seed)
    unet = _tiny_sd_unet(in_channels=4)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 32, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=TINY_BASE_RESOLUTION,
    )
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=5,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    scheduler = sd15_scheduler()
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    # diffusers' __init__ types its pipelines as the dummy classes used without torch.
    pipe.save_pretrained(folder, safe_serialization=True)  # type: ignore[attr-defined]


def build_tiny_sdxl(folder: Path, seed: int = TINY_SEED, text_encoder_2_width: int = 32) -> None:
    """A tiny SDXL-shaped pipeline: two text encoders, pooled + size conditioning ("text_time").

    It exists so the SDXL code paths (Auto pipeline selection, pooled prompt embeddings) are
    exercised offline; SD 1.x's tiny model stays the default. `text_encoder_2_width` other than
    the first encoder's 32 makes the encoders tell apart by shape, as real SDXL's (768 and
    1280) do: diffusers' single-file loader tells them apart that way.
    """
    import torch
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = _tiny_tokenizer()
    text_config = {
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_hidden_layers": 5,
        "num_attention_heads": 4,
        "max_position_embeddings": 77,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    torch.manual_seed(seed + 10)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_config))
    torch.manual_seed(seed + 11)
    text_encoder_2 = CLIPTextModelWithProjection(
        CLIPTextConfig(
            **{**text_config, "hidden_size": text_encoder_2_width},
            projection_dim=text_encoder_2_width,
        )
    )
    torch.manual_seed(seed + 12)
    unet = UNet2DConditionModel(
        sample_size=TINY_BASE_RESOLUTION // 8,
        block_out_channels=(32, 64),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        # 6 size/crop numbers x 8 + the pooled text embedding.
        projection_class_embeddings_input_dim=6 * 8 + text_encoder_2_width,
        # Both encoders' hidden states side by side.
        cross_attention_dim=32 + text_encoder_2_width,
    )
    torch.manual_seed(seed + 13)
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 32, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=TINY_BASE_RESOLUTION,
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=sdxl_scheduler(),
    )
    pipe.save_pretrained(folder, safe_serialization=True)  # type: ignore[attr-defined]


def build_tiny_clip(folder: Path, seed: int = TINY_SEED) -> None:
    """Build the tiny CLIPModel with its processor and tokenizer and save them into `folder`."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor

    tokenizer = _tiny_tokenizer()
    torch.manual_seed(seed + 3)
    config = CLIPConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 77,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": 224,
            "patch_size": 32,
        },
        projection_dim=32,
    )
    model = CLIPModel(config)
    # The PIL processor: the default one needs torchvision, which is not always importable.
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}
    )
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)


# The tiny captioner's words: its random weights string some of them together, so its captions
# read as words (a real BLIP's vocabulary is BERT's 30522 pieces).
_CAPTION_WORDS = (
    "a photo painting drawing of the with on in and red blue green golden dark bright cat dog "
    "house tree river mountain city sky woman man bird flower boat street forest"
).split()


def build_tiny_captioner(folder: Path, seed: int = TINY_SEED) -> None:
    """Build a tiny BLIP captioning model (BlipForConditionalGeneration) with its processor and
    a word-level BERT tokenizer, and save them into `folder`: the layout of
    Salesforce/blip-image-captioning-base, loaded the same way."""
    import torch
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessorPil,
        BlipProcessor,
    )

    folder.mkdir(parents=True, exist_ok=True)
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join([*special, *_CAPTION_WORDS]) + "\n", encoding="utf-8")
    tokenizer = BertTokenizer(str(vocab), bos_token="[CLS]")
    torch.manual_seed(seed + 30)
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "max_position_embeddings": 64,
        "bos_token_id": tokenizer.cls_token_id,
        "sep_token_id": tokenizer.sep_token_id,
        "eos_token_id": tokenizer.sep_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    vision = {
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "image_size": 32,
        "patch_size": 8,
    }
    model = BlipForConditionalGeneration(
        BlipConfig(text_config=text, vision_config=vision, projection_dim=32)
    )
    processor = BlipProcessor(
        image_processor=BlipImageProcessorPil(size={"height": 32, "width": 32}),
        tokenizer=tokenizer,
    )
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)


def ensure_built(cache_dir: Path, name: str, builder: Callable[[Path], None]) -> Path:
    """`cache_dir/name`, built by `builder(folder)` unless a finished build is already there."""
    target = Path(cache_dir) / name
    marker = target / _MARKER
    if _is_current(marker):
        return target
    with _build_lock:
        if _is_current(marker):
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        # Build beside the target and rename into place, so a crash mid-build never leaves a
        # half-written model that later loads would trust; other processes building at the same
        # time each use their own temporary folder and the last rename wins harmlessly.
        scratch = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
        try:
            log.info("building %s into %s", name, target)
            builder(scratch)
            scratch.chmod(0o755)
            (scratch / _MARKER).write_text(json.dumps({"version": TINY_VERSION}), encoding="utf-8")
            if target.exists():
                stale = target.with_name(f".{name}-stale-{os.getpid()}")
                os.replace(target, stale)
                shutil.rmtree(stale, ignore_errors=True)
            try:
                os.replace(scratch, target)
            except OSError:
                # Another process renamed its finished build into place first.
                if not _is_current(marker):
                    raise
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return target


def _is_current(marker: Path) -> bool:
    try:
        return json.loads(marker.read_text(encoding="utf-8")).get("version") == TINY_VERSION
    except (OSError, ValueError):
        return False


def ensure_tiny_sd(cache_dir: Path) -> Path:
    """Folder of the tiny SD pipeline under `cache_dir`, built on first use."""
    return ensure_built(cache_dir, TINY_SD_DIR, build_tiny_sd)


def ensure_tiny_clip(cache_dir: Path) -> Path:
    """Folder of the tiny CLIP model under `cache_dir`, built on first use."""
    return ensure_built(cache_dir, TINY_CLIP_DIR, build_tiny_clip)


def ensure_tiny_captioner(cache_dir: Path) -> Path:
    """Folder of the tiny BLIP captioner under `cache_dir`, built on first use."""
    return ensure_built(cache_dir, TINY_CAPTION_DIR, build_tiny_captioner)


def ensure_tiny_sdxl(cache_dir: Path) -> Path:
    """Folder of the tiny SDXL-shaped pipeline under `cache_dir`, built on first use."""
    return ensure_built(cache_dir, TINY_SDXL_DIR, build_tiny_sdxl)


def tiny_engine_settings(
    cache_dir: Path, base_resolution: int = TINY_BASE_RESOLUTION, **changes: Any
) -> EngineSettings:
    """Settings that serve the tiny SD model, ranked by the tiny CLIP, both built in `cache_dir`
    on first use: on the CPU and never asking a hub. `changes` are other EngineSettings fields."""
    from generation.settings import TINY, EngineSettings, ModelSpec

    ensure_tiny_sd(cache_dir)
    ensure_tiny_clip(cache_dir)
    return EngineSettings(
        models=(ModelSpec(name=TINY, source=TINY, base_resolution=base_resolution),),
        cache_dir=cache_dir,
        device="cpu",
        local_files_only=True,
        **changes,
    )


def build_tiny_inpaint_unet(folder: Path, seed: int = TINY_SEED) -> None:
    """A tiny 9-channel inpainting UNet for the tiny SD model, saved as `folder/unet`, the layout
    of a real inpainting checkpoint (stable-diffusion-inpainting) whose UNet the engine loads.

    Its inputs are the 4 noisy latent channels, the mask (1) and the masked image's latents (4).
    """
    import torch

    torch.manual_seed(seed + 20)
    unet = _tiny_sd_unet(in_channels=9)
    unet.save_pretrained(folder / "unet", safe_serialization=True)


def ensure_tiny_inpaint(cache_dir: Path) -> Path:
    """Folder of the tiny inpainting checkpoint under `cache_dir`, built on first use."""
    return ensure_built(cache_dir, TINY_INPAINT_DIR, build_tiny_inpaint_unet)


# The tiny image adapter (IP-Adapter) for each tiny model, in h94/IP-Adapter's folder layout.
TINY_IP_ADAPTER_DIRS = {"sd": "tiny-ip-adapter", "sdxl": "tiny-ip-adapter-sdxl"}
TINY_IP_ADAPTER_SUBFOLDER = "models"
TINY_IP_ADAPTER_WEIGHTS = "ip-adapter_tiny.safetensors"
TINY_IP_ADAPTER_ENCODER = "models/image_encoder"


def build_tiny_ip_adapter(folder: Path, unet_folder: Path, seed: int = TINY_SEED) -> None:
    """Random IP-Adapter weights shaped for the UNet in `unet_folder`, and a tiny CLIP image
    encoder, saved the way h94/IP-Adapter lays them out so `load_ip_adapter` reads them.

    Shapes follow diffusers' loader: an `image_proj` (the encoder's projection to 4 tokens of
    the UNet's cross-attention width) and, for every cross-attention layer in the order of
    `unet.attn_processors`, `to_k_ip`/`to_v_ip` keyed 1, 3, 5, … as the original checkpoints.
    """
    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed + 20)
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(unet_folder))
    cross_dim = int(unet.config.cross_attention_dim)
    encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
            projection_dim=32,
        )
    )
    tokens = 4
    projection = torch.nn.Linear(encoder.config.projection_dim, tokens * cross_dim)
    norm = torch.nn.LayerNorm(cross_dim)
    weights = {
        "image_proj.proj.weight": projection.weight.detach(),
        "image_proj.proj.bias": projection.bias.detach(),
        "image_proj.norm.weight": norm.weight.detach(),
        "image_proj.norm.bias": norm.bias.detach(),
    }
    channels = list(unet.config.block_out_channels)
    key = 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        if name.startswith("mid_block"):
            hidden = channels[-1]
        elif name.startswith("up_blocks"):
            hidden = list(reversed(channels))[int(name[len("up_blocks.")])]
        else:
            hidden = channels[int(name[len("down_blocks.")])]
        for which in ("to_k_ip", "to_v_ip"):
            layer = torch.nn.Linear(cross_dim, hidden, bias=False)
            weights[f"ip_adapter.{key}.{which}.weight"] = layer.weight.detach()
        key += 2
    models = folder / TINY_IP_ADAPTER_SUBFOLDER
    models.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, models / TINY_IP_ADAPTER_WEIGHTS)
    encoder.save_pretrained(folder / TINY_IP_ADAPTER_ENCODER, safe_serialization=True)


def ensure_tiny_ip_adapter(cache_dir: Path, family: str = "sd") -> Path:
    """Folder of the tiny image adapter for the tiny model of `family`, built on first use."""
    model = ensure_tiny_sdxl(cache_dir) if family == "sdxl" else ensure_tiny_sd(cache_dir)

    def build(folder: Path) -> None:
        build_tiny_ip_adapter(folder, model / "unet")

    return ensure_built(cache_dir, TINY_IP_ADAPTER_DIRS[family], build)


def build_tiny_lora(file: Path, model_folder: Path, seed: int = TINY_SEED, rank: int = 4) -> Path:
    """A random-weight LoRA for the tiny model in `model_folder`, saved as one .safetensors file
    the way training scripts save theirs (peft adapters over the UNet's attention and every
    text encoder, written by the pipeline's `save_lora_weights`).

    Both LoRA matrices are random (peft's default init leaves B at zero, a LoRA that changes
    nothing), so the LoRA visibly changes the model's images.
    """
    import torch
    from diffusers import DiffusionPipeline
    from peft import LoraConfig

    pipe = DiffusionPipeline.from_pretrained(model_folder)
    torch.manual_seed(seed)
    pipe.unet.add_adapter(
        LoraConfig(
            r=rank,
            lora_alpha=rank,
            init_lora_weights=False,
            target_modules=["to_q", "to_k", "to_v", "to_out.0"],
        )
    )
    layers = {"unet_lora_layers": _lora_state(pipe.unet)}
    encoder_config = LoraConfig(
        r=rank,
        lora_alpha=rank,
        init_lora_weights=False,
        target_modules=["q_proj", "k_proj", "v_proj", "out_proj"],
    )
    for name in ("text_encoder", "text_encoder_2"):
        encoder = getattr(pipe, name, None)
        if encoder is not None:
            encoder.add_adapter(encoder_config)
            layers[f"{name}_lora_layers"] = _lora_state(encoder)
    file.parent.mkdir(parents=True, exist_ok=True)
    type(pipe).save_lora_weights(file.parent, weight_name=file.name, **layers)
    return file


def _lora_state(module: object) -> dict[str, object]:
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    return convert_state_dict_to_diffusers(get_peft_model_state_dict(module))


def build_tiny_controlnet(folder: Path, model_folder: Path, seed: int = TINY_SEED) -> Path:
    """A ControlNet for the tiny model in `model_folder` (its UNet's encoder copied, as
    ControlNet training starts), saved as a diffusers folder.

    Training starts the ControlNet's output convolutions at zero, which would make it change
    nothing; here they get random weights so the control image visibly steers the output.
    """
    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(model_folder, subfolder="unet")
    controlnet = ControlNetModel.from_unet(
        unet, conditioning_embedding_out_channels=(16, 32, 32, 32)
    )
    torch.manual_seed(seed + 20)
    zero_convs = [
        *controlnet.controlnet_down_blocks,
        controlnet.controlnet_mid_block,
        controlnet.controlnet_cond_embedding.conv_out,
    ]
    with torch.no_grad():
        # PyTorch's default init shrinks a signal at every layer; through the eight convs of
        # the conditioning embedding the control image would all but vanish. He init keeps it.
        for layer in controlnet.controlnet_cond_embedding.modules():
            if isinstance(layer, torch.nn.Conv2d) and layer.bias is not None:
                torch.nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
                torch.nn.init.zeros_(layer.bias)
        for conv in zero_convs:
            torch.nn.init.normal_(conv.weight, std=0.5)
            torch.nn.init.normal_(conv.bias, std=0.05)
    controlnet.save_pretrained(folder, safe_serialization=True)
    return folder


def build_tiny_depth(folder: Path, seed: int = TINY_SEED) -> Path:
    """A random-weight DPT depth estimator with its (PIL) image processor, in the layout of
    Intel/dpt-large, for the depth preprocessor."""
    import torch
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessorPil

    torch.manual_seed(seed + 30)
    config = DPTConfig(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=37,
        image_size=64,
        patch_size=16,
        backbone_out_indices=[0, 1, 2, 3],
        neck_hidden_sizes=[8, 16, 32, 32],
        fusion_hidden_size=16,
    )
    DPTForDepthEstimation(config).save_pretrained(folder, safe_serialization=True)
    processor = DPTImageProcessorPil(
        size={"height": 64, "width": 64}, keep_aspect_ratio=False, ensure_multiple_of=16
    )
    processor.save_pretrained(folder)
    return folder


TINY_TAESD_DIR = "tiny-taesd"


def build_tiny_taesd(folder: Path, seed: int = TINY_SEED) -> None:
    """A tiny random-weight AutoencoderTiny (TAESD's architecture, 8 channels a block): the
    live-preview decoder of tests and benches, in place of madebyollin/taesd."""
    import torch
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    decoder: Any = AutoencoderTiny(
        encoder_block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        num_encoder_blocks=(1, 1, 1, 1),
        num_decoder_blocks=(1, 1, 1, 1),
    )
    decoder.save_pretrained(folder, safe_serialization=True)


def ensure_tiny_taesd(cache_dir: Path) -> Path:
    """Folder of the tiny preview decoder under `cache_dir`, built on first use."""
    return ensure_built(cache_dir, TINY_TAESD_DIR, build_tiny_taesd)
