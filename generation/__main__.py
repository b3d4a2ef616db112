"""Render jobs from the command line, without Discord.

    python -m generation render "a lighthouse at dusk --ar 3:2 --seed 7" --model tiny --out out/
    python -m generation vary out/candidate_1.png --strong --out out/vary
    python -m generation upscale out/candidate_1.png --out out/upscale
    python -m generation build-tiny --cache-dir data/models

`render` takes the same prompt syntax as the bot (`generation.prompt`), writes `grid.png`, the
kept candidates `candidate_1.png` … (each with AUTOMATIC1111 `parameters` metadata) and
`result.json` (seeds, CLIP scores, timings, notes). `vary` and `upscale` start from a PNG made
this way and read its metadata. Bad input exits with status 2 and one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from generation.contract import (
    MAX_CANDIDATES,
    MAX_SEED,
    GenerationRequest,
    GenerationResult,
    JobKind,
    Progress,
    Sampler,
)
from generation.requests import upscale_request, variation_request
from generation.settings import TINY, EngineSettings, ModelSpec

log = logging.getLogger("generation.cli")

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1


def _parser() -> argparse.ArgumentParser:
    defaults = EngineSettings()
    common = argparse.ArgumentParser(add_help=False)
    engine = common.add_argument_group("engine")
    engine.add_argument("--model", default=TINY, help="model name (default: %(default)s)")
    engine.add_argument(
        "--model-source",
        help="Hugging Face id or local diffusers folder for --model (not needed for tiny)",
    )
    engine.add_argument("--family", choices=("sd", "sdxl"), default="sd")
    engine.add_argument(
        "--base-resolution",
        type=int,
        help="side the model was trained at (default: 128 for tiny, 512 for sd, 1024 for sdxl)",
    )
    engine.add_argument("--clip-model", default=defaults.clip_model)
    engine.add_argument("--cache-dir", type=Path, default=defaults.cache_dir)
    engine.add_argument("--device", choices=("auto", "cuda", "cpu", "mps"), default="auto")
    engine.add_argument(
        "--dtype", choices=("auto", "float16", "bfloat16", "float32"), default="auto"
    )
    engine.add_argument("--local-files-only", action="store_true")
    engine.add_argument("--max-pixels", type=int, default=defaults.max_pixels)
    engine.add_argument("--max-steps", type=int, default=defaults.max_steps)
    common.add_argument("--out", type=Path, default=Path("out"), help="output folder")
    common.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    common.add_argument("-v", "--verbose", action="store_true", help="log what the engine does")

    parser = argparse.ArgumentParser(
        prog="python -m generation", description="imagine-bot generation without Discord"
    )
    commands = parser.add_subparsers(dest="command", required=True)

    render = commands.add_parser("render", parents=[common], help="render one /imagine job")
    render.add_argument("prompt", help="prompt with Midjourney-style flags")
    render.add_argument("--candidates", type=int, default=defaults.num_candidates)
    render.add_argument("--kept", type=int, default=defaults.num_kept)

    for name, what in (("vary", "variations of"), ("upscale", "a 2x upscale of")):
        sub = commands.add_parser(name, parents=[common], help=f"{what} a rendered PNG")
        sub.add_argument("image", type=Path, help="a PNG written by render (with its metadata)")
        sub.add_argument("--seed", type=int, help="new seed (default: random)")
        sub.add_argument("--strength", type=float, help="denoising strength")
        if name == "vary":
            sub.add_argument("--strong", action="store_true", help="strong instead of subtle")
            sub.add_argument("--candidates", type=int, default=defaults.num_candidates)
            sub.add_argument("--kept", type=int, default=defaults.num_kept)

    build = commands.add_parser("build-tiny", help="build the tiny random-weight models")
    build.add_argument("--cache-dir", type=Path, default=defaults.cache_dir)
    return parser


def _settings(args: argparse.Namespace) -> EngineSettings:
    defaults = EngineSettings()
    models = list(defaults.models)
    if args.model != TINY:
        if not args.model_source:
            raise ValueError(f"--model-source: needed to load model {args.model!r}")
        base = args.base_resolution or (1024 if args.family == "sdxl" else 512)
        models.append(ModelSpec(args.model, args.model_source, base, args.family))
    elif args.base_resolution:
        models = [ModelSpec(TINY, TINY, args.base_resolution)]
    candidates = getattr(args, "candidates", defaults.num_candidates)
    kept = getattr(args, "kept", defaults.num_kept)
    if not 1 <= kept <= candidates <= MAX_CANDIDATES:
        raise ValueError(f"--kept/--candidates: need 1 <= kept <= candidates <= {MAX_CANDIDATES}")
    return EngineSettings(
        models=tuple(models),
        default_model=args.model,
        clip_model=args.clip_model,
        cache_dir=args.cache_dir,
        device=args.device,
        dtype=args.dtype,
        num_candidates=candidates,
        num_kept=kept,
        max_pixels=args.max_pixels,
        max_steps=args.max_steps,
        local_files_only=args.local_files_only,
    )


def _request_from_png(path: Path, settings: EngineSettings, model: str) -> tuple[Any, Any]:
    """The image at `path` and an IMAGINE request rebuilt from its `parameters` metadata."""
    from PIL import Image

    from generation.images import parse_a1111_parameters, read_parameters

    if not path.is_file():
        raise ValueError(f"image: no such file {str(path)!r}")
    image = Image.open(path)
    image.load()
    text = read_parameters(image)
    if text is None:
        raise ValueError(f"image: {path} carries no generation parameters")
    params = parse_a1111_parameters(text)
    try:
        request = GenerationRequest(
            kind=JobKind.IMAGINE,
            prompt=params["Prompt"],
            negative_prompt=params["Negative prompt"],
            width=image.width,
            height=image.height,
            steps=int(params["Steps"]),
            guidance=float(params["CFG scale"]),
            sampler=Sampler.parse(params["Sampler"]),
            seed=int(params["Seed"]),
            num_candidates=settings.num_candidates,
            num_kept=settings.num_kept,
            model=model,
            tile=params.get("Tiling") == "True",
        )
    except KeyError as exc:
        raise ValueError(f"image: its parameters lack {exc.args[0]!r}") from None
    return image.convert("RGB"), request


def _print_progress(quiet: bool) -> Any:
    last = [-1.0]

    def report(progress: Progress) -> None:
        # A line per 10 %: readable in a terminal and in a CI log alike.
        if quiet or (progress.fraction - last[0] < 0.1 and progress.step != progress.total):
            return
        last[0] = progress.fraction
        print(f"step {progress.step}/{progress.total}", file=sys.stderr, flush=True)

    return report


def _write(
    out: Path,
    request: GenerationRequest,
    result: GenerationResult,
    model: str,
    extra: dict[str, Any],
) -> list[Path]:
    from generation.images import a1111_parameters, make_grid, save_png

    out.mkdir(parents=True, exist_ok=True)
    written = []
    images = []
    for rank, (image, seed) in enumerate(zip(result.images, result.seeds, strict=True), start=1):
        text = a1111_parameters(
            request, seed, model, image.width, image.height, strength=result.denoising_strength
        )
        written.append(save_png(image, out / f"candidate_{rank}.png", text))
        images.append(
            {
                "file": written[-1].name,
                "seed": seed,
                "clip_score": round(result.clip_scores[rank - 1], 4),
                "candidate_index": result.candidate_indices[rank - 1],
            }
        )
    if len(result.images) > 1:
        written.insert(0, save_png(make_grid(result.images), out / "grid.png"))
    summary = {
        **extra,
        "request": request.to_json(),
        "model": model,
        "grid": "grid.png" if len(result.images) > 1 else None,
        "images": images,
        "timings_s": {k: round(v, 4) for k, v in result.timings_s.items()},
    }
    path = out / "result.json"
    path.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    written.append(path)
    return written


def _quiet_libraries(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if verbose:
        return
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _run(args: argparse.Namespace) -> int:
    if args.command == "build-tiny":
        from generation.tiny import ensure_tiny_clip, ensure_tiny_sd

        logging.basicConfig(level=logging.INFO, format="%(message)s")
        for folder in (ensure_tiny_sd(args.cache_dir), ensure_tiny_clip(args.cache_dir)):
            print(folder)
        return 0

    settings = _settings(args)
    extra: dict[str, Any] = {}
    if args.command == "render":
        from generation.prompt import parse_prompt

        parsed = parse_prompt(args.prompt, settings, model=args.model)
        if parsed.image_refs:
            # Links are untrusted: only the bot fetches them, through its fetch policy.
            raise ValueError(
                "prompt: pictures (image links, --sref, --oref, --cref) are taken by the bot only"
            )
        request = parsed.request
        extra = {"prompt": args.prompt, "notes": list(parsed.notes)}
        for note in parsed.notes:
            print(f"note: {note}", file=sys.stderr)
    else:
        image, parent = _request_from_png(args.image, settings, args.model)
        seed = args.seed if args.seed is not None else random.randint(0, MAX_SEED - MAX_CANDIDATES)
        if args.command == "vary":
            strength = args.strength or (
                settings.variation_strength_strong
                if args.strong
                else settings.variation_strength_subtle
            )
            request = variation_request(parent, image, strength=strength, seed=seed)
        else:
            strength = args.strength or settings.upscale_strength
            request = upscale_request(parent, image, strength=strength, seed=seed)
        extra = {"source": str(args.image)}

    _quiet_libraries(args.verbose)
    from generation.engine import create_engine

    engine = create_engine(settings)
    engine.validate(request)  # before any model is loaded: bad input fails fast
    started = time.perf_counter()
    result = engine.generate(request, progress=_print_progress(args.quiet))
    for path in _write(args.out, request, result, request.model, extra):
        print(path)
    scores = ", ".join(f"{s:.2f}" for s in result.clip_scores)
    print(
        f"{request.kind.value} {request.width}x{request.height}: seeds "
        f"{', '.join(map(str, result.seeds))}; CLIP {scores}; "
        f"{time.perf_counter() - started:.1f}s",
        file=sys.stderr,
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except ValueError as exc:  # PromptError is a ValueError: a user mistake, not a crash
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (OSError, RuntimeError) as exc:
        print(f"failed: {exc}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
