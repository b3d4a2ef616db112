"""A fake generation engine for scheduler tests: same protocol as generation.engine, no torch.

It lives at the edge only: the scheduler, workers, database and files are all real. Behaviour is
chosen per request through markers in the prompt, so the same engine can be driven from a child
process (where tests cannot reach it directly):

    [raise]        raise RuntimeError at step 1 (an engine bug)
    [oom]          raise an error shaped like torch.OutOfMemoryError
    [invalid]      raise ValueError (the engine refuses the request)
    [crash]        os._exit(3) at step 2 (a segfault, as far as the parent can tell)
    [sigkill]      SIGKILL itself at step 2 (the kernel's OOM killer)
    [crash-once]   like [crash], but only the first time (needs `fake_marker_dir`)
    [hang]         stop responding at step 2 and ignore cancel
    [slow]         steps take 20x longer

`EngineSettings.extra`: `fake_step_s` (seconds per step, default 0.002), `fake_marker_dir`.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

from generation.contract import (
    GenerationCancelled,
    GenerationRequest,
    GenerationResult,
    Progress,
    ProgressCallback,
)
from generation.settings import EngineSettings
from generation.taste import compact, personal_scores, space_for

FACTORY = "tests.core.fakes:create_fake_engine"


class FakeOutOfMemoryError(RuntimeError):
    pass


class FakeEngine:
    def __init__(self, settings: EngineSettings) -> None:
        self.step_s = float(settings.extra.get("fake_step_s", "0.002"))
        marker = settings.extra.get("fake_marker_dir")
        self.marker_dir = Path(marker) if marker else None
        self.calls: list[GenerationRequest] = []
        self.on_step: list[object] = []

    def generate(
        self,
        request: GenerationRequest,
        progress: ProgressCallback | None = None,
        cancel: threading.Event | None = None,
    ) -> GenerationResult:
        request.validate()
        self.calls.append(request)
        prompt = request.prompt
        step_s = self.step_s * (20 if "[slow]" in prompt else 1)
        if "[invalid]" in prompt:
            raise ValueError("steps: the fake engine refuses this request")
        for step in range(1, request.steps + 1):
            if cancel is not None and cancel.is_set():
                raise GenerationCancelled()
            if "[raise]" in prompt:
                raise RuntimeError("fake engine failure")
            if "[oom]" in prompt:
                raise FakeOutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            if step == 2:
                self._misbehave(prompt)
            time.sleep(step_s)
            if progress is not None:
                progress(Progress(step, request.steps))
        if cancel is not None and cancel.is_set():
            raise GenerationCancelled()
        # Plain ranking keeps the first candidates (scores fall with the index); a --p job's
        # taste reorders them through the real generation.taste, over fixed fake embeddings.
        count = request.num_candidates
        plain = np.array([0.9 - 0.1 * i for i in range(count)])
        embeds = np.stack([fake_embedding(request.seed + i) for i in range(count)])
        ranked, personalized = personal_scores(plain, embeds, request.personalize, FAKE_SPACE)
        keep = sorted(range(count), key=lambda i: (-ranked[i], i))[: request.num_kept]
        seeds = tuple(request.seed + i for i in keep)
        images = tuple(
            Image.new("RGB", (request.width, request.height), _colour(seed)) for seed in seeds
        )
        return GenerationResult(
            images=images,
            seeds=seeds,
            clip_scores=tuple(float(plain[i]) for i in keep),
            timings_s={"fake_s": step_s * request.steps},
            candidate_indices=tuple(keep),
            embeddings=compact(embeds, FAKE_SPACE),
            personalized=personalized,
        )

    def _misbehave(self, prompt: str) -> None:
        if "[crash]" in prompt:
            os._exit(3)
        if "[sigkill]" in prompt:
            os.kill(os.getpid(), signal.SIGKILL)
        if "[crash-once]" in prompt and self.marker_dir is not None:
            marker = self.marker_dir / "crashed-once"
            if not marker.exists():
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.write_text("1")
                os._exit(3)
        if "[hang]" in prompt:
            while True:
                time.sleep(1)


# The fake ranker's embeddings: 16 numbers drawn from the candidate's seed, unit length.
FAKE_SPACE = space_for("fake", 16)


def fake_embedding(seed: int) -> np.ndarray:
    vector = np.random.default_rng(seed).standard_normal(16)
    return vector / np.linalg.norm(vector)


def _colour(seed: int) -> tuple[int, int, int]:
    return (seed * 67 % 256, seed * 131 % 256, seed * 197 % 256)


def create_fake_engine(settings: EngineSettings) -> FakeEngine:
    return FakeEngine(settings)


def create_engine_failing_on_spawns(settings: EngineSettings) -> FakeEngine:
    """Counts the worker processes that built it (in `fake_marker_dir`); the ones listed in
    `fake_fail_spawns` (e.g. "2,3") fail to load like a GPU whose memory is not free yet, and
    the ones in `fake_hang_spawns` never finish loading (a hung driver, a stuck download)."""
    marker_dir = Path(settings.extra["fake_marker_dir"])
    marker_dir.mkdir(parents=True, exist_ok=True)
    counter = marker_dir / "spawns"
    count = int(counter.read_text()) + 1 if counter.exists() else 1
    counter.write_text(str(count))
    if str(count) in settings.extra.get("fake_fail_spawns", "").split(","):
        raise FakeOutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB")
    if str(count) in settings.extra.get("fake_hang_spawns", "").split(","):
        time.sleep(3600)  # the parent kills it at its start-up timeout
    return FakeEngine(settings)


def create_engine_recording_its_device(settings: EngineSettings) -> FakeEngine:
    """Writes the CUDA_VISIBLE_DEVICES its process was started with to `fake_marker_dir`
    (one file per process), as a GPU engine would read it."""
    marker_dir = Path(settings.extra["fake_marker_dir"])
    marker_dir.mkdir(parents=True, exist_ok=True)
    device = os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>")
    (marker_dir / f"device-{os.getpid()}").write_text(device)
    return FakeEngine(settings)


class JobRecordingEngine(FakeEngine):
    """Appends "<pid> <prompt>" to `fake_marker_dir`/jobs for every job it finishes: which
    process (actor) produced each result, and how many times."""

    def generate(
        self,
        request: GenerationRequest,
        progress: ProgressCallback | None = None,
        cancel: threading.Event | None = None,
    ) -> GenerationResult:
        result = super().generate(request, progress, cancel)
        assert self.marker_dir is not None
        self.marker_dir.mkdir(parents=True, exist_ok=True)
        with (self.marker_dir / "jobs").open("a", encoding="utf-8") as log:
            log.write(f"{os.getpid()} {request.prompt}\n")
        return result


def create_engine_recording_its_jobs(settings: EngineSettings) -> JobRecordingEngine:
    return JobRecordingEngine(settings)
