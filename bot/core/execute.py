"""Running one job on an engine and writing its images: shared by every kind of worker.

This runs off the event loop (in a worker thread or the worker child process). Images are
written under the data folder with names derived from the job id only, each to a temporary name
first and then renamed, so a crash never leaves a half-written PNG where a result is expected.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from generation.contract import (
    CandidateEmbeddings,
    Engine,
    GenerationCancelled,
    GenerationRequest,
    GenerationResult,
    Progress,
)
from generation.settings import EngineSettings

log = logging.getLogger(__name__)

DEFAULT_ENGINE_FACTORY = "generation.engine:create_engine"

EngineFactory = Callable[[EngineSettings], Engine]


@dataclass(frozen=True)
class WorkItem:
    """Everything a worker needs for one job; plain data so it pickles across processes."""

    job_id: int
    attempt: int
    request_data: dict[str, Any]
    # Relative to the data folder; the source image of a variation/upscale.
    init_image_path: str | None
    # Relative to the data folder, e.g. "images/123"; the worker creates it.
    output_dir: str


@dataclass(frozen=True)
class WorkOutcome:
    image_paths: tuple[str, ...]
    grid_path: str | None
    seeds: tuple[int, ...]
    clip_scores: tuple[float, ...]
    timings_s: dict[str, float] = field(default_factory=dict)
    candidate_indices: tuple[int, ...] = ()
    width: int = 0
    height: int = 0
    # CUDA memory the worker's process held after the job (for metrics); None off CUDA.
    gpu_memory_bytes: int | None = None
    # Models the engine holds after the job, so the next job for one of them comes here.
    loaded_models: tuple[str, ...] = ()
    # What a job answers in words (a describe's prompt suggestions); it may have no images.
    texts: tuple[str, ...] = ()
    # The map a ControlNet followed (edges, depth …), shown beside the result.
    control_map_path: str | None = None
    # Every ranked candidate's compact CLIP embedding (personalization), and whether the
    # member's taste took part in the ranking: plain data, it crosses processes and Ray.
    embeddings: CandidateEmbeddings | None = None
    personalized: bool = False


@dataclass(frozen=True)
class RenderedJob:
    """A job's result before it is written: PNG bytes by file name inside the job's output
    folder, and the outcome that names them. Plain data, so a worker on another machine can
    send it back and the bot writes it into its own data folder (`write_result`)."""

    output_dir: str
    files: tuple[tuple[str, bytes], ...]
    outcome: WorkOutcome


class JobError(Exception):
    """The engine refused or failed this job; the job fails and is refunded, the worker lives.

    `message` is written for the user.
    """

    def __init__(self, message: str, kind: str = "error") -> None:
        super().__init__(message)
        self.message = message
        self.kind = kind


def resolve_factory(factory: str | EngineFactory) -> EngineFactory:
    """Accept "package.module:function" (works across a spawn boundary) or a callable."""
    if callable(factory):
        return factory
    module_name, _, attr = factory.partition(":")
    if not module_name or not attr:
        raise ValueError(f"engine_factory: expected 'module:function', got {factory!r}")
    return getattr(importlib.import_module(module_name), attr)


def load_request(data_dir: Path, item: WorkItem) -> GenerationRequest:
    return load_request_images(data_dir, item.request_data, item.init_image_path)


def input_paths(request_data: Mapping[str, Any]) -> list[str]:
    """The stored files of a job's own pictures (image prompts, references, masks …)."""
    return [str(i["path"]) for i in request_data.get("inputs", ()) if i.get("path")]


def item_files(item: WorkItem) -> list[str]:
    """Every stored file a job reads (its source image and its own pictures), relative to the
    data folder: what `load_request` opens, and what travels to a worker on another machine."""
    source = [item.init_image_path] if item.init_image_path is not None else []
    return [*source, *input_paths(item.request_data)]


def read_inputs(data_dir: Path, item: WorkItem) -> dict[str, bytes]:
    return {relative: safe_path(data_dir, relative).read_bytes() for relative in item_files(item)}


