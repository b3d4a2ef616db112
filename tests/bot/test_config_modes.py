"""`[modes]`: read, typed, checked; a bad value names its key."""

from __future__ import annotations

from pathlib import Path

import pytest

from bot.config import ConfigError, ModesConfig, load_config, parse_config

REPO = Path(__file__).resolve().parents[2]


def test_the_shipped_config_and_the_defaults_agree() -> None:
    assert load_config(REPO / "config.toml").modes == ModesConfig()
    assert parse_config({}).modes == ModesConfig()


def test_values_are_read() -> None:
    modes = parse_config(
        {
            "modes": {
                "relax_enabled": False,
                "relax_cost_percent": 25,
                "relax_max_queued_per_user": 4,
                "relax_max_per_day": 10,
                "turbo_cost_percent": 150,
                "wait_estimate_run_s": 12,
            }
        }
    ).modes
    assert modes == ModesConfig(False, 25, 4, 10, 150, 12.0)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("relax_cost_percent", 101, "between 0 and 100"),
        ("relax_cost_percent", -1, ">= 0"),
        ("relax_cost_percent", 2.5, "must be int"),
        ("turbo_cost_percent", 99, "between 100 and 1000"),
        ("turbo_cost_percent", 1001, "between 100 and 1000"),
        ("relax_max_queued_per_user", 0, "> 0"),
        ("relax_max_per_day", 0, "> 0"),
        ("relax_enabled", "yes", "must be bool"),
        ("wait_estimate_run_s", 0, "> 0"),
        # Every queued job's reply words this estimate: a wait of inf or nan can't be said.
        ("wait_estimate_run_s", float("inf"), "a finite number"),
        ("wait_estimate_run_s", float("nan"), "a finite number"),
        ("relax_cost", 10, "unknown setting"),
    ],
)
def test_a_bad_value_names_its_key(key: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError) as refused:
        parse_config({"modes": {key: value}})
    assert f"modes.{key}" in str(refused.value) and message in str(refused.value)
