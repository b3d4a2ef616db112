"""One imagine job done the batched way vs a naive loop of single-image pipeline calls.

    python -m bench.bench_generation                 # tiny SD and SDXL shapes, runs on a CPU
    python -m bench.bench_generation --full-size     # SD 1.5 and SDXL random weights: use a GPU
    python -m bench.bench_generation --full-size --models sdxl --dtype bfloat16
    python -m bench.bench_generation --model-source /models/sd15 --clip-model /models/clip-l

`--model-source DIR` times every job kind (the main job, Vary, Upscale, Zoom Out, Pan, Make
Square, Vary (Region)) on the model in a local diffusers folder, any family, with a warm-up,
repeats, p50/p90/max and peak memory per kind: see bench/real_weights.py.

A job is what the bot does for /imagine: N candidates (default 8), CLIP ranking, a 2x2 grid of
the best K. "batched" is the engine's own path: all candidates in one pipeline call with one
generator per candidate. "naive" makes the same N images with N single-image pipeline calls
(what most Discord bots do), then ranks and grids them the same way. Both produce the same
images (same seeds), so only the time differs.

`--full-size` builds SD 1.5's architecture from its public config (UNet 859.5 M parameters,
CLIP ViT-L/14 text encoder, the 8x VAE), SDXL base's (UNet 2.57 B parameters, CLIP ViT-L and
OpenCLIP ViT-bigG text encoders, the same VAE at 1024 px) and a ViT-L/14 CLIPModel for ranking,
all with random weights, saves them once under the cache folder and loads them through the
engine's normal `from_pretrained` path. Speed does not depend on the weights' values, so this
measures real-size throughput without downloading anything.

Compute is counted, not assumed: torch's FlopCounterMode runs the loaded UNet, VAE decoder and
CLIP vision tower once on the "meta" device (shapes only, no arithmetic), which gives SD 1.5 at
512² 0.80 TFLOP per latent per UNet pass (1.61 for a classifier-free guidance pair) and 2.5
TFLOP per VAE decode. Peak GPU memory (torch.cuda.max_memory_allocated) and the VAE decode's
share of the job's time are reported per job. Figures are printed; nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.clip_l14 import FULL_CLIP_DIR, build_clip_l14_shaped
from bench.real_weights import KINDS
from generation.contract import GenerationRequest, JobKind, Sampler
from generation.settings import EngineSettings, ModelSpec

FULL_SD_DIR = "bench-sd15-random"
FULL_SDXL_DIR = "bench-sdxl-random"
# model -> (family, full-size folder, default side in px at full size)
MODELS = {"sd15": ("sd", FULL_SD_DIR, 512), "sdxl": ("sdxl", FULL_SDXL_DIR, 1024)}

# The public configs of the real models (runwayml/stable-diffusion-v1-5,
# stabilityai/stable-diffusion-xl-base-1.0, openai/clip-vit-large-patch14), shapes only.
SD15_UNET: dict[str, Any] = {
    "sample_size": 64,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}
SDXL_UNET: dict[str, Any] = {
    "sample_size": 128,
    "block_out_channels": (320, 640, 1280),
    "layers_per_block": 2,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "cross_attention_dim": 2048,
}
SD_VAE: dict[str, Any] = {
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 2,
    "latent_channels": 4,
    "sample_size": 512,
}
SDXL_VAE: dict[str, Any] = {
    **SD_VAE,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "force_upcast": True,
}


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
    unet = UNet2DConditionModel(**SD15_UNET)
    vae = AutoencoderKL(**SD_VAE)
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


def build_sdxl_shaped(folder: Path) -> None:
    """SDXL base's architecture from its public configs, random weights, diffusers layout."""
    import torch
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from generation.tiny import _tiny_tokenizer, sdxl_scheduler

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SDXL_UNET).to(torch.float16)
    vae = AutoencoderKL(**SDXL_VAE)
    tokenizer = _tiny_tokenizer()
    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "vocab_size": 49408,
        "max_position_embeddings": 77,
    }
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            hidden_act="quick_gelu",
            **ids,
        )
    ).to(torch.float16)
    text_encoder_2 = CLIPTextModelWithProjection(
        CLIPTextConfig(
            hidden_size=1280,
            intermediate_size=5120,
            num_hidden_layers=32,
            num_attention_heads=20,
            hidden_act="gelu",
            projection_dim=1280,
            **ids,
        )
    ).to(torch.float16)
    params = sum(p.numel() for p in unet.parameters())
    print(f"built SDXL-shaped UNet: {params / 1e9:.2f} B parameters", file=sys.stderr)
    pipe = StableDiffusionXLPipeline(
        vae=vae.to(torch.float16),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=sdxl_scheduler(),
    )
    pipe.save_pretrained(folder, safe_serialization=True)


