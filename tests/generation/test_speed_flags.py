"""--fast, --relax and --turbo: read as the job's speed mode, which the bot queues and charges
by (the request itself is the same)."""

from __future__ import annotations

import pytest

from generation.flags import PromptError
from generation.prompt import parse_jobs, parse_prompt
from generation.settings import EngineSettings

SETTINGS = EngineSettings()


@pytest.mark.parametrize(
    ("text", "speed"),
    [
        ("a cat", None),
        ("a cat --relax", "relax"),
        ("a cat --fast", "fast"),
        ("a cat —turbo", "turbo"),  # a phone's dash
        ("a cat --RELAX --ar 3:2", "relax"),
        ("a cat --relax --relax", "relax"),
    ],
)
def test_the_speed_flag_is_the_jobs_mode(text: str, speed: str | None) -> None:
    parsed = parse_prompt(text, SETTINGS, seed_source=lambda: 1)
    assert parsed.speed == speed
    assert parsed.request.prompt == "a cat"
    # Honoured, so no "ignored" note; and nothing about the picture changes.
    assert not any("ignored" in note for note in parsed.notes)
    plain = parse_prompt(
        "a cat" + (" --ar 3:2" if "--ar" in text else ""), SETTINGS, seed_source=lambda: 1
    )
    assert parsed.request == plain.request


def test_two_speed_modes_are_refused_by_name() -> None:
    with pytest.raises(PromptError) as refused:
        parse_prompt("a cat --fast --relax", SETTINGS)
    assert "--fast and --relax: choose one speed mode" in str(refused.value)


def test_every_job_of_a_prompt_carries_its_speed() -> None:
    jobs = parse_jobs("a {cat, dog} --relax", SETTINGS, max_jobs=4)
    assert [job.speed for job in jobs] == ["relax", "relax"]
