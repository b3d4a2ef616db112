"""Prompts in the syntax of every Midjourney version parse, class by class (legacy and new
parameters, several references, quotes, capitals, long ratios, unknown flags), each next to
what must still be refused.

Expected values come from Midjourney's documented syntax and the settings below (sd15 at
512 px, default 30 steps), not from the parser's output.
"""

from __future__ import annotations

import pytest

from generation.prompt import ImagineOptions, ParsedPrompt, PromptError, parse_prompt
from generation.settings import EngineSettings, ModelSpec

SETTINGS = EngineSettings(
    models=(ModelSpec(name="sd15", source="runwayml/stable-diffusion-v1-5", base_resolution=512),),
    default_model="sd15",
    default_steps=30,
    max_steps=100,
    max_pixels=1024 * 1024,
)
PLAIN = "a lighthouse at dusk"


def parse(text: str, **kwargs: object) -> ParsedPrompt:
    return parse_prompt(text, SETTINGS, seed_source=lambda: 99, **kwargs)  # type: ignore[arg-type]


def refusal(text: str) -> PromptError:
    with pytest.raises(PromptError) as caught:
        parse(text)
    return caught.value


def same_job_as_plain(parsed: ParsedPrompt) -> bool:
    return parsed.request == parse(PLAIN).request


# --- ignored parameters given several times, or with several values ---------------------------


@pytest.mark.parametrize(
    ("suffix", "noted"),
    [
        ("--sref 123 --sref 456", ["--sref 123 ignored", "--sref 456 ignored"]),
        ("--sref 123 456", ["--sref 123 ignored", "--sref 456 ignored"]),
        (
            "--sref 123 456 --sw 200 --sref 789",
            ["--sref 123 ", "--sref 456 ", "--sref 789 ", "--sw 200 "],
        ),
        ("--v 5 --v 6", ["--v 5 ignored", "--v 6 ignored"]),
        ("--s 100 --stylize 200", ["--s 100 ignored", "--stylize 200 ignored"]),
    ],
)
def test_ignored_parameters_never_conflict(suffix: str, noted: list[str]) -> None:
    parsed = parse(f"{PLAIN} {suffix}")
    assert same_job_as_plain(parsed)
    for start, note in zip(noted, parsed.notes, strict=True):
        assert note.startswith(start), parsed.notes


def test_the_same_ignored_value_twice_is_noted_once() -> None:
    (note,) = parse(f"{PLAIN} --sref 77 --sref 77").notes
    assert note.startswith("--sref 77 ignored (a Midjourney style code")


@pytest.mark.parametrize(
    ("suffix", "flag"),
    [
        ("--ar 3:2 --ar 2:3", "--ar"),
        ("--seed 1 --seed 2", "--seed"),
        ("--r 2 --repeat 3", "--repeat"),
        ("--tile --stop 50 --stop 60", "--stop"),
        ("--w 512 --w 768 --h 512", "--w"),
        ("--w 512 --h 512 --h 768", "--h"),
    ],
)
def test_used_parameters_still_conflict(suffix: str, flag: str) -> None:
    error = refusal(f"{PLAIN} {suffix}")
    assert error.flag == flag
    assert str(error).startswith(f"{flag}: given twice with different values")


# --- legacy v1-v3 and test-model parameters ---------------------------------------------------


@pytest.mark.parametrize(
    ("suffix", "ratio"),
    [
        ("--w 1024 --h 1792", (4, 7)),
        ("--h 1792 --w 1024", (4, 7)),
        ("--W 768 --H 512", (3, 2)),
        ("--w 640 --h 384 --hd", (5, 3)),
        ("--w 512 --h 512", (1, 1)),
        ("--w 2048 --h 256", (4, 1)),  # 8:1, clamped
    ],
)
def test_legacy_width_and_height_become_the_aspect_ratio(
    suffix: str, ratio: tuple[int, int]
) -> None:
    parsed = parse(f"{PLAIN} {suffix}")
    with_ar = parse(f"{PLAIN} --ar {ratio[0]}:{ratio[1]}").request
    assert (parsed.request.width, parsed.request.height) == (with_ar.width, with_ar.height)
    assert any(note.startswith("--w ") and "--h " in note for note in parsed.notes)
    assert not any("weird" in note for note in parsed.notes)


