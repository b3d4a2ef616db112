"""The torch floor in pyproject.toml and the Dockerfile's base image satisfy what the pinned
libraries need: an older torch installs cleanly and then transformers silently disables it."""

import importlib.metadata
import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]


def _torch_floor(requirements: list[str]) -> Version:
    for text in requirements:
        requirement = Requirement(text)
        if requirement.name == "torch":
            floors = [Version(s.version) for s in requirement.specifier if s.operator == ">="]
            if floors:
                return max(floors)
    raise AssertionError("no torch>= requirement")


def _project_floor() -> Version:
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    return _torch_floor(project["dependencies"])


@pytest.mark.parametrize("library", ["transformers", "diffusers"])
def test_torch_floor_covers_the_pinned_libraries(library: str) -> None:
    wanted = [
        r.split(";")[0]
        for r in importlib.metadata.requires(library) or []
        if r.startswith("torch") and 'extra == "torch"' in r
    ]
    assert _project_floor() >= _torch_floor(wanted)


def test_docker_base_image_meets_the_torch_floor() -> None:
    dockerfile = (REPO / "Dockerfile").read_text(encoding="utf-8")
    match = re.search(r"^FROM pytorch/pytorch:([0-9.]+)-", dockerfile, re.MULTILINE)
    assert match is not None, "the image is built on pytorch/pytorch"
    assert Version(match[1]) >= _project_floor()
