"""Fixtures for the front-end tests: a bot config in a temp folder, and one real tiny-model
engine shared by every bot started in the session (loading it per test would dominate)."""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path
from typing import Any

import pytest

from bot.config import Config, parse_config
from bot.core import InProcessWorker
from generation.settings import EngineSettings
from tests.fakediscord import fake_discord  # noqa: F401

BASE_RESOLUTION = 128


@pytest.fixture(scope="session")
def bot_engine_settings(tiny_models: Path) -> EngineSettings:
    from generation.tiny import tiny_engine_settings

    return tiny_engine_settings(
        tiny_models,
        BASE_RESOLUTION,
        default_steps=4,
        max_pixels=256 * 256,
    )


@pytest.fixture(scope="session")
def shared_engine(bot_engine_settings: EngineSettings) -> Any:
    from generation.engine import create_engine

    return create_engine(bot_engine_settings)


def bot_config(
    data_dir: Path, engine: EngineSettings, guild_id: int | None = None, **sections: Any
) -> Config:
    raw: dict[str, Any] = {
        "discord": {"command_cooldown_s": 0.0, "progress_edit_interval_s": 0.2},
        "credits": {"daily_allowance": 100},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    if guild_id is not None:
        raw["discord"].setdefault("guild_ids", [guild_id])
    config = parse_config(raw, base_dir=data_dir.parent)
    return dataclasses.replace(config, data_dir=data_dir, engine=engine)


def in_process_workers(config: Config, engine: Any) -> list[InProcessWorker]:
    return [InProcessWorker(config.engine, config.data_dir, lambda _settings: engine)]


class GatedEngine:
    """The real engine, held at the door until the test opens the gate: lets a test act while
    a job is certainly still running (cancel it, expire its token) without racing the CPU."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.gate = threading.Event()
        self.entered = threading.Event()

    def generate(self, request: Any, progress: Any = None, cancel: Any = None) -> Any:
        self.entered.set()
        while not self.gate.wait(0.05):
            if cancel is not None and cancel.is_set():
                break
        return self.engine.generate(request, progress, cancel)
