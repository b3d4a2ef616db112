"""Several workers on one box: counting devices, pinning each worker process to one, model
affinity, and a crash that costs one worker's job only."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest

from bot.config import ConfigError, parse_config
from bot.core import Core, InProcessWorker, JobState, Owner, ProcessWorker
from bot.core.devices import parse_nvidia_smi_list, parse_visible_devices, visible_cuda_devices
from bot.core.service import local_workers
from generation.settings import EngineSettings, ModelSpec
from tests.core.conftest import assert_consistent, finished, make_config, open_core, request
from tests.core.fakes import FACTORY, FakeEngine, create_fake_engine

ALICE = Owner(user_id=101, guild_id=1, channel_id=2)
BOB = Owner(user_id=202, guild_id=1, channel_id=2)

NVIDIA_SMI_TWO_GPUS = """\
GPU 0: NVIDIA H200 (UUID: GPU-6f1e2b7c-1111-2222-3333-444455556666)
GPU 1: NVIDIA H200 (UUID: GPU-0a9b8c7d-1111-2222-3333-444455556666)
"""
NVIDIA_SMI_MIG = """\
GPU 0: NVIDIA A100-SXM4-40GB (UUID: GPU-5d5ba0d6-1111-2222-3333-444455556666)
  MIG 3g.20gb     Device  0: (UUID: MIG-1234abcd-1111-2222-3333-444455556666)
  MIG 3g.20gb     Device  1: (UUID: MIG-5678abcd-1111-2222-3333-444455556666)
