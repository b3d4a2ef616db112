"""What live previews cost: one job with previews off, through the linear latent-to-RGB map,
and through a tiny VAE decoder (AutoencoderTiny, the `preview_decoder` a model may name).

    python -m bench.bench_previews                  # tiny SD model on the CPU
    python -m bench.bench_previews --reps 5 --steps 20 --size 256

Each mode runs the same job (same seed, candidates, steps) `--reps` times after a warm-up;
the median job time is printed with the previews made and the cost of one preview (the time
over "off", per preview). Previews are made at every step (interval 0, the worst case) and at
the configured default interval (2 s: a job this short makes one). Decoders:

- "taesd tiny": the tiny random-weight AutoencoderTiny the tests use (8 channels a block);
- "taesd arch": TAESD's own architecture (64 channels, 3 blocks a stage, as in
  madebyollin/taesd) with random weights, saved and loaded with from_pretrained: the real
  decoder's cost, since speed does not depend on the weights' values.

Figures are printed; nothing is asserted.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from generation.contract import GenerationRequest, JobKind, Progress
from generation.settings import EngineSettings

TAESD_ARCH_DIR = "bench-taesd-random"


def ensure_taesd_arch(cache_dir: Path) -> Path:
    """TAESD's architecture (diffusers' AutoencoderTiny defaults) with random weights."""
    from generation.tiny import ensure_built

    def build(folder: Path) -> None:
        import torch
        from diffusers import AutoencoderTiny

        torch.manual_seed(0)
        decoder: Any = AutoencoderTiny()
        decoder.save_pretrained(folder, safe_serialization=True)

    return ensure_built(cache_dir, TAESD_ARCH_DIR, build)


def run_mode(
    settings: EngineSettings, decoder: str | None, interval_s: float, args: argparse.Namespace
) -> tuple[float, int]:
    """Median job time (s) and previews per job for one mode; decoder None = previews off."""
    from generation.engine import create_engine

    model = replace(settings.models[0], preview_decoder=decoder or "")
    engine = create_engine(replace(settings, models=(model,), preview_interval_s=interval_s))
    request = GenerationRequest(
        kind=JobKind.IMAGINE,
        prompt="a lighthouse at dusk",
        width=args.size,
        height=args.size,
        steps=args.steps,
        seed=7,
        num_candidates=args.candidates,
        num_kept=min(4, args.candidates),
        preview=decoder is not None,
    )
    updates: list[Progress] = []
    engine.generate(request, updates.append)  # loads the model and decoder
    times = []
    for _ in range(args.reps):
        updates.clear()
        started = time.perf_counter()
        engine.generate(request, updates.append)
        times.append(time.perf_counter() - started)
    previews = sum(1 for u in updates if u.preview_png is not None)
    return statistics.median(times), previews


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=128, help="image side in px")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--candidates", type=int, default=4)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--cache-dir", type=Path, help="model cache to reuse")
    args = parser.parse_args()

    from generation.tiny import ensure_tiny_taesd, tiny_engine_settings

    cache = args.cache_dir or Path(tempfile.mkdtemp(prefix="bench-previews-"))
    settings = tiny_engine_settings(cache, 128)
    decoders = {
        "linear map": "",
        "taesd tiny": str(ensure_tiny_taesd(cache)),
        "taesd arch": str(ensure_taesd_arch(cache)),
    }
    default_interval_s = EngineSettings().preview_interval_s
    print(
        f"tiny SD model on {settings.device}: {args.size}x{args.size}, {args.steps} steps, "
        f"{args.candidates} candidates, median of {args.reps} jobs"
    )
    off_s, _ = run_mode(settings, None, 0.0, args)
    print(f"{'previews':<12} {'interval':>9} {'job s':>8} {'previews':>9} {'ms/preview':>11}")
    print(f"{'off':<12} {'-':>9} {off_s:>8.3f} {0:>9} {'-':>11}")
    for name, decoder in decoders.items():
        for interval_s in (0.0, default_interval_s):
            job_s, previews = run_mode(settings, decoder, interval_s, args)
            each = f"{(job_s - off_s) / previews * 1000:.1f}" if previews else "-"
            print(f"{name:<12} {interval_s:>8g}s {job_s:>8.3f} {previews:>9} {each:>11}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