def test_legacy_size_agreeing_with_ar_is_fine_and_disagreeing_is_refused() -> None:
    assert parse(f"{PLAIN} --w 1024 --h 576 --ar 16:9").request.width > 512
    error = refusal(f"{PLAIN} --w 1024 --h 1792 --ar 16:9")
    assert error.flag == "--ar"
    assert "--w 1024 --h 1792" in str(error) and "4:7" in str(error)


def test_legacy_size_against_the_aspect_option() -> None:
    agreeing = parse(f"{PLAIN} --w 768 --h 512", options=ImagineOptions(aspect="3:2"))
    assert agreeing.request.width > agreeing.request.height
    with pytest.raises(PromptError) as caught:
        parse(f"{PLAIN} --w 1024 --h 1792", options=ImagineOptions(aspect="16:9"))
    assert caught.value.flag == "--w"
    assert str(caught.value) == (
        "--w 1024 --h 1792 conflicts with the aspect option (16:9); use one or the other"
    )


def test_w_alone_is_weird_and_h_alone_is_noted() -> None:
    weird = parse(f"{PLAIN} --w 250")
    assert same_job_as_plain(weird)
    assert weird.notes == ("--w 250 ignored (Midjourney weird)",)
    tall = parse(f"{PLAIN} --h 1792")
    assert same_job_as_plain(tall)
    assert tall.notes[0].startswith("--h 1792 ignored")
    # --weird spelled out is never a width, even next to --h.
    both = parse(f"{PLAIN} --weird 250 --h 1792")
    assert same_job_as_plain(both)
    with pytest.raises(PromptError, match=r"^--w: expected a whole number between 1 and 10000"):
        parse(f"{PLAIN} --w 250.5 --h 512")


LEGACY_SWITCHES = ["hd", "test", "testp", "beta", "uplight", "upbeta", "upanime", "creative"]
LEGACY_SWITCHES += ["wallpaper", "vibe", "sameseed", "video"]
LEGACY_SWITCHES += ["private", "public", "stealth"]


@pytest.mark.parametrize("name", LEGACY_SWITCHES)
@pytest.mark.parametrize("spelling", [str.lower, str.upper, str.capitalize])
def test_legacy_switches_in_any_capitalisation(name: str, spelling: type[str]) -> None:
    parsed = parse(f"{PLAIN} --{spelling(name)}")  # type: ignore[operator]
    assert same_job_as_plain(parsed)
    assert parsed.notes[0].startswith(f"--{name} ignored")


def test_legacy_quality_5_keeps_the_default_steps() -> None:
    parsed = parse(f"{PLAIN} --q 5 --v 3")
    assert parsed.request.steps == 30
    assert parsed.notes[-1] == "--q 5 → 30 steps, the default (more steps add no detail here)"


@pytest.mark.parametrize("name", ["fast", "relax", "turbo"])
@pytest.mark.parametrize("spelling", [str.lower, str.upper, str.capitalize])
def test_speed_switches_in_any_capitalisation_choose_the_mode(
    name: str, spelling: type[str]
) -> None:
    # Honoured, no longer ignored: the job is the plain one, run in the mode named.
    parsed = parse(f"{PLAIN} --{spelling(name)}")  # type: ignore[operator]
    assert same_job_as_plain(parsed)
    assert parsed.speed == name
    assert not any("ignored" in note for note in parsed.notes)


def test_capitalised_used_flags_are_honoured() -> None:
    request = parse(f"{PLAIN} --AR 16:9 --Seed 12 --NO fog --Q .5 --Tile --STOP 70").request
    assert request.width > request.height
    assert (request.seed, request.negative_prompt, request.steps) == (12, "fog", 15)
    assert request.tile and request.stop_percent == 70


