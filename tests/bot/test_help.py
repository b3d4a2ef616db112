"""What /help tells a member about flags whose meaning differs from Midjourney's."""

from bot.app.render import help_text
from bot.config import parse_config


def test_help_says_quality_above_one_adds_no_steps():
    text = help_text(parse_config({}))
    assert (
        "`--quality .25|.5|1|2|4` fewer steps at .25 and .5; 1, 2 and 4 all use the default" in text
    )


def test_help_offers_ddpm_with_its_step_count_caveat():
    text = help_text(parse_config({}))
    assert "`ddpm`" in text
    caveat = text[text.index("(`ddpm`") :]
    assert "250 steps" in caveat and "`ddim`" in caveat
