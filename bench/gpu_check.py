"""The GPU check: one prepared run, the day a GPU is lent, of everything tiny models can't show.

    bench/gpu_check.sh                         # the whole check, under an 8-minute limit
    python -m bench.gpu_check                  # CUDA: full-size random weights in float16
    python -m bench.gpu_check --tiny           # anywhere: the same steps at tiny sizes (CI)

For each model shape (SD 1.5 at 512², SDXL at 1024², with random weights built from their public
configs by bench.bench_generation; tiny shapes at 64² with --tiny or without CUDA):

1. every sampler, and every feature (variation, upscale, zoom, pan, square, region, weighted
   and long prompts, --stop, --tile, previews) runs one job through the engine; its latents
   must be finite (no NaN or inf: float16 overflows show up here) and its images not black;
2. the peak GPU memory of that model shape over all of it;
3. the seconds per 8-candidate job at 30 steps with the engine's speed options (README "Speed
   options"): eager (the defaults), with fused attention projections and batched VAE decode,
   and with those plus the UNet and VAE decoder compiled (`compile_unet`, `compile_vae`; CUDA
   only unless --compile), and the fraction of the card's peak FLOP/s (the job's FLOPs counted
   from the model's shapes, bench.bench_generation.component_tflop);
4. compiled, that job kinds compile once: plain, --tile and a variation, then the same kinds
   with other seeds and strengths, must add no graph (Dynamo's unique_graphs counter);
5. a Markdown table of those figures, to replace the README's estimated VRAM table.

Steps past `--budget-s` (default 450 s) are skipped and listed as skipped, so the check always
ends with its figures. Exit status 1 when a check failed (NaN, black image, an exception).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from generation.contract import GenerationRequest, JobKind, PromptPart, Sampler
from generation.settings import CompileMode

SHAPES = ("sd15", "sdxl")
FEATURES = (
    "variation",
    "upscale",
    "zoom",
    "pan",
    "square",
    "region",
    "weighted_prompt",
    "long_prompt",
    "stop",
    "tile",
    "previews",
)
LONG_PROMPT = ", ".join(["a lighthouse on a rocky headland at dusk, waves on black rocks"] * 6)


class Check:
    """Runs the steps, keeps the figures and the failures, skips what the budget can't fit."""

    def __init__(self, budget_s: float) -> None:
        self.started = time.perf_counter()
        self.budget_s = budget_s
        self.results: dict[str, Any] = {
            "shapes": {},
            "passed": [],
            "failures": [],
            "skipped": [],
        }

    def left_s(self) -> float:
        return self.budget_s - (time.perf_counter() - self.started)

    def step(self, name: str, run: Any, need_s: float = 0.0) -> Any:
        if self.left_s() < need_s:
            self.results["skipped"].append(name)
            print(f"skip      {name} (budget)", flush=True)
            return None
        began = time.perf_counter()
        try:
            value = run()
        except Exception as exc:  # a check reports every failure and goes on
            self.results["failures"].append(f"{name}: {type(exc).__name__}: {exc}")
            print(f"FAIL      {name}: {exc}", flush=True)
            traceback.print_exc()
            return None
        self.results["passed"].append(name)
        print(f"ok        {name} ({time.perf_counter() - began:.1f}s)", flush=True)
        return value


