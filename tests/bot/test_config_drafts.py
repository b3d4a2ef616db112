"""--draft's and /shorten's settings: read from config.toml, typed and validated (a bad value
names its key), and explained by /help as configured."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from bot.app.render import help_text
from bot.config import ConfigError, load_config, parse_config
from generation.contract import Sampler

ROOT = Path(__file__).resolve().parents[2]


def test_help_names_the_draft_settings_and_costs_as_configured() -> None:
    config = load_config(ROOT / "config.toml")
    assert config.engine.draft_steps == 8 and config.engine.draft_sampler is Sampler.UNIPC
    assert (config.credits.cost_draft_percent, config.credits.cost_shorten) == (25, 0)
    text = help_text(config)
    assert "`--draft` renders a fast, cheap draft (8 steps with UniPC) for 25 %" in text
    assert "✨ Enhance" in text and "/shorten" in text
    assert "/shorten itself costs 0 credits." in text

    other = dataclasses.replace(
        config,
        engine=dataclasses.replace(config.engine, draft_steps=5, draft_sampler=Sampler.DDIM),
        credits=dataclasses.replace(config.credits, cost_draft_percent=40, cost_shorten=1),
    )
    text = help_text(other)
    assert "(5 steps with DDIM) for 40 %" in text and "/shorten itself costs 1 credit." in text


def test_the_draft_keys_are_read() -> None:
    config = parse_config(
        {
            "generation": {"draft_steps": 6, "draft_sampler": "DPM++ 2M"},
            "credits": {"cost_draft_percent": 50, "cost_shorten": 2},
        }
    )
    assert (config.engine.draft_steps, config.engine.draft_sampler) == (6, Sampler.DPMPP_2M)
    assert (config.credits.cost_draft_percent, config.credits.cost_shorten) == (50, 2)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"generation": {"draft_sampler": "euler_a"}}, "generation.draft_sampler: euler_a adds"),
        ({"generation": {"draft_sampler": "heun"}}, "runs the model twice a step"),
        ({"generation": {"draft_sampler": "fastest"}}, "generation.draft_sampler: unknown"),
        ({"generation": {"draft_steps": 0}}, "generation.draft_steps: must be between 1"),
        ({"generation": {"draft_steps": 101}}, "generation.draft_steps: must be between 1"),
        ({"credits": {"cost_draft_percent": 150}}, "credits.cost_draft_percent: at most 100"),
        ({"credits": {"cost_draft_percent": -1}}, "credits.cost_draft_percent"),
        ({"credits": {"cost_shorten": -2}}, "credits.cost_shorten"),
    ],
)
def test_bad_draft_settings_name_their_key(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=None) as caught:
        parse_config(raw)
    assert message in str(caught.value), str(caught.value)
