"""One imagine job done the batched way vs a naive loop of single-image pipeline calls.

    python bench/bench_generation.py                 # tiny models, runs anywhere (CPU is fine)
    python bench/bench_generation.py --full-size     # SD 1.5-shaped random weights: use a GPU

A job is what the bot does for /imagine: N candidates (default 8), CLIP ranking, a 2x2 grid of
the best K. "batched" is the engine's own path: all candidates in one pipeline call with one
generator per candidate. "naive" makes the same N images with N single-image pipeline calls
(what most Discord bots do), then ranks and grids them the same way. Both produce the same
images (same seeds), so only the time differs.

`--full-size` builds SD 1.5's architecture from its public config (UNet 859.5 M parameters,
CLIP ViT-L/14 text encoder, the 8x VAE) and a ViT-L/14 CLIPModel for ranking, all with random
weights, saves them once under the cache folder and loads them through the engine's normal
`from_pretrained` path. Speed does not depend on the weights' values, so this measures real-size
throughput without downloading anything. Figures are printed; nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from generation.contract import GenerationRequest, JobKind, Sampler
from generation.settings import EngineSettings, ModelSpec

# Compute per SD 1.5 image at 512x512 (anchors in the project notes): one UNet pass over the
# guidance batch of 2 is ~0.8 TFLOP, one VAE decode ~2.5 TFLOP, one ViT-L/14 image embedding
# ~0.16 TFLOP. Other sizes are scaled by pixel count (attention grows faster; see --size).
UNET_TFLOP_512 = 0.8
VAE_TFLOP_512 = 2.5
CLIP_TFLOP = 0.16
FULL_SD_DIR = "bench-sd15-random"
FULL_CLIP_DIR = "bench-clip-vit-l14-random"


def build_sd15_shaped(folder: Path) -> None:
    """SD 1.5's architecture from its public config, random weights, saved in diffusers layout."""
    import torch
    from diffusers import (
        AutoencoderKL,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    from generation.tiny import _tiny_tokenizer, sd15_scheduler

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=64,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768,
        attention_head_dim=8,
    )
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
        sample_size=512,
    )
    # The real tokenizer only changes which ids come out; a 77-token window costs the same.
    tokenizer = _tiny_tokenizer()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    params = sum(p.numel() for p in unet.parameters())
    print(f"built SD 1.5-shaped UNet: {params / 1e6:.1f} M parameters", file=sys.stderr)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=sd15_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.to(torch.float16)  # half the disk; the engine loads it in its own dtype
    pipe.save_pretrained(folder, safe_serialization=True)


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
        vision_config={
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "image_size": 224,
            "patch_size": 14,
        },
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


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _naive_job(engine: Any, request: GenerationRequest) -> dict[str, float]:
    """The same job with one pipeline call per candidate, then the same ranking and grid."""
    import torch

    from generation.engine import candidate_seeds, make_scheduler
    from generation.images import make_grid
    from generation.ranking import select_candidates

    text2img, _ = engine.pipelines(request.model)
    base_config = text2img.scheduler.config
    started = time.perf_counter()
    images = []
    for seed in candidate_seeds(request.seed, request.num_candidates):
        text2img.scheduler = make_scheduler(request.sampler, base_config)
        with torch.inference_mode():
            images += text2img(
                request.prompt,
                negative_prompt=request.negative_prompt or None,
                width=request.width,
                height=request.height,
                num_inference_steps=request.steps,
                guidance_scale=request.guidance,
                generator=torch.Generator("cpu").manual_seed(seed),
            ).images
    _sync(engine.device)
    generated = time.perf_counter()
    scored = engine.ranker().score(request.prompt, images)
    keep = select_candidates(scored.scores, scored.image_embeds, request.num_kept, request.chaos)
    _sync(engine.device)
    ranked = time.perf_counter()
    make_grid([images[i] for i in keep])
    done = time.perf_counter()
    return {
        "generate_s": generated - started,
        "rank_s": ranked - generated,
        "grid_s": done - ranked,
        "total_s": done - started,
    }


def _batched_job(engine: Any, request: GenerationRequest) -> dict[str, float]:
    from generation.images import make_grid

    started = time.perf_counter()
    result = engine.generate(request)
    _sync(engine.device)
    generated = time.perf_counter()
    make_grid(list(result.images))
    done = time.perf_counter()
    return {
        "generate_s": result.timings_s["generate_s"] + result.timings_s["encode_s"],
        "rank_s": result.timings_s["rank_s"],
        "grid_s": done - generated,
        "total_s": done - started,
    }