def load_request_images(
    data_dir: Path, request_data: Mapping[str, Any], init_image_path: str | None
) -> GenerationRequest:
    """The stored request with its pictures loaded (blocking: call it off the event loop)."""
    init_image = None
    if init_image_path is not None:
        with Image.open(safe_path(data_dir, init_image_path)) as source:
            init_image = source.convert("RGB")
    pictures = []
    for relative in input_paths(request_data):
        with Image.open(safe_path(data_dir, relative)) as picture:
            # A mask keeps its single channel; everything else is RGB.
            pictures.append(picture.convert("L" if picture.mode == "L" else "RGB"))
    return GenerationRequest.from_json(
        dict(request_data), init_image=init_image, input_images=pictures
    )


def safe_path(data_dir: Path, relative: str) -> Path:
    """Resolve a stored relative path, refusing anything that would leave the data folder."""
    root = data_dir.resolve()
    path = (root / relative).resolve()
    if root != path and root not in path.parents:
        raise ValueError(f"path: {relative!r} is outside the data folder")
    return path


def run_job(
    engine: Engine,
    item: WorkItem,
    data_dir: Path,
    progress: Callable[[Progress], None] | None,
    cancel: threading.Event,
) -> WorkOutcome:
    """Generate and save; raises GenerationCancelled, or JobError for a failure to report."""
    request = prepare_request(data_dir, item)
    return write_result(render_job(engine, item, request, progress, cancel), data_dir)


def prepare_request(data_dir: Path, item: WorkItem) -> GenerationRequest:
    """`load_request`, with a stored request that cannot be read as the job's failure."""
    try:
        return load_request(data_dir, item)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise JobError(f"invalid request: {exc}", "invalid") from exc


def render_job(
    engine: Engine,
    item: WorkItem,
    request: GenerationRequest,
    progress: Callable[[Progress], None] | None,
    cancel: threading.Event,
) -> RenderedJob:
    """Generate and encode the PNGs without writing them; raises like `run_job`."""
    started = time.perf_counter()
    try:
        result = engine.generate(request, progress=progress, cancel=cancel)
    except GenerationCancelled:
        raise
    except ValueError as exc:
        raise JobError(f"invalid request: {exc}", "invalid") from exc
    except MemoryError as exc:
        raise JobError(out_of_memory_message(), "oom") from exc
    except Exception as exc:
        if is_out_of_memory(exc):
            raise JobError(out_of_memory_message(), "oom") from exc
        log.exception("job %d: engine failed", item.job_id)
        raise JobError(f"the generator failed ({type(exc).__name__})", "engine") from exc
    generate_s = time.perf_counter() - started
    rendered = encode_result(result, request, item)
    timings = dict(rendered.outcome.timings_s)
    timings.setdefault("generate_s", generate_s)
    outcome = WorkOutcome(
        **{
            **rendered.outcome.__dict__,
            "timings_s": timings,
            "gpu_memory_bytes": cuda_memory_bytes(),
            "loaded_models": loaded_models(engine, request),
        }
    )
    return RenderedJob(rendered.output_dir, rendered.files, outcome)


def loaded_models(engine: Engine, request: GenerationRequest) -> tuple[str, ...]:
    """What the engine says it holds (an optional `loaded_models()`), else at least the model
    this job just used."""
    report = getattr(engine, "loaded_models", None)
    if callable(report):
        try:
            return tuple(str(name) for name in report())
        except Exception:
            log.debug("loaded_models() failed", exc_info=True)
    return (request.model,)


