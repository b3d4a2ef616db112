"""Timing every job kind on a model in a local diffusers folder, real weights or not.

    python -m bench.bench_generation --model-source /models/sd15 --clip-model /models/clip-l
    python -m bench.bench_generation --model-source /models/sdxl --inpaint-source /models/sdxl-inp

The folder's family (SD 1.x/2.x or SDXL) comes from its model_index.json; the size from its
UNet (sample_size x 8) unless --size says. Each job kind the bot runs on a picked image is timed
through the engine exactly as a worker runs it: the main job (/imagine: N candidates, ranking),
Vary (a variation), Upscale (a hires fix at twice the side), Zoom Out 2x, Pan left, Make Square
(from a wide picture) and Vary (Region). Each kind gets one untimed warm-up run (kernel
selection, lazy loading, the inpainting pipeline built on first use) and `--repeats` timed
ones, reported as p50 / p90 / max seconds per job and, on CUDA, the peak memory of the kind.
Figures are printed (and written with --json); nothing is asserted.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from PIL import Image

from generation.contract import GenerationRequest, JobKind, PanDirection, Region, Sampler
from generation.settings import EngineSettings, ModelSpec

KINDS = ("imagine", "variation", "upscale", "zoom", "pan", "square", "region")
PROMPT = "a lighthouse on a cliff at dusk, dramatic sky, oil painting"


def folder_family(folder: Path) -> str:
    """ "sdxl" or "sd", from the pipeline class a diffusers folder names."""
    try:
        index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SystemExit(f"--model-source: {folder} is not a diffusers folder ({exc})") from None
    return "sdxl" if "XL" in str(index.get("_class_name", "")) else "sd"


def folder_side(folder: Path) -> int:
    """The side the model was trained at: its UNet's sample_size x 8 (512 when not said)."""
    try:
        config = json.loads((folder / "unet" / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return 512
    sample = config.get("sample_size") or 64
    return int(sample if isinstance(sample, int) else sample[0]) * 8


def percentiles(seconds: list[float]) -> dict[str, float]:
    ordered = sorted(seconds)
    if len(ordered) == 1:
        p90 = ordered[0]
    else:
        p90 = statistics.quantiles(ordered, n=10, method="inclusive")[-1]
    return {
        "p50_s": statistics.median(ordered),
        "p90_s": p90,
        "max_s": ordered[-1],
        "mean_s": statistics.fmean(ordered),
        "runs": len(ordered),
    }


def _peak_gib(device: str) -> float:
    import torch

    if device != "cuda":
        return math.nan
    return torch.cuda.max_memory_allocated() / 2**30


def _reset_peak(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def kind_request(
    kind: str, main: GenerationRequest, picture: Image.Image, settings: EngineSettings
) -> GenerationRequest:
    """The request a press on one of `main`'s images makes (same builders as the bot)."""
    from generation import requests

    if kind == "imagine":
        return main
    if kind == "variation":
        return requests.variation_request(
            main, picture, strength=settings.variation_strength_strong, seed=main.seed + 100
        )
    if kind == "upscale":
        return requests.upscale_request(
            main, picture, strength=settings.upscale_strength, seed=main.seed + 100
        )
    if kind == "zoom":
        return requests.zoom_request(main, picture, factor=2.0, seed=main.seed + 100)
    if kind == "pan":
        return requests.pan_request(
            main,
            picture,
            direction=PanDirection.LEFT,
            seed=main.seed + 100,
            max_pixels=settings.max_pixels,
        )
    if kind == "square":
        # A 16:9 picture (at least 64 px tall) is squared.
        height = max(64, picture.height * 9 // 16 // 8 * 8)
        wide = picture.resize((max(picture.width, height * 16 // 9 // 8 * 8), height))
        parent = main.with_changes(width=wide.width, height=wide.height)
        return requests.square_request(
            parent, wide, seed=main.seed + 100, max_pixels=settings.max_pixels
        )
    if kind == "region":
        return requests.region_request(main, picture, seed=main.seed + 100, regions={Region.CENTRE})
    raise ValueError(f"kind: {kind!r}")


def run(args: Any) -> list[dict[str, Any]]:
    """The --model-source benchmark; `args` from bench_generation's parser."""
    import torch

    from generation.engine import create_engine

    folder = Path(args.model_source).expanduser().resolve()
    family = folder_family(folder)
    side = args.size or folder_side(folder)
    steps = args.steps or 30
    clip_model = args.clip_model
    if not clip_model:
        from bench.clip_l14 import FULL_CLIP_DIR, build_clip_l14_shaped
        from generation.tiny import ensure_built

        # A random ViT-L/14-shaped ranker costs what the real one does.
        clip_model = str(ensure_built(args.cache_dir, FULL_CLIP_DIR, build_clip_l14_shaped))
    spec = ModelSpec(
        "bench",
        str(folder),
        base_resolution=side,
        family=family,
        inpaint_source=str(Path(args.inpaint_source).expanduser()) if args.inpaint_source else "",
    )
    # Upscales double the side; pans grow it by half.
    settings = EngineSettings(
        models=(spec,),
        default_model="bench",
        clip_model=clip_model,
        cache_dir=args.cache_dir,
        device=args.device,
        dtype=args.dtype,
        max_pixels=max(int(side * side * 1.5), 64 * 64),
        max_steps=max(steps, 1),
        # A draft runs at most the job's steps: the bench's step count caps it too.
        draft_steps=min(EngineSettings.draft_steps, max(steps, 1)),
        local_files_only=True,
    )
    engine = create_engine(settings)
    started = time.perf_counter()
    engine.warm_up("bench")
    load_s = time.perf_counter() - started
    main = GenerationRequest(
        kind=JobKind.IMAGINE,
        prompt=PROMPT,
        negative_prompt="blurry, low quality",
        width=side,
        height=side,
        steps=steps,
        sampler=Sampler.parse(args.sampler),
        seed=1234,
        num_candidates=args.candidates,
        num_kept=min(args.kept, args.candidates),
        model="bench",
    )
    picture = engine.generate(main).images[0]
    kinds = [k for k in KINDS if k in set(args.kinds.split(","))] if args.kinds else list(KINDS)
    device = engine.device
    name = f"cuda ({torch.cuda.get_device_name()})" if device == "cuda" else device
    figures: dict[str, Any] = {
        "model": str(folder),
        "family": family,
        "device": name,
        "dtype": str(engine.model_dtype(spec)).removeprefix("torch."),
        "size": f"{side}x{side}",
        "steps": steps,
        "candidates": args.candidates,
        "load_s": load_s,
        "kinds": {},
    }
    for kind in kinds:
        request = kind_request(kind, main, picture, settings)
        engine.generate(request)  # warm-up, untimed
        seconds = []
        _reset_peak(device)
        for _ in range(max(1, args.repeats)):
            begun = time.perf_counter()
            engine.generate(request)
            if device == "cuda":
                torch.cuda.synchronize()
            seconds.append(time.perf_counter() - begun)
        figures["kinds"][kind] = {
            **percentiles(seconds),
            "size": f"{request.width}x{request.height}",
            "peak_gib": _peak_gib(device),
        }
    report(figures)
    return [figures]


def report(figures: dict[str, Any]) -> None:
    print(
        f"model     {figures['model']} ({figures['family']}) on {figures['device']}, "
        f"{figures['dtype']}, {figures['size']}, {figures['steps']} steps, "
        f"{figures['candidates']} candidates; loaded in {figures['load_s']:.1f}s"
    )
    for kind, f in figures["kinds"].items():
        peak = "" if math.isnan(f["peak_gib"]) else f", peak {f['peak_gib']:.2f} GiB"
        print(
            f"{kind:<9} {f['size']:>9}: p50 {f['p50_s']:.3f}s  p90 {f['p90_s']:.3f}s  "
            f"max {f['max_s']:.3f}s over {f['runs']} runs{peak}"
        )
    sys.stdout.flush()
