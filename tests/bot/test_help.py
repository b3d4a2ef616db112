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


def test_help_explains_personalization_its_threshold_and_how_to_erase_it():
    from bot.core.taste import MIN_PAIRS

    text = help_text(parse_config({}))
    assert "`/rank`" in text
    assert "`--personalize [CODE …]` rank by your taste" in text  # honoured, not ignored
    section = text[text.index("**Personalization**") :]
    assert f"From {MIN_PAIRS} such ratings on" in section
    assert "deleted with the job" in section and "Erase taste profile" in section
    ignored = text[text.index("**Accepted and ignored**") :].splitlines()[0]
    assert "`--personalize`" not in ignored
