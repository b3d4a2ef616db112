"""The prepared GPU check runs its steps at tiny sizes on the CPU: every sampler and feature
through the engine, the timed 8-candidate job with each set of speed options (compiled with
the trace-only "eager" backend here, so the compiled steps run before a GPU is the first place
they do), the check that job kinds compile once, and the figures table, from
bench/gpu_check.sh."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.gpu_check import FEATURES, LatentGuard, check_images
from generation.contract import Sampler

REPO = Path(__file__).resolve().parents[1]


def test_the_gpu_check_script_runs_every_step_at_tiny_sizes(
    tmp_path: Path, tiny_models: Path
) -> None:
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_OUT": str(tmp_path / "out")}
    # One thread, as each test worker has (tests/conftest.py): on a machine whose cores the
    # other workers keep busy, a second thread mostly spins waiting for the first.
    env["OMP_NUM_THREADS"] = "1"
    args = ["--tiny", "--models", "sd15", "--check-steps", "2", "--check-candidates", "1"]
    # The run's tiny models (and the tiny add-ons other tests built there), not built again.
    args += ["--job-steps", "2", "--repeats", "1", "--cache-dir", str(tiny_models)]
    args += ["--compile", "--compile-backend", "eager"]
    done = subprocess.run(
        ["bash", str(REPO / "bench" / "gpu_check.sh"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert results["mode"] == "tiny"
    assert results["failures"] == [] and results["skipped"] == []
    passed = set(results["passed"])
    assert {f"sd15: sampler {s.value}" for s in Sampler} <= passed
    assert {f"sd15: {feature}" for feature in FEATURES} <= passed
    assert {
        "sd15: 8-candidate job, eager",
        "sd15: 8-candidate job, fused projections, batched decode",
        "sd15: 8-candidate job, compiled",
        "sd15: compiled, job kinds compile once",
    } <= passed
    figures = results["shapes"]["sd15"]
    assert figures["job_s_eager"] > 0 and figures["tflop_per_job"] > 0
    assert figures["job_s_fused"] > 0 and figures["job_s_compiled"] > 0
    assert figures["graphs_after_warm_up"] == 0
    assert "| sd15 at 64x64 (float32) | cpu |" in results["table"]
    assert (tmp_path / "out" / "gpu_check.log").read_text().count("ok ") >= len(passed)


def test_non_finite_latents_and_black_images_fail_the_check() -> None:
    import torch
    from PIL import Image

    class Engine:
        def _decode(self, spec, pipe, latents, tiled):
            return [Image.new("RGB", (8, 8), (200, 10, 90))]

    engine = Engine()
    guard = LatentGuard(engine)
    latents = torch.zeros(1, 4, 2, 2)
    latents[0, 0, 0, 0] = float("nan")
    images = engine._decode(None, None, latents, False)
    with pytest.raises(ValueError, match="1 non-finite latent values"):
        check_images(images, guard)
    noisy = Image.effect_noise((8, 8), 60).convert("RGB")
    check_images([noisy], guard)  # the guard was cleared by the failure
    with pytest.raises(ValueError, match="black or flat"):
        check_images([Image.new("RGB", (8, 8))], guard)