# --- quotes --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        f'"{PLAIN} --ar 16:9"',
        f"“{PLAIN} --ar 16:9”",
        f"„{PLAIN} --ar 16:9“",
        f"‘{PLAIN} --ar 16:9’",
        f"'{PLAIN} --ar 16:9'",
        f"«{PLAIN} --ar 16:9»",
        f'{PLAIN} --ar 16:9"',
        f'"{PLAIN} --ar 16:9',
        f"{PLAIN} --ar 16:9”",
        f'  "{PLAIN} --ar 16:9"  ',
        f'/imagine prompt: "{PLAIN} --ar 16:9"',
        f'"/imagine prompt: {PLAIN} --ar 16:9"',
    ],
)
def test_quotes_from_web_pages_and_spreadsheets(text: str) -> None:
    request = parse(text).request
    assert request.prompt == PLAIN
    assert request == parse(f"{PLAIN} --ar 16:9").request


@pytest.mark.parametrize(
    ("text", "prompt"),
    [
        # A spreadsheet cell doubles the quotes inside it.
        ('"a neon sign that says ""OPEN"" --ar 3:2"', 'a neon sign that says "OPEN"'),
        ('"a neon sign that says "OPEN""', 'a neon sign that says "OPEN"'),
        ('a neon sign that says "OPEN"', 'a neon sign that says "OPEN"'),
        ('"OPEN" and "CLOSED" signs', '"OPEN" and "CLOSED" signs'),
        ("a sign saying “OPEN” --v 6", "a sign saying “OPEN”"),
        ("the artist's studio, 1990s", "the artist's studio, 1990s"),
    ],
)
def test_quotes_inside_the_prompt_stay(text: str, prompt: str) -> None:
    assert parse(text).request.prompt == prompt


def test_a_quote_glued_to_other_values() -> None:
    request = parse(f'{PLAIN} --seed 5 --no fog --v 6"').request
    assert (request.seed, request.negative_prompt) == (5, "fog")
    assert parse(f'{PLAIN} --seed 5"').request.seed == 5
    assert parse(f"{PLAIN} --c 20”").request.chaos == 20


# --- current parameters ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "suffix",
    [
        "--zoom 1.5",
        "--zoom 2",
        "--exp 100",
        "--sv 4",
        "--raw",
        "--motion low",
        "--motion HIGH",
        "--loop",
        "--end https://cdn.example.com/last.png",
        "--bs 4",
        "--video --motion high --loop --bs 2",
    ],
)
def test_current_parameters_are_ignored_with_a_note(suffix: str) -> None:
    parsed = parse(f"{PLAIN} {suffix} --v 7")
    assert same_job_as_plain(parsed)
    flags = [word for word in suffix.split() if word.startswith("--")]
    assert len(parsed.notes) == len(flags) + 1
    for flag, note in zip(flags, parsed.notes, strict=False):
        assert note.lstrip("`").startswith(flag + " ") and "ignored" in note


@pytest.mark.parametrize(
    ("suffix", "flag", "accepted"),
    [
        ("--zoom 0.9", "--zoom", "between 1 and 2"),
        ("--zoom 2.5", "--zoom", "between 1 and 2"),
        ("--exp 101", "--exp", "between 0 and 100"),
        ("--ow 0", "--ow", "between 1 and 1000"),
        ("--motion medium", "--motion", "low, high"),
        ("--bs 3", "--bs", "1, 2, 4"),
        ("--r 41", "--r", "between 1 and 40"),
        ("--repeat 0", "--repeat", "between 1 and 40"),
    ],
)
def test_current_parameters_with_bad_values_are_refused(
    suffix: str, flag: str, accepted: str
) -> None:
    error = refusal(f"{PLAIN} {suffix}")
    assert error.flag == flag
    assert str(error).startswith(f"{flag}: ") and accepted in str(error)


# --- aspect ratios beyond 4:1 ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ratio", "clamped"),
    [("8:1", "4:1"), ("5:1", "4:1"), ("21:4", "4:1"), ("1:6", "1:4"), ("99999:1", "4:1")],
)
def test_aspect_ratios_beyond_4_to_1_are_clamped_with_a_note(ratio: str, clamped: str) -> None:
    parsed = parse(f"{PLAIN} --ar {ratio}")
    limit = parse(f"{PLAIN} --ar {clamped}").request
    assert (parsed.request.width, parsed.request.height) == (limit.width, limit.height)
    assert parsed.notes == (f"--ar {ratio} → {clamped}, the most elongated ratio this model draws",)