GPU 1: NVIDIA A100-SXM4-40GB (UUID: GPU-7e7ca0d6-1111-2222-3333-444455556666)
"""


@pytest.mark.parametrize(
    ("output", "devices"),
    [
        (NVIDIA_SMI_TWO_GPUS, ["0", "1"]),
        (NVIDIA_SMI_MIG, ["0", "1"]),
        ("", []),
        ("No devices were found\n", []),
    ],
)
def test_nvidia_smi_listing_is_parsed(output: str, devices: list[str]) -> None:
    assert parse_nvidia_smi_list(output) == devices


@pytest.mark.parametrize(
    ("value", "devices"),
    [
        (None, None),
        ("", []),
        ("-1", []),
        ("0", ["0"]),
        ("2,3", ["2", "3"]),
        (" 1 , 0 ", ["1", "0"]),
        ("0,-1,1", ["0"]),  # CUDA stops at -1
        ("0,junk,1", ["0"]),  # and at the first entry it cannot read
        ("GPU-6f1e2b7c,GPU-0a9b8c7d", ["GPU-6f1e2b7c", "GPU-0a9b8c7d"]),
        ("NoDevFiles", []),
    ],
)
def test_cuda_visible_devices_is_parsed(value: str | None, devices: list[str] | None) -> None:
    assert parse_visible_devices(value) == devices


def test_the_environment_wins_over_nvidia_smi_which_ignores_it() -> None:
    def two_gpus() -> str:
        return NVIDIA_SMI_TWO_GPUS

    def no_driver() -> None:
        return None

    assert visible_cuda_devices({}, two_gpus) == ["0", "1"]
    assert visible_cuda_devices({"CUDA_VISIBLE_DEVICES": "1"}, two_gpus) == ["1"]
    assert visible_cuda_devices({"CUDA_VISIBLE_DEVICES": ""}, two_gpus) == []
    assert visible_cuda_devices({}, no_driver) == []


def test_auto_on_a_cpu_box_is_one_worker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # No CUDA_VISIBLE_DEVICES and no nvidia-smi on the PATH: a CPU-only box, whatever runs this.
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    config = make_config(tmp_path, scheduler={"workers": "auto"})
    workers = local_workers(config, FACTORY)
    assert [(w.name, w.environment) for w in workers] == [("local-0", {})]
    numbered = make_config(tmp_path, scheduler={"workers": 3})
    assert [w.name for w in local_workers(numbered, FACTORY)] == ["local-0", "local-1", "local-2"]


async def test_auto_pins_one_worker_process_to_each_device(tmp_path: Path) -> None:
    config = make_config(tmp_path, scheduler={"workers": "auto"}, step_s=0.05)
    workers = local_workers(
        config, "tests.core.fakes:create_engine_recording_its_device", devices=["0", "1"]
    )
    assert [w.name for w in workers] == ["cuda-0", "cuda-1"]
    core = await open_core(config, workers=workers)
    try:
        jobs = [
            await core.scheduler.submit(ALICE, request("a red fox")),
            await core.scheduler.submit(BOB, request("a blue owl")),
        ]
        assert [(await finished(core, j.id)).state for j in jobs] == [JobState.SUCCEEDED] * 2
    finally:
        await core.close(drain_timeout_s=2.0)
    seen = sorted(p.read_text() for p in (tmp_path / "markers").glob("device-*"))
    assert seen == ["0", "1"]


async def test_a_job_goes_to_the_worker_that_has_its_model(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    two_models = (ModelSpec(name="alpha", source="tiny"), ModelSpec(name="beta", source="tiny"))
    config = dataclasses.replace(
        config, engine=dataclasses.replace(config.engine, models=two_models)
    )
    engines: dict[str, FakeEngine] = {}

    def factory_for(name: str) -> Callable[[EngineSettings], FakeEngine]:
        def create(settings: EngineSettings) -> FakeEngine:
            engines[name] = create_fake_engine(settings)
            return engines[name]

        return create

    workers = [
        InProcessWorker(config.engine, config.data_dir, factory_for(name), name=name)
        for name in ("w0", "w1")
    ]
    core: Core = await open_core(config, workers=workers)
    try:
        # Both at once: alpha lands on w0 (the first free worker), beta on w1.
        first = [
            await core.scheduler.submit(ALICE, request("a red fox", model="alpha")),
            await core.scheduler.submit(BOB, request("a blue owl", model="beta")),
        ]
        for job in first:
            await finished(core, job.id)
        assert [r.model for r in engines["w0"].calls] == ["alpha"]
        assert [r.model for r in engines["w1"].calls] == ["beta"]
        states = {s.name: s.models for s in core.scheduler.worker_states()}
        assert states == {"w0": ("alpha",), "w1": ("beta",)}

        # One at a time, both workers free: each goes where its model is, not to the first.
        for model in ("beta", "alpha", "beta"):
            job = await core.scheduler.submit(ALICE, request(f"a {model} cat", model=model))
            assert (await finished(core, job.id)).state is JobState.SUCCEEDED
        assert [r.model for r in engines["w0"].calls] == ["alpha", "alpha"]
        assert [r.model for r in engines["w1"].calls] == ["beta", "beta", "beta"]
        await assert_consistent(core)
    finally:
        await core.close(drain_timeout_s=2.0)


async def test_one_worker_process_crashes_and_the_other_keeps_serving(tmp_path: Path) -> None:
    config = make_config(tmp_path, scheduler={"max_attempts": 1}, step_s=0.02)
    workers = [
        ProcessWorker(config.engine, config.data_dir, FACTORY, name=f"p{i}", startup_timeout_s=60)
        for i in range(2)
    ]
    core = await open_core(config, workers=workers)
    try:
        crash = await core.scheduler.submit(ALICE, request("a fox [crash]"))
        await asyncio.sleep(0)
        bob_jobs = [await core.scheduler.submit(BOB, request(f"owl {i}")) for i in range(3)]
        assert (await finished(core, crash.id)).state is JobState.FAILED
        for job in bob_jobs:
            assert (await finished(core, job.id)).state is JobState.SUCCEEDED
        assert sum(w.restarts for w in workers) == 2  # the job crashed twice: max_attempts 1
        balance = await core.credits.balance(ALICE.user_id)
        assert balance.held == 0 and balance.available == 20
        await assert_consistent(core)
    finally:
        await core.close(drain_timeout_s=2.0)


@pytest.mark.parametrize(
    ("value", "error"),
    [
        ("two", 'scheduler.workers: must be an integer >= 1 or "auto"'),
        (0, "scheduler.workers: must be > 0"),
        (True, "scheduler.workers: must be int"),
    ],
)
def test_workers_is_a_count_or_auto(value: object, error: str) -> None:
    assert parse_config({"scheduler": {"workers": "auto"}}).scheduler.workers == "auto"
    assert parse_config({"scheduler": {"workers": 2}}).scheduler.workers == 2
    with pytest.raises(ConfigError, match=error):
        parse_config({"scheduler": {"workers": value}})
