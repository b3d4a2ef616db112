from pathlib import Path

import pytest

from bot.config import ConfigError, load_config, parse_config
from generation.contract import Sampler

REPO = Path(__file__).resolve().parents[2]


def test_shipped_config_loads_with_its_documented_values():
    config = load_config(REPO / "config.toml")
    assert config.engine.default_model == "tiny"
    assert config.engine.model().base_resolution == 128
    assert config.engine.default_sampler is Sampler.DPMPP_2M_KARRAS
    assert config.scheduler.max_queued_per_user == 3
    assert config.credits.daily_allowance == 20
    assert config.data_dir == REPO / "data"
    assert config.engine.cache_dir == REPO / "data" / "models"


def test_empty_config_gives_defaults_relative_to_the_file(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("")
    config = load_config(path)
    assert config.data_dir == tmp_path / "data"
    assert config.database_path.parent == tmp_path / "data"


def test_config_is_immutable():
    config = parse_config({})
    with pytest.raises(AttributeError):
        config.log_level = "DEBUG"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("raw", "names"),
    [
        ({"scheduler": {"max_queue": 0}}, "scheduler.max_queue"),
        ({"scheduler": {"max_queue": "100"}}, "scheduler.max_queue"),
        ({"scheduler": {"max_queu": 100}}, "scheduler.max_queu"),
        ({"credits": {"daily_allowance": -1}}, "credits.daily_allowance"),
        ({"credits": {"cost_imagine": True}}, "credits.cost_imagine"),
        ({"generation": {"device": "tpu"}}, "generation.device"),
        ({"generation": {"default_sampler": "plms"}}, "generation.default_sampler"),
        ({"generation": {"kept": 9, "candidates": 8}}, "generation.kept"),
        ({"generation": {"default_model": "sdxl"}}, "generation.default_model"),
        (
            {"generation": {"models": [{"name": "a", "source": "x", "base_resolution": 500}]}},
            "generation.models[0].base_resolution",
        ),
        ({"generation": {"models": [{"name": "a"}]}}, "generation.models[0].source"),
        ({"discord": {"admin_user_ids": ["123"]}}, "discord.admin_user_ids"),
        ({"moderation": {"banned_patterns": ["(unclosed"]}}, "moderation.banned_patterns"),
        ({"moderation": {"nsfw_policy": "delete"}}, "moderation.nsfw_policy"),
        ({"log_level": "LOUD"}, "log_level"),
        ({"unknown_section": {}}, "unknown_section"),
        # nan passes every range check and inf none means anything: refused for any float key.
        ({"scheduler": {"job_timeout_s": float("nan")}}, "scheduler.job_timeout_s"),
        ({"scheduler": {"aging_s": float("inf")}}, "scheduler.aging_s"),
        ({"generation": {"default_guidance": float("nan")}}, "generation.default_guidance"),
        ({"moderation": {"nsfw_threshold": float("-inf")}}, "moderation.nsfw_threshold"),
    ],
)
def test_bad_values_name_the_key(raw, names):
    with pytest.raises(ConfigError, match=names.replace("[", r"\[").replace("]", r"\]")):
        parse_config(raw)


def test_missing_and_broken_files_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[scheduler\nmax_queue = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(broken)
