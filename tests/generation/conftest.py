"""Shared fixtures: the tiny models are built once per test session into a temporary cache."""

from __future__ import annotations

from pathlib import Path

import pytest

from generation.settings import EngineSettings


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from generation.tiny import ensure_tiny_clip, ensure_tiny_sd

    cache = tmp_path_factory.mktemp("models")
    ensure_tiny_sd(cache)
    ensure_tiny_clip(cache)
    return cache


@pytest.fixture(scope="session")
def settings(tiny_cache: Path) -> EngineSettings:
    # local_files_only: the tiny models must load without any network access.
    return EngineSettings(cache_dir=tiny_cache, device="cpu", local_files_only=True, max_steps=50)


@pytest.fixture(scope="session")
def engine(settings: EngineSettings):
    from generation.engine import create_engine

    return create_engine(settings)