def count_tflop(engine: Any, model: str, size: int) -> dict[str, float]:
    """TFLOP of one UNet pass per latent, one VAE decode and one CLIP image embedding, for the
    modules the engine loaded, at `size` x `size`."""
    text2img, _ = engine.pipelines(model)
    return component_tflop(
        dict(text2img.unet.config),
        dict(text2img.vae.config),
        engine.ranker().model.config.vision_config.to_dict(),
        size,
    )


def component_tflop(
    unet_config: dict[str, Any], vae_config: dict[str, Any], vision: dict[str, Any], size: int
) -> dict[str, float]:
    """The modules are built from their configs on the "meta" device and run once under
    torch's FlopCounterMode: every matmul and convolution is counted from its shapes, nothing
    is computed, so full-size models are counted in seconds on any machine."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    latent = size // 8

    def tflop(run: Any) -> float:
        with FlopCounterMode(display=False) as counter:
            run()
        return counter.get_total_flops() / 1e12

    with torch.device("meta"), torch.no_grad():
        unet = UNet2DConditionModel.from_config(unet_config)
        vae = AutoencoderKL.from_config(vae_config)
        clip = CLIPVisionModelWithProjection(CLIPVisionConfig(**vision))
        sample = torch.zeros(1, unet.config.in_channels, latent, latent)
        context = torch.zeros(1, 77, unet.config.cross_attention_dim)
        extra = {}
        if unet.config.addition_embed_type == "text_time":
            # The pooled text embedding plus six size/crop numbers, each embedded.
            pooled = unet.config.projection_class_embeddings_input_dim - 6 * (
                unet.config.addition_time_embed_dim
            )
            extra["added_cond_kwargs"] = {
                "text_embeds": torch.zeros(1, pooled),
                "time_ids": torch.zeros(1, 6),
            }
        side = clip.config.image_size
        return {
            "unet_pass": tflop(
                lambda: unet(sample, torch.tensor([500]), encoder_hidden_states=context, **extra)
            ),
            "vae_decode": tflop(lambda: vae.decode(torch.zeros(1, 4, latent, latent))),
            "clip_image": tflop(lambda: clip(pixel_values=torch.zeros(1, 3, side, side))),
        }


def job_tflop(per: dict[str, float], request: GenerationRequest) -> float:
    # Classifier-free guidance runs the UNet on the prompt and the negative prompt: two passes.
    passes = 2 if request.guidance > 1 else 1
    return request.num_candidates * (
        request.steps * passes * per["unet_pass"] + per["vae_decode"] + per["clip_image"]
    )


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


class _VaeClock:
    """Time spent in the VAE decoder, however the pipeline or the engine calls it."""

    def __init__(self, engine: Any, model: str) -> None:
        self.device = engine.device
        self.vae = engine.pipelines(model)[0].vae
        self.decode = self.vae.decode
        self.seconds = 0.0
        self.vae.decode = self._timed

    def _timed(self, *args: Any, **kwargs: Any) -> Any:
        _sync(self.device)
        started = time.perf_counter()
        try:
            return self.decode(*args, **kwargs)
        finally:
            _sync(self.device)
            self.seconds += time.perf_counter() - started

    def take(self) -> float:
        seconds, self.seconds = self.seconds, 0.0
        return seconds


def _start_job(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def _peak_gb(device: str) -> float:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else math.nan


def _naive_job(engine: Any, request: GenerationRequest, clock: _VaeClock) -> dict[str, float]:
    """The same job with one pipeline call per candidate, then the same ranking and grid."""
    import torch

    from generation.engine import candidate_seeds
    from generation.images import make_grid
    from generation.ranking import select_candidates
    from generation.samplers import make_scheduler

    text2img, _ = engine.pipelines(request.model)
    base_config = text2img.scheduler.config
    _start_job(engine.device)
    clock.take()
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
        "vae_s": clock.take(),
        "rank_s": ranked - generated,
        "grid_s": done - ranked,
        "total_s": done - started,
        "peak_gb": _peak_gb(engine.device),
    }


def _batched_job(engine: Any, request: GenerationRequest, clock: _VaeClock) -> dict[str, float]:
    from generation.images import make_grid

    _start_job(engine.device)
    clock.take()
    started = time.perf_counter()
    result = engine.generate(request)
    _sync(engine.device)
    generated = time.perf_counter()
    make_grid(list(result.images))
    done = time.perf_counter()
    return {
        "generate_s": result.timings_s["generate_s"] + result.timings_s["encode_s"],
        "vae_s": clock.take(),
        "rank_s": result.timings_s["rank_s"],
        "grid_s": done - generated,
        "total_s": done - started,
        "peak_gb": _peak_gb(engine.device),
    }


def _median(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.bench_generation", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--full-size", action="store_true", help="SD 1.5 / SDXL-shaped random weights (GPU)"
    )
    parser.add_argument(
        "--models",
        default="sd15,sdxl",
        help="comma-separated: sd15, sdxl (tiny shapes unless --full-size); default both",
    )
    parser.add_argument("--candidates", type=int, default=8)
    parser.add_argument("--kept", type=int, default=4)
    parser.add_argument("--steps", type=int, help="default: 20 tiny, 30 full-size")
    parser.add_argument(
        "--size", type=int, help="square side in px; default 128 tiny, 512 SD 1.5, 1024 SDXL"
    )
    parser.add_argument("--sampler", default="dpmpp_2m_karras")
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="timed runs of each (median; percentiles too with --model-source)",
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--cache-dir", type=Path, default=Path("data/models"))
    parser.add_argument("--peak-tflops", type=float, default=990.0, help="990: H100 dense bf16")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument(
        "--model-source", help="a local diffusers folder: time every job kind on it"
    )
    parser.add_argument(
        "--clip-model",
        help="with --model-source: the ranker's folder (default: a random "
        "ViT-L/14-shaped CLIP, as costly as the real one)",
    )
    parser.add_argument("--inpaint-source", help="with --model-source: its inpainting folder")
    parser.add_argument(
        "--kinds", help="with --model-source: comma-separated subset of " + ", ".join(KINDS)
    )
    args = parser.parse_args(argv)
    if args.model_source:
        from bench.real_weights import run as run_real_weights

        runs = run_real_weights(args)
        if args.json:
            args.json.write_text(json.dumps(runs, indent=2) + "\n", encoding="utf-8")
        return 0
    names = [name.strip() for name in args.models.split(",") if name.strip()]
    unknown = sorted(set(names) - set(MODELS))
    if unknown or not names:
        parser.error(f"--models: expected sd15 and/or sdxl, got {args.models!r}")

    from generation.tiny import TINY_BASE_RESOLUTION, TINY_SDXL, ensure_built

    steps = args.steps or (30 if args.full_size else 20)
    specs = []
    for name in names:
        family, folder, full_side = MODELS[name]
        if args.full_size:
            started = time.perf_counter()
            builder = build_sdxl_shaped if family == "sdxl" else build_sd15_shaped
            source = str(ensure_built(args.cache_dir, folder, builder))
            print(f"{name} ready in {time.perf_counter() - started:.1f}s", file=sys.stderr)
            side = full_side
        else:
            source = TINY_SDXL if family == "sdxl" else "tiny"
            side = TINY_BASE_RESOLUTION
        specs.append((ModelSpec(name, source, base_resolution=side, family=family), side))
    if args.full_size:
        clip_model = str(ensure_built(args.cache_dir, FULL_CLIP_DIR, build_clip_l14_shaped))
    else:
        clip_model = "tiny"
    largest = max(args.size or side for _, side in specs)
    settings = EngineSettings(
        models=tuple(spec for spec, _ in specs),
        default_model=specs[0][0].name,
        clip_model=clip_model,
        cache_dir=args.cache_dir,
        device=args.device,
        dtype=args.dtype,
        max_pixels=max(largest * largest, 64 * 64),
        max_steps=max(steps, 1),
        draft_steps=min(EngineSettings.draft_steps, max(steps, 1)),
        max_loaded_models=1,
        local_files_only=True,
    )
    from generation.engine import create_engine

    engine = create_engine(settings)
    runs = []
    for spec, side in specs:
        figures = _run(engine, spec, args.size or side, steps, args)
        _report(figures)
        runs.append(figures)
    if args.json:
        args.json.write_text(json.dumps(runs, indent=2) + "\n", encoding="utf-8")
    return 0


def _run(engine: Any, spec: ModelSpec, size: int, steps: int, args: Any) -> dict[str, Any]:
    import torch

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
    clock = _VaeClock(engine, spec.name)

    # One untimed run of each: first calls pay for kernel selection and lazy imports.
    _batched_job(engine, request, clock)
    _naive_job(engine, request, clock)
    batched = _median([_batched_job(engine, request, clock) for _ in range(args.repeats)])
    naive = _median([_naive_job(engine, request, clock) for _ in range(args.repeats)])

    device = engine.device
    if device == "cuda":
        device = f"cuda ({torch.cuda.get_device_name()})"
    per = count_tflop(engine, spec.name, size)
    tflop = job_tflop(per, request)
    figures: dict[str, Any] = {
        "model": spec.name,
        "mode": f"full-size {spec.family}, random weights" if args.full_size else "tiny",
        "device": device,
        "dtype": str(engine.model_dtype(spec)).removeprefix("torch."),
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
        "images_per_s_batched": args.candidates / batched["total_s"],
        "images_per_s_naive": args.candidates / naive["total_s"],
        "tflop_unet_pass": per["unet_pass"],
        "tflop_vae_decode": per["vae_decode"],
        "tflop_clip_image": per["clip_image"],
        "tflop_per_job": tflop,
        "peak_tflops": args.peak_tflops,
    }
    for name in ("batched", "naive"):
        for part in ("vae", "rank"):
            figures[f"{part}_share_{name}"] = figures[name][f"{part}_s"] / figures[name]["total_s"]
        achieved = tflop / figures[name]["total_s"]
        figures[f"tflops_{name}"] = achieved
        figures[f"peak_fraction_{name}"] = achieved / args.peak_tflops
    return figures


def _report(f: dict[str, Any]) -> None:
    job = f["job"]
    print(
        f"model     {f['model']}: {f['mode']} on {f['device']}, {f['dtype']}, "
        f"{f['torch_threads']} threads"
    )
    print(
        f"job       {job['candidates']} candidates -> keep {job['kept']}, {job['size']}, "
        f"{job['steps']} steps, {job['sampler']}, CFG {job['guidance']:g}"
    )
    print(f"load      {f['load_s']:.2f}s (pipelines + CLIP, once per worker)")
    for name in ("batched", "naive"):
        t = f[name]
        peak = "" if math.isnan(t["peak_gb"]) else f"; peak GPU memory {t['peak_gb']:.2f} GiB"
        print(
            f"{name:<9} {t['total_s']:.3f}s/job = generate {t['generate_s']:.3f}s (VAE decode "
            f"{t['vae_s']:.3f}s) + rank {t['rank_s']:.3f}s + grid {t['grid_s']:.3f}s; "
            f"{f[f'images_per_s_{name}']:.2f} images/s{peak}"
        )
    print(
        f"speed-up  batched is {f['speedup']:.2f}x faster per job "
        f"({f['generate_speedup']:.2f}x on generation alone)"
    )
    print(
        f"shares    VAE decode {100 * f['vae_share_batched']:.1f}% / ranking "
        f"{100 * f['rank_share_batched']:.1f}% of the batched job; VAE "
        f"{100 * f['vae_share_naive']:.1f}% / ranking {100 * f['rank_share_naive']:.1f}% naive"
    )
    print(
        f"compute   UNet {f['tflop_unet_pass']:.3g} TFLOP per latent per pass (x2 with CFG), "
        f"VAE decode {f['tflop_vae_decode']:.3g}, CLIP image {f['tflop_clip_image']:.3g}; "
        f"~{f['tflop_per_job']:.3g} TFLOP/job"
    )
    print(
        f"          batched {f['tflops_batched']:.3g} TFLOP/s = "
        f"{100 * f['peak_fraction_batched']:.2f}% of {f['peak_tflops']:g}; naive "
        f"{f['tflops_naive']:.3g} TFLOP/s = {100 * f['peak_fraction_naive']:.2f}%"
    )


if __name__ == "__main__":
    sys.exit(main())
