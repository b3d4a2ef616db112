"""The tiny models are real diffusers/transformers folders, loaded back with from_pretrained."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from generation import tiny


def test_tiny_sd_folder_loads_through_from_pretrained(tiny_cache: Path) -> None:
    from diffusers import AutoPipelineForText2Image, StableDiffusionPipeline

    folder = tiny_cache / tiny.TINY_SD_DIR
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (folder / part).is_dir(), part
    assert list((folder / "unet").glob("*.safetensors")), "weights are saved as safetensors"

    pipe = AutoPipelineForText2Image.from_pretrained(str(folder), local_files_only=True)
    assert isinstance(pipe, StableDiffusionPipeline)
    # Like real SD: the VAE downsamples 8x and the UNet's native size is the base resolution.
    assert pipe.vae_scale_factor == 8
    assert pipe.unet.config.sample_size * 8 == tiny.TINY_BASE_RESOLUTION
    assert pipe.text_encoder.config.hidden_size == pipe.unet.config.cross_attention_dim


def test_tiny_clip_folder_loads_through_from_pretrained(tiny_cache: Path) -> None:
    from transformers import CLIPModel, CLIPProcessor

    folder = tiny_cache / tiny.TINY_CLIP_DIR
    model = CLIPModel.from_pretrained(str(folder), local_files_only=True)
    processor = CLIPProcessor.from_pretrained(str(folder), local_files_only=True)
    ids = processor.tokenizer("a photo of a cat").input_ids
    assert ids[0] == processor.tokenizer.bos_token_id
    assert ids[-1] == processor.tokenizer.eos_token_id
    assert max(ids) < model.config.text_config.vocab_size


def test_tokenizer_keeps_prompts_inside_the_window() -> None:
    vocab, _ = tiny.tiny_tokenizer_files()
    assert len(set(vocab.values())) == len(vocab)
    tokenizer = tiny._tiny_tokenizer()
    ids = tokenizer("a lighthouse at dusk, oil painting").input_ids
    # Letter-pair merges: far fewer tokens than characters.
    assert len(ids) < len("a lighthouse at dusk, oil painting")
    assert tokenizer.decode(ids, skip_special_tokens=True).replace(" ", "") == (
        "alighthouseatdusk,oilpainting"
    )


def test_ensure_reuses_a_finished_build_and_replaces_a_broken_one(tmp_path: Path) -> None:
    calls: list[Path] = []

    def builder(folder: Path) -> None:
        calls.append(folder)
        (folder / "weights.bin").write_bytes(b"x")

    first = tiny.ensure_built(tmp_path, "model", builder)
    again = tiny.ensure_built(tmp_path, "model", builder)
    assert first == again == tmp_path / "model"
    assert len(calls) == 1
    assert (first / "weights.bin").exists()

    # A folder without the completion marker (say, copied half-way) is rebuilt, not trusted.
    (first / tiny._MARKER).unlink()
    tiny.ensure_built(tmp_path, "model", builder)
    assert len(calls) == 2
    assert (first / tiny._MARKER).exists()


def test_a_failed_build_leaves_nothing_behind(tmp_path: Path) -> None:
    def broken(folder: Path) -> None:
        (folder / "half.bin").write_bytes(b"x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        tiny.ensure_built(tmp_path, "model", broken)
    assert list(tmp_path.iterdir()) == []