def _median(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full-size", action="store_true", help="SD 1.5-shaped random weights")
    parser.add_argument("--candidates", type=int, default=8)
    parser.add_argument("--kept", type=int, default=4)
    parser.add_argument("--steps", type=int, help="default: 20 tiny, 30 full-size")
    parser.add_argument("--size", type=int, help="square side in px; default 128 tiny, 512 full")
    parser.add_argument("--sampler", default="dpmpp_2m_karras")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each (median)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--cache-dir", type=Path, default=Path("data/models"))
    parser.add_argument("--peak-tflops", type=float, default=990.0, help="990: H100 dense bf16")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)

    import torch

    from generation.engine import create_engine
    from generation.tiny import TINY_BASE_RESOLUTION, ensure_built

    steps = args.steps or (30 if args.full_size else 20)
    size = args.size or (512 if args.full_size else TINY_BASE_RESOLUTION)
    if args.full_size:
        build_started = time.perf_counter()
        sd_folder = ensure_built(args.cache_dir, FULL_SD_DIR, build_sd15_shaped)
        clip_folder = ensure_built(args.cache_dir, FULL_CLIP_DIR, build_clip_l14_shaped)
        print(f"models ready in {time.perf_counter() - build_started:.1f}s", file=sys.stderr)
        spec = ModelSpec("sd15-random", str(sd_folder), base_resolution=512)
        clip_model = str(clip_folder)
    else:
        spec = ModelSpec("tiny", "tiny", base_resolution=TINY_BASE_RESOLUTION)
        clip_model = "tiny"
    settings = EngineSettings(
        models=(spec,),
        default_model=spec.name,
        clip_model=clip_model,
        cache_dir=args.cache_dir,
        device=args.device,
        dtype=args.dtype,
        max_pixels=max(size * size, 64 * 64),
        max_steps=max(steps, 1),
        local_files_only=True,
    )
    engine = create_engine(settings)
    request = GenerationRequest(
        kind=JobKind.IMAGINE,
        prompt="a lighthouse on a cliff at dusk, dramatic sky, oil painting",
        negative_prompt="blurry, low quality",
        width=size,
        height=size,
        steps=steps,
        sampler=Sampler.parse(args.sampler),
        seed=1234,
        num_candidates=args.candidates,
        num_kept=args.kept,
        model=spec.name,
    )
    load_started = time.perf_counter()
    engine.warm_up(spec.name)
    load_s = time.perf_counter() - load_started

    # One untimed run of each: first calls pay for kernel selection and lazy imports.
    _batched_job(engine, request)
    _naive_job(engine, request)
    batched = _median([_batched_job(engine, request) for _ in range(args.repeats)])
    naive = _median([_naive_job(engine, request) for _ in range(args.repeats)])

    device = engine.device
    if device == "cuda":
        device = f"cuda ({torch.cuda.get_device_name()})"
    figures: dict[str, Any] = {
        "mode": "full-size SD 1.5 shaped, random weights" if args.full_size else "tiny",
        "device": device,
        "dtype": str(engine.dtype).removeprefix("torch."),
        "torch_threads": torch.get_num_threads(),
        "job": {
            "candidates": args.candidates,
            "kept": args.kept,
            "size": f"{size}x{size}",
            "steps": steps,
            "sampler": request.sampler.a1111_name,
            "guidance": request.guidance,
        },
        "load_s": load_s,
        "batched": batched,
        "naive": naive,
        "speedup": naive["total_s"] / batched["total_s"],
        "generate_speedup": naive["generate_s"] / batched["generate_s"],
        "rank_share_batched": batched["rank_s"] / batched["total_s"],
        "rank_share_naive": naive["rank_s"] / naive["total_s"],
        "images_per_s_batched": args.candidates / batched["total_s"],
        "images_per_s_naive": args.candidates / naive["total_s"],
    }
    if args.full_size:
        scale = (size * size) / (512 * 512)
        tflop = args.candidates * (
            steps * UNET_TFLOP_512 * scale + VAE_TFLOP_512 * scale + CLIP_TFLOP
        )
        figures["tflop_per_job"] = tflop
        for name in ("batched", "naive"):
            achieved = tflop / figures[name]["total_s"]
            figures[f"tflops_{name}"] = achieved
            figures[f"peak_fraction_{name}"] = achieved / args.peak_tflops
        figures["peak_tflops"] = args.peak_tflops

    _report(figures)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    return 0


def _report(f: dict[str, Any]) -> None:
    job = f["job"]
    print(f"mode      {f['mode']} on {f['device']}, {f['dtype']}, {f['torch_threads']} threads")
    print(
        f"job       {job['candidates']} candidates -> keep {job['kept']}, {job['size']}, "
        f"{job['steps']} steps, {job['sampler']}, CFG {job['guidance']:g}"
    )
    print(f"load      {f['load_s']:.2f}s (pipelines + CLIP, once per worker)")
    for name in ("batched", "naive"):
        t = f[name]
        print(
            f"{name:<9} {t['total_s']:.3f}s/job = generate {t['generate_s']:.3f}s + rank "
            f"{t['rank_s']:.3f}s + grid {t['grid_s']:.3f}s; "
            f"{f[f'images_per_s_{name}']:.2f} images/s"
        )
    print(
        f"speed-up  batched is {f['speedup']:.2f}x faster per job "
        f"({f['generate_speedup']:.2f}x on generation alone)"
    )
    print(
        f"ranking   {100 * f['rank_share_batched']:.1f}% of the batched job, "
        f"{100 * f['rank_share_naive']:.1f}% of the naive one"
    )
    if "tflop_per_job" in f:
        print(
            f"compute   ~{f['tflop_per_job']:.1f} TFLOP/job; batched {f['tflops_batched']:.1f} "
            f"TFLOP/s = {100 * f['peak_fraction_batched']:.2f}% of {f['peak_tflops']:g}; naive "
            f"{f['tflops_naive']:.1f} TFLOP/s = {100 * f['peak_fraction_naive']:.2f}%"
        )


if __name__ == "__main__":
    sys.exit(main())
