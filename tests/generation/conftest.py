"""Shared fixtures: the tiny models (built once per run, see tests/conftest.py) and one engine
over them."""

from __future__ import annotations

from pathlib import Path

import pytest

from generation.settings import EngineSettings


@pytest.fixture(scope="session")
def tiny_cache(tiny_models: Path) -> Path:
    return tiny_models


@pytest.fixture(scope="session")
def settings(tiny_cache: Path) -> EngineSettings:
    # local_files_only: the tiny models must load without any network access.
    return EngineSettings(cache_dir=tiny_cache, device="cpu", local_files_only=True, max_steps=50)


@pytest.fixture(scope="session")
def engine(settings: EngineSettings):
    from generation.engine import create_engine

    return create_engine(settings)