class LatentGuard:
    """Wraps the engine's decode: every batch of latents it decodes must be finite."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.decode = engine._decode
        self.bad: list[str] = []
        engine._decode = self._checked

    def _checked(self, spec: Any, pipe: Any, latents: Any, tiled: bool) -> Any:
        import torch

        if not bool(torch.isfinite(latents).all()):
            self.bad.append(f"{int((~torch.isfinite(latents)).sum())} non-finite latent values")
        return self.decode(spec, pipe, latents, tiled)


def check_images(images: Any, guard: LatentGuard) -> None:
    import numpy as np

    if guard.bad:
        bad, guard.bad = guard.bad, []
        raise ValueError("; ".join(bad))
    for image in images:
        pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
        if pixels.max() < 8 or pixels.std() < 1.0:
            raise ValueError(f"a black or flat image (max {pixels.max():.0f})")


def feature_request(feature: str, base: GenerationRequest, picture: Any) -> GenerationRequest:
    from generation import requests

    seed = base.seed + 1
    if feature == "variation":
        return requests.variation_request(base, picture, strength=0.7, seed=seed)
    if feature == "upscale":
        return requests.upscale_request(base, picture, strength=0.5, seed=seed)
    if feature == "zoom":
        return requests.zoom_request(base, picture, factor=2.0, seed=seed)
    if feature == "pan":
        from generation.contract import PanDirection

        return requests.pan_request(
            base, picture, direction=PanDirection.UP, seed=seed, max_pixels=base.width**2 * 2
        )
    if feature == "square":
        height = max(64, base.height * 9 // 16 // 8 * 8)
        width = max(base.width, height * 16 // 9 // 8 * 8)
        wide = picture.resize((width, height))
        parent = base.with_changes(width=width, height=height)
        return requests.square_request(parent, wide, seed=seed, max_pixels=base.width**2 * 2)
    if feature == "region":
        from generation.contract import Region

        return requests.region_request(base, picture, seed=seed, regions={Region.CENTRE})
    if feature == "weighted_prompt":
        parts = (PromptPart("a red lighthouse", 2.0), PromptPart("fog", -0.5))
        return base.with_changes(prompt_parts=parts)
    if feature == "long_prompt":
        return base.with_changes(prompt=LONG_PROMPT)
    if feature == "stop":
        return base.with_changes(stop_percent=50)
    if feature == "tile":
        return base.with_changes(tile=True)
    if feature == "previews":
        return base.with_changes(preview=True)
    raise ValueError(f"feature: {feature!r}")


def model_spec(shape: str, tiny: bool, cache_dir: Path) -> tuple[Any, int]:
    from bench.bench_generation import MODELS, build_sd15_shaped, build_sdxl_shaped
    from generation.settings import ModelSpec
    from generation.tiny import TINY_SDXL, ensure_built

    family, folder, side = MODELS[shape]
    if tiny:
        source = TINY_SDXL if family == "sdxl" else "tiny"
        return ModelSpec(shape, source, base_resolution=64, family=family), 64
    builder = build_sdxl_shaped if family == "sdxl" else build_sd15_shaped
    source = str(ensure_built(cache_dir, folder, builder))
    return ModelSpec(shape, source, base_resolution=side, family=family), side


def timed_job(engine: Any, job: GenerationRequest, repeats: int) -> float:
    """The median seconds of `job` after one warm-up run (kernel choice, compilation)."""
    import torch

    cuda = engine.device == "cuda"
    engine.generate(job)
    seconds = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        began = time.perf_counter()
        engine.generate(job)
        if cuda:
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - began)
    return sorted(seconds)[len(seconds) // 2]


def graphs_compiled() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def kinds_compile_once(engine: Any, job: GenerationRequest, picture: Any) -> int:
    """Graphs compiled by a second round of job kinds (plain, --tile, a variation) after a
    first round warmed each up; the engine keeps that at 0 (generation/compiled.py)."""
    from generation import requests

    def round_of(seed: int, strength: float) -> None:
        engine.generate(job.with_changes(seed=seed))
        engine.generate(job.with_changes(seed=seed, tile=True))
        if picture is not None:
            variation = requests.variation_request(job, picture, strength=strength, seed=seed)
            engine.generate(variation.with_changes(num_candidates=job.num_candidates))

    round_of(11, 0.7)
    warm = graphs_compiled()
    round_of(12, 0.55)
    return graphs_compiled() - warm


def check_shape(check: Check, shape: str, args: Any) -> None:
    import torch

    from bench.bench_generation import count_tflop, job_tflop
    from bench.clip_l14 import FULL_CLIP_DIR, build_clip_l14_shaped
    from generation.engine import create_engine
    from generation.settings import EngineSettings
    from generation.tiny import ensure_built

    spec, side = model_spec(shape, args.tiny, args.cache_dir)
    clip = (
        "tiny"
        if args.tiny
        else str(ensure_built(args.cache_dir, FULL_CLIP_DIR, build_clip_l14_shaped))
    )
    settings = EngineSettings(
        models=(spec,),
        default_model=shape,
        clip_model=clip,
        cache_dir=args.cache_dir,
        device=args.device,
        dtype=args.dtype,
        max_pixels=side * side * 2,
        max_steps=100,
        preview_interval_s=0.0,
        local_files_only=True,
    )
    engine = create_engine(settings)
    cuda = engine.device == "cuda"
    figures: dict[str, Any] = {
        "size": f"{side}x{side}",
        "device": torch.cuda.get_device_name() if cuda else engine.device,
        "dtype": str(engine.model_dtype(spec)).removeprefix("torch."),
    }
    check.results["shapes"][shape] = figures
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    loaded = check.step(f"{shape}: load", lambda: engine.warm_up(shape) or True)
    if loaded is None:
        return
    guard = LatentGuard(engine)
    steps = args.check_steps
    base = GenerationRequest(
        kind=JobKind.IMAGINE,
        prompt="a lighthouse on a cliff at dusk",
        negative_prompt="blurry",
        width=side,
        height=side,
        steps=steps,
        seed=7,
        num_candidates=args.check_candidates,
        num_kept=1,
        model=shape,
    )

    def run(request: GenerationRequest) -> Any:
        updates: list[Any] = []
        result = engine.generate(request, progress=updates.append)
        check_images(result.images, guard)
        if request.preview and not any(u.preview_png for u in updates):
            raise ValueError("previews were asked for and none came")
        return result

    first = check.step(f"{shape}: imagine", lambda: run(base))
    picture = first.images[0] if first is not None else None
    for sampler in Sampler:
        check.step(
            f"{shape}: sampler {sampler.value}", lambda s=sampler: run(base.with_changes(sampler=s))
        )
    for feature in FEATURES:
        if picture is None and feature in (
            "variation",
            "upscale",
            "zoom",
            "pan",
            "square",
            "region",
        ):
            check.results["skipped"].append(f"{shape}: {feature} (no picture)")
            continue
        check.step(f"{shape}: {feature}", lambda f=feature: run(feature_request(f, base, picture)))
    figures["peak_gib_features"] = torch.cuda.max_memory_allocated() / 2**30 if cuda else math.nan

    job = base.with_changes(steps=args.job_steps, num_candidates=8, num_kept=4)
    per = count_tflop(engine, shape, side)
    tflop = job_tflop(per, job)
    figures["tflop_per_job"] = tflop

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    eager = check.step(
        f"{shape}: 8-candidate job, eager", lambda: timed_job(engine, job, args.repeats), 30
    )
    if eager is not None:
        figures["job_s_eager"] = eager
        figures["peak_gib_job"] = torch.cuda.max_memory_allocated() / 2**30 if cuda else math.nan
        figures["peak_fraction_eager"] = tflop / eager / args.peak_tflops
    engine.close()

    # The speed options, each engine loading the model afresh (the last one is closed first).
    faster = dataclasses.replace(settings, fuse_qkv_projections=True, vae_batched_decode=True)

    def fused() -> float:
        fused_engine = create_engine(faster)
        try:
            return timed_job(fused_engine, job, args.repeats)
        finally:
            fused_engine.close()

    seconds = check.step(f"{shape}: 8-candidate job, fused projections, batched decode", fused, 30)
    if seconds is not None:
        figures["job_s_fused"] = seconds
    if args.compile if args.compile is not None else cuda:
        compiled_engine = create_engine(
            dataclasses.replace(
                faster,
                compile_unet=True,
                compile_vae=True,
                compile_mode=CompileMode(args.compile_mode),
                compile_backend=args.compile_backend,
            )
        )
        compiled_engine.warm_up(shape)
        # The engine runs a graph that fails to compile eagerly; the check wants the failure.
        import torch._dynamo

        torch._dynamo.config.suppress_errors = False
        seconds = check.step(
            f"{shape}: 8-candidate job, compiled",
            lambda: timed_job(compiled_engine, job, args.repeats),
            need_s=90,
        )
        if seconds is not None:
            figures["job_s_compiled"] = seconds
            figures["peak_fraction_compiled"] = tflop / seconds / args.peak_tflops

        def once() -> int:
            kinds_job = job.with_changes(steps=steps)
            figures["graphs_after_warm_up"] = new = kinds_compile_once(
                compiled_engine, kinds_job, picture
            )
            if new:
                raise ValueError(f"{new} graphs compiled after each kind was warmed up")
            return new

        check.step(f"{shape}: compiled, job kinds compile once", once, need_s=120)
        compiled_engine.close()


def _shown(figures: dict[str, Any], key: str, unit: str = "", digits: int = 2) -> str:
    value = figures.get(key)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}{unit}"


def vram_table(results: dict[str, Any]) -> str:
    """The README's VRAM table, with measured figures."""
    lines = [
        "| model, 8 candidates | card | peak GPU memory (job / all features) | s per job eager / "
        "fused + batched decode / compiled | share of the card's peak (eager / compiled) |",
        "|---|---|---|---|---|",
    ]
    for shape, f in results["shapes"].items():
        lines.append(
            f"| {shape} at {f['size']} ({f['dtype']}) | {f['device']} | "
            f"{_shown(f, 'peak_gib_job', ' GiB')} / {_shown(f, 'peak_gib_features', ' GiB')} | "
            f"{_shown(f, 'job_s_eager', ' s')} / {_shown(f, 'job_s_fused', ' s')} / "
            f"{_shown(f, 'job_s_compiled', ' s')} | "
            f"{_shown(f, 'peak_fraction_eager', '', 3)} / "
            f"{_shown(f, 'peak_fraction_compiled', '', 3)} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.gpu_check", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (default without CUDA)")
    parser.add_argument("--models", default=",".join(SHAPES), help="sd15, sdxl")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", help="auto: float16 on CUDA")
    parser.add_argument("--cache-dir", type=Path, default=Path("data/models"))
    parser.add_argument("--check-steps", type=int, default=4, help="steps of each check job")
    parser.add_argument("--check-candidates", type=int, default=2)
    parser.add_argument("--job-steps", type=int, default=30, help="steps of the timed job")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--compile", action=argparse.BooleanOptionalAction, default=None, help="default: on CUDA"
    )
    parser.add_argument("--compile-mode", default="default", choices=[m.value for m in CompileMode])
    parser.add_argument(
        "--compile-backend", default="inductor", help="eager: trace only (CPU runs of the check)"
    )
    parser.add_argument("--peak-tflops", type=float, default=990.0, help="990: H100 dense fp16")
    parser.add_argument("--budget-s", type=float, default=450.0)
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        args.tiny = True
    shapes = [s.strip() for s in args.models.split(",") if s.strip()]
    if not shapes or set(shapes) - set(SHAPES):
        parser.error(f"--models: sd15 and/or sdxl, got {args.models!r}")
    check = Check(args.budget_s)
    check.results["mode"] = "tiny" if args.tiny else "full-size random weights"
    for shape in shapes:
        # A shape needs a minute at least (full size: building, loading, the checks).
        check.step(
            f"{shape}: all checks",
            lambda s=shape: check_shape(check, s, args) or True,
            need_s=10 if args.tiny else 60,
        )
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    check.results["seconds"] = time.perf_counter() - check.started
    table = vram_table(check.results)
    print(table)
    if check.results["skipped"]:
        print("skipped: " + ", ".join(check.results["skipped"]))
    if check.results["failures"]:
        print("FAILED:\n  " + "\n  ".join(check.results["failures"]))
    check.results["table"] = table
    if args.json:
        args.json.write_text(json.dumps(check.results, indent=2, default=str) + "\n")
    return 1 if check.results["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