def cuda_memory_bytes() -> int | None:
    """Memory this process holds on its CUDA device, or None when it never used CUDA. Only
    looks at torch if the engine already imported it (a CPU-only fake engine never does)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    try:
        if not torch.cuda.is_initialized():
            return None
        return int(torch.cuda.memory_reserved())
    except Exception:  # a metric must never fail a job
        return None


def is_out_of_memory(exc: BaseException) -> bool:
    # torch.OutOfMemoryError (and its CUDA alias) without importing torch here.
    return "OutOfMemory" in type(exc).__name__ or "out of memory" in str(exc).lower()


def out_of_memory_message() -> str:
    return "the GPU ran out of memory; try a smaller size, fewer steps or fewer candidates"


def save_result(
    result: GenerationResult, request: GenerationRequest, item: WorkItem, data_dir: Path
) -> WorkOutcome:
    return write_result(encode_result(result, request, item), data_dir)


def encode_result(
    result: GenerationResult, request: GenerationRequest, item: WorkItem
) -> RenderedJob:
    from generation.images import a1111_parameters, make_grid, png_bytes

    if not result.images:
        if result.texts:
            # A describe or a shorten answers in words only (a shorten's numbers, its words'
            # weights, ride in clip_scores).
            outcome = WorkOutcome(
                image_paths=(),
                grid_path=None,
                seeds=tuple(int(s) for s in result.seeds),
                clip_scores=tuple(float(s) for s in result.clip_scores),
                timings_s={k: float(v) for k, v in result.timings_s.items()},
                texts=tuple(str(t) for t in result.texts),
            )
            return RenderedJob(item.output_dir, (), outcome)
        raise JobError("the generator returned no images", "engine")
    started = time.perf_counter()
    first = result.images[0]

    def parameters(seed: int, image: Image.Image) -> str:
        return a1111_parameters(
            request,
            seed,
            request.model,
            image.width,
            image.height,
            strength=result.denoising_strength,
        )

    files = [
        (f"{index}.png", png_bytes(image, parameters(seed, image)))
        for index, (image, seed) in enumerate(zip(result.images, result.seeds, strict=True))
    ]
    paths = [f"{item.output_dir}/{name}" for name, _ in files]
    grid_path = paths[0]
    if len(result.images) > 1:
        # The grid carries the best image's parameters, which reproduce its first cell.
        grid = make_grid(list(result.images))
        files.append(("grid.png", png_bytes(grid, parameters(result.seeds[0], first))))
        grid_path = f"{item.output_dir}/grid.png"
    control_map_path = None
    if result.control_map is not None:
        files.append(("control.png", png_bytes(result.control_map)))
        control_map_path = f"{item.output_dir}/control.png"
    timings = {k: float(v) for k, v in result.timings_s.items()}
    timings["save_s"] = time.perf_counter() - started
    outcome = WorkOutcome(
        image_paths=tuple(paths),
        grid_path=grid_path,
        seeds=tuple(int(s) for s in result.seeds),
        clip_scores=tuple(float(s) for s in result.clip_scores),
        timings_s=timings,
        candidate_indices=tuple(int(i) for i in result.candidate_indices),
        width=first.width,
        height=first.height,
        control_map_path=control_map_path,
        embeddings=result.embeddings,
        personalized=bool(result.personalized),
    )
    return RenderedJob(item.output_dir, tuple(files), outcome)


def write_result(rendered: RenderedJob, data_dir: Path) -> WorkOutcome:
    """Write a job's PNGs into the data folder, whichever machine rendered them; each file
    appears whole or not at all. `save_s` becomes encoding plus writing."""
    started = time.perf_counter()
    out_dir = safe_path(data_dir, rendered.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, data in rendered.files:
        # The names may come from another machine: plain file names only.
        if name != Path(name).name or name.startswith("."):
            raise ValueError(f"files: {name!r} is not a plain file name")
        _atomic(out_dir / name, functools.partial(_write_bytes, data))
    timings = dict(rendered.outcome.timings_s)
    timings["save_s"] = timings.get("save_s", 0.0) + time.perf_counter() - started
    return WorkOutcome(**{**rendered.outcome.__dict__, "timings_s": timings})


def _write_bytes(data: bytes, path: Path) -> None:
    path.write_bytes(data)


def _atomic(path: Path, write: Callable[[Path], object]) -> None:
    temporary = path.with_name(f".tmp-{os.getpid()}-{threading.get_ident()}-{path.name}")
    try:
        write(temporary)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
