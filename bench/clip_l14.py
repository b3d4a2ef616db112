"""A CLIP ViT-L/14-shaped ranker with random weights, for the full-size benchmarks.

Its own module so that bench_generation, real_weights and gpu_check all import it from below
instead of from each other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

FULL_CLIP_DIR = "bench-clip-vit-l14-random"

CLIP_L14_VISION: dict[str, Any] = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 224,
    "patch_size": 14,
}


def build_clip_l14_shaped(folder: Path) -> None:
    """A CLIP ViT-L/14-shaped CLIPModel (openai/clip-vit-large-patch14's config), random weights."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor

    from generation.tiny import _tiny_tokenizer

    torch.manual_seed(1)
    tokenizer = _tiny_tokenizer()
    config = CLIPConfig(
        text_config={
            "vocab_size": 49408,
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "max_position_embeddings": 77,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config=CLIP_L14_VISION,
        projection_dim=768,
    )
    model = CLIPModel(config).to(torch.float16)
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessorPil(
            size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}
        ),
        tokenizer=tokenizer,
    )
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