def test_the_clamp_stops_at_4_to_1_exactly() -> None:
    assert parse(f"{PLAIN} --ar 4:1").notes == ()
    assert parse(f"{PLAIN} --ar 17:4").notes[0].startswith("--ar 17:4 → 4:1")


@pytest.mark.parametrize("ratio", ["0:1", "16x9", "16:9:1", "1.5:1", "-2:1", "123456:1", "wide"])
def test_malformed_ratios_are_still_refused(ratio: str) -> None:
    error = refusal(f"{PLAIN} --ar {ratio}")
    assert error.flag == "--ar"
    assert str(error).startswith("--ar: expected W:H")


def test_the_aspect_option_keeps_its_declared_range() -> None:
    with pytest.raises(PromptError, match=r"^aspect: expected W:H .* between 1:4 and 4:1"):
        parse(PLAIN, options=ImagineOptions(aspect="8:1"))
    # A clamped inline ratio agrees with the same option only when both are the same ratio.
    assert parse(f"{PLAIN} --ar 4:1", options=ImagineOptions(aspect="4:1")).request.width > 512


# --- unknown flags: the forward-compatibility rule -------------------------------------------


@pytest.mark.parametrize(
    ("suffix", "note"),
    [
        ("--foo", "--foo is not known here; ignored"),
        ("--foo 3", "--foo 3 is not known here; ignored"),
        ("--ar 3:2 --lumen 40", "--lumen 40 is not known here; ignored"),
        ("--lumen 40 --ar 3:2", "--lumen 40 is not known here; ignored"),
        ("--Lumen high", "--lumen high is not known here; ignored"),
        ("—lumen 40", "--lumen 40 is not known here; ignored"),
        ('--lumen 40"', "--lumen 40 is not known here; ignored"),
    ],
)
def test_an_unknown_flag_at_the_end_is_noted_not_refused(suffix: str, note: str) -> None:
    parsed = parse(f"{PLAIN} {suffix}")
    assert note in parsed.notes
    assert parsed.request.prompt == PLAIN


@pytest.mark.parametrize(
    ("suffix", "flag", "suggestion"),
    [
        ("--sed 5", "--sed", "did you mean --seed?"),
        ("--seeed 5", "--seeed", "did you mean --seed?"),
        ("--aspetc 2:3", "--aspetc", "did you mean --aspect?"),
        ("--stylise 100", "--stylise", "did you mean --stylize?"),
        ("--chaso 10", "--chaso", "did you mean --chaos?"),
        ("--tiel", "--tiel", "did you mean --tile?"),
        ("--negtive fog", "--negtive", "did you mean --negative?"),
        ("--ar16:9", "--ar16:9", "did you mean '--ar 16:9'?"),
        ("--v6", "--v6", "did you mean '--v 6'?"),
        ("--negative fog", "--negative", "use --no"),
        ("--width 512", "--width", "use --ar"),
        ("--upscale", "--upscale", "U buttons"),
        ("--help", "--help", "/help"),
    ],
)
def test_typos_and_other_tools_flags_are_refused_with_a_suggestion(
    suffix: str, flag: str, suggestion: str
) -> None:
    error = refusal(f"{PLAIN} {suffix}")
    assert error.flag == flag
    assert str(error).startswith(f"{flag}: unknown flag")
    assert suggestion in str(error)


@pytest.mark.parametrize(
    ("text", "flag"),
    [
        ("a lighthouse --glowing at dusk", "--glowing"),
        (f"{PLAIN} --lumen 40 and a boat --ar 3:2", "--lumen"),
        (f"{PLAIN} --lumen_x 40", "--lumen_x"),
    ],
)
def test_an_unknown_flag_followed_by_prompt_text_is_refused(text: str, flag: str) -> None:
    error = refusal(text)
    assert error.flag == flag
    assert str(error).startswith(f"{flag}: unknown flag; this bot understands --ar")
