"""The prompt parser: every flag, alias, conflict and bad value, `::` weights, sizes.

Expected values are worked out from the rules (Midjourney's syntax, the settings below), not
copied from the parser's output; the reasoning is in the comments where it is not obvious.
"""

from __future__ import annotations

import math
import subprocess
import sys
from collections.abc import Callable

import pytest

from generation.contract import MAX_PROMPT_CHARS, MAX_SEED, JobKind, PromptPart, Sampler
from generation.flags import FLAGS, Arity, Treatment
from generation.prompt import (
    MAX_INPUT_CHARS,
    ImagineOptions,
    ParsedPrompt,
    PromptError,
    parse_prompt,
    size_for_aspect,
)
from generation.prompt_text import MAX_PROMPT_PARTS
from generation.settings import EngineSettings, ModelSpec

SETTINGS = EngineSettings(
    models=(
        ModelSpec(name="sd15", source="runwayml/stable-diffusion-v1-5", base_resolution=512),
        ModelSpec(name="tiny", source="tiny", base_resolution=128),
        ModelSpec(name="sdxl", source="stabilityai/sdxl", base_resolution=1024, family="sdxl"),
    ),
    default_model="sd15",
    default_steps=30,
    default_guidance=7.0,
    default_sampler=Sampler.DPMPP_2M_KARRAS,
    num_candidates=8,
    num_kept=4,
    max_pixels=1024 * 1024,
    max_steps=100,
)


def fixed_seed(seed: int = 1234) -> Callable[[], int]:
    return lambda: seed


def parse(text: str, **kwargs: object) -> ParsedPrompt:
    kwargs.setdefault("seed_source", fixed_seed())
    return parse_prompt(text, SETTINGS, **kwargs)  # type: ignore[arg-type]


def parse_error(text: str, **kwargs: object) -> PromptError:
    with pytest.raises(PromptError) as caught:
        parse(text, **kwargs)
    return caught.value


def ratio(parsed: ParsedPrompt) -> float:
    return parsed.request.width / parsed.request.height


# --- defaults -------------------------------------------------------------------------------------


def test_plain_prompt_takes_every_default_from_settings() -> None:
    parsed = parse("a lighthouse at dusk")
    request = parsed.request
    assert request.kind is JobKind.IMAGINE
    assert request.prompt == "a lighthouse at dusk"
    assert request.prompt_parts == ()
    assert request.negative_prompt == ""
    assert (request.width, request.height) == (512, 512)  # sd15's base resolution, square
    assert request.steps == 30
    assert request.guidance == 7.0
    assert request.sampler is Sampler.DPMPP_2M_KARRAS
    assert (request.num_candidates, request.num_kept) == (8, 4)
    assert request.model == "sd15"
    assert request.seed == 1234
    assert (request.chaos, request.tile, request.stop_percent) == (0, False, 100)
    assert request.init_image is None and request.strength is None
    assert parsed.notes == ()


def test_other_settings_are_followed() -> None:
    settings = EngineSettings(
        default_steps=12,
        default_guidance=4.5,
        default_sampler=Sampler.EULER_A,
        num_candidates=4,
        num_kept=2,
    )
    request = parse_prompt("a fox", settings, seed_source=fixed_seed()).request
    assert (request.steps, request.guidance, request.sampler) == (12, 4.5, Sampler.EULER_A)
    assert (request.num_candidates, request.num_kept) == (4, 2)
    # The default settings only know the tiny model, built at 128x128.
    assert (request.model, request.width, request.height) == ("tiny", 128, 128)


def test_the_parser_stays_free_of_torch_and_diffusers() -> None:
    # The Discord front end imports it and must start in well under a second.
    code = (
        "import sys, generation.prompt; "
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --- seeds ----------------------------------------------------------------------------------------


def test_seed_source_is_used_only_when_no_seed_is_given() -> None:
    calls: list[int] = []

    def source() -> int:
        calls.append(1)
        return 42

    assert parse("a cat", seed_source=source).request.seed == 42
    assert len(calls) == 1
    assert parse("a cat --seed 7", seed_source=source).request.seed == 7
    assert parse("a cat", seed_source=source, options=ImagineOptions(seed=9)).request.seed == 9
    assert len(calls) == 1


def test_default_seeds_are_random_and_leave_room_for_every_candidate() -> None:
    seeds = {parse_prompt("a cat", SETTINGS).request.seed for _ in range(20)}
    assert len(seeds) > 15  # 20 draws from ~4e9 values: a collision would mean no randomness
    # Candidate i uses seed + i, which must stay a valid seed as well.
    assert all(0 <= seed and seed + 15 <= MAX_SEED for seed in seeds)


@pytest.mark.parametrize("seed", [0, 1, 123456789, MAX_SEED])
def test_seed_range_ends_are_accepted(seed: int) -> None:
    assert parse(f"a cat --seed {seed}").request.seed == seed


# --- honoured flags -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "field", "expected"),
    [
        ("a cat --seed 99", "seed", 99),
        ("a cat --seed 007", "seed", 7),
        ("a cat --steps 12", "steps", 12),
        ("a cat --steps 100", "steps", 100),  # settings.max_steps
        ("a cat --cfg 4.5", "guidance", 4.5),
        ("a cat --cfg 0", "guidance", 0.0),
        ("a cat --cfg 30", "guidance", 30.0),
        ("a cat --cfg .5", "guidance", 0.5),
        ("a cat --guidance 12", "guidance", 12.0),
        ("a cat --sampler ddim", "sampler", Sampler.DDIM),
        ("a cat --sampler euler", "sampler", Sampler.EULER),
        ("a cat --sampler euler_a", "sampler", Sampler.EULER_A),
        ("a cat --sampler euler-a", "sampler", Sampler.EULER_A),
        ("a cat --sampler Euler a", "sampler", Sampler.EULER_A),
        ("a cat --sampler dpmpp_2m_karras", "sampler", Sampler.DPMPP_2M_KARRAS),
        ("a cat --sampler DPM++ 2M Karras", "sampler", Sampler.DPMPP_2M_KARRAS),
        ("a cat --sampler dpmpp_2m", "sampler", Sampler.DPMPP_2M),
        ("a cat --sampler UniPC", "sampler", Sampler.UNIPC),
        ("a cat --model tiny", "model", "tiny"),
        ("a cat --model sdxl", "model", "sdxl"),
        ("a cat --no dogs", "negative_prompt", "dogs"),
        ("a cat --no dogs, birds, text", "negative_prompt", "dogs, birds, text"),
        ("a cat --no dogs, --ar 1:1", "negative_prompt", "dogs"),  # trailing comma dropped
        ("a cat --tile", "tile", True),
        ("a cat --chaos 40", "chaos", 40),
        ("a cat --c 100", "chaos", 100),
        ("a cat --c 0", "chaos", 0),
        ("a cat --c 1.5", "chaos", 2),  # corpus has it; rounded half up
        ("a cat --stop 50", "stop_percent", 50),
        ("a cat --stop 10", "stop_percent", 10),
        ("a cat --stop 100", "stop_percent", 100),
    ],
)
def test_flag_sets_its_field(text: str, field: str, expected: object) -> None:
    request = parse(text).request
    assert getattr(request, field) == expected
    assert request.prompt == "a cat"


@pytest.mark.parametrize(
    ("text", "width", "height"),
    [
        # Worked out in test_size_for_aspect_known_sizes (sd15: base 512).
        ("a cat --ar 1:1", 512, 512),
        ("a cat --ar 16:9", 704, 384),
        ("a cat --ar 9:16", 384, 704),
        ("a cat --ar 2:3", 384, 576),
        ("a cat --aspect 2:3", 384, 576),
        ("a cat --ar 4:6", 384, 576),  # same shape as 2:3
        ("a cat --ar 68:128", 384, 704),
        ("a cat --ar 1:4", 256, 1024),  # exact: 256 * 1024 == 512 * 512
        ("a cat --ar 4:1", 1024, 256),
        ("a cat --model tiny --ar 2:3", 128, 192),  # exact 2:3 on tiny's 64-pixel grid
    ],
)
def test_aspect_ratio_picks_the_size(text: str, width: int, height: int) -> None:
    request = parse(text).request
    assert (request.width, request.height) == (width, height)


@pytest.mark.parametrize("dash", ["--", "—", "–", "––", "—-", "−−", "－－"])
def test_phone_and_word_processor_dashes_start_flags(dash: str) -> None:
    parsed = parse(f"a cat {dash}ar 16:9 {dash}seed 5")
    assert (parsed.request.width, parsed.request.height, parsed.request.seed) == (704, 384, 5)
    assert parsed.request.prompt == "a cat"


def test_a_space_after_ascii_dashes_still_names_a_known_flag() -> None:
    # The corpus has "-- ar 51:81".
    parsed = parse("a cat, kitsch, -- ar 2:3")
    assert (parsed.request.width, parsed.request.height) == (384, 576)
    assert parsed.request.prompt == "a cat, kitsch"


@pytest.mark.parametrize(
    "text",
    [
        "history from 1970–present",
        "a well--known castle",
        "in the hair salon – flat view of the salon",
        "a castle — no people around",
        "a castle -- and nothing else",
        "Award - winning photo, -ar 3:2 is not a flag",
        "wide-angle, f/2.8, blink-and-you-miss-it detail",
    ],
)
def test_dashes_in_prose_stay_text(text: str) -> None:
    request = parse(text).request
    assert request.prompt == text
    assert request.negative_prompt == ""
    assert (request.width, request.height) == (512, 512)


def test_flag_glued_after_punctuation_is_a_flag() -> None:
    # Corpus: "…amidst the natural backdrop of the sea.--ar 4:5 --s 1000"
    request = parse("backdrop of the sea.--ar 4:5").request
    assert request.prompt == "backdrop of the sea."
    assert request.height > request.width


def test_flag_names_are_case_insensitive() -> None:
    request = parse("a cat --AR 16:9 --Seed 3 --NO dogs").request
    assert (request.width, request.seed, request.negative_prompt) == (704, 3, "dogs")


def test_full_width_digits_in_values_are_read() -> None:
    assert parse("a cat --ar １６：９ --seed ４２").request.seed == 42


def test_no_joins_the_negative_option() -> None:
    options = ImagineOptions(negative="blurry, lowres")
    request = parse("a cat --no dogs, text", options=options).request
    assert request.negative_prompt == "blurry, lowres, dogs, text"
    assert parse("a cat", options=options).request.negative_prompt == "blurry, lowres"


def test_text_after_a_one_word_flag_is_kept_as_prompt_text() -> None:
    # Corpus: "… --v 4 --q 2 --ar 9:16, SAI Pixel Art"
    parsed = parse("an alien --ar 9:16, SAI Pixel Art")
    assert parsed.request.prompt == "an alien, SAI Pixel Art"
    assert parsed.request.height > parsed.request.width
    assert any("SAI Pixel Art" in note and "--ar" in note for note in parsed.notes)


def test_flags_before_the_prompt_still_work() -> None:
    parsed = parse("--ar 3:2 a red fox in the snow")
    assert parsed.request.prompt == "a red fox in the snow"
    assert parsed.request.width > parsed.request.height


def test_switch_flag_does_not_swallow_following_words() -> None:
    parsed = parse("a pattern --tile of roses")
    assert parsed.request.tile
    assert parsed.request.prompt == "a pattern, of roses"


# --- mapped flags ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "steps"),
    [(".25", 8), ("0.25", 8), (".5", 15), ("1", 30), ("1.0", 30), ("2", 30), ("4", 30)],
)
def test_quality_scales_the_default_steps_down_only(value: str, steps: int) -> None:
    # default_steps 30: .25 → 7.5 rounds to 8 (round half to even); 2 and 4 keep 30.
    parsed = parse(f"a cat --q {value}")
    assert parsed.request.steps == steps
    assert any(note.startswith(f"--q {value} → {steps} steps") for note in parsed.notes)


def test_quality_long_name() -> None:
    assert parse("a cat --quality .5").request.steps == 15


@pytest.mark.parametrize("value", ["2", "4"])
def test_quality_above_one_keeps_the_default_steps_and_says_so(value: str) -> None:
    parsed = parse(f"a cat --q {value}")
    assert parsed.request.steps == SETTINGS.default_steps
    assert f"--q {value} → 30 steps, the default (more steps add no detail here)" in parsed.notes
    quality = next(spec for spec in FLAGS if spec.name == "quality")
    assert "2 and 4 all use the default steps" in quality.meaning


def test_explicit_steps_win_over_quality_with_a_note() -> None:
    parsed = parse("a cat --q 2 --steps 20")
    assert parsed.request.steps == 20
    assert any(note.startswith("--q 2 ignored") for note in parsed.notes)
    assert parse("a cat --q 2", options=ImagineOptions(steps=25)).request.steps == 25


def test_chaos_and_stop_leave_notes() -> None:
    notes = parse("a cat --chaos 50 --stop 60").notes
    assert any(note.startswith("--chaos 50") for note in notes)
    assert any(note.startswith("--stop 60") for note in notes)


# --- ignored flags --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("suffix", "codes"),
    [
        ("--p", ()),
        ("--personalize", ()),
        ("--p abc123", ("abc123",)),
        ("--profile XYZ9 --p abc123, xyz9", ("xyz9", "abc123")),
        ("--p --p k3x9", ("k3x9",)),
    ],
)
def test_personalize_takes_midjourneys_forms(suffix: str, codes: tuple[str, ...]) -> None:
    """--p alone is one's own taste; codes (several, in any case) name other members'."""
    parsed = parse(f"a cat {suffix}")
    assert parsed.personalize == codes
    assert parsed.request.prompt == "a cat" and parsed.notes == ()
    assert parse("a cat").personalize is None


@pytest.mark.parametrize(
    "suffix",
    [
        "--p a!b",
        "--p <@123>",
        "--p abc",
        "--p a b c d e f",
        # Repeating the flag adds its codes up: the cap holds over all of them.
        "--p aaaa bbbb cccc --p dddd eeee ffff",
    ],
)
def test_a_malformed_profile_code_is_refused_naming_it(suffix: str) -> None:
    with pytest.raises(PromptError, match=r"--p: .*(profile code|at most 5)"):
        parse(f"a cat {suffix}")


def test_version_note_reads_as_in_the_brief() -> None:
    parsed = parse("a cat --v 5.2")
    assert parsed.notes == ("--v 5.2 ignored (Midjourney model version)",)
    assert parsed.request.prompt == "a cat"


@pytest.mark.parametrize(
    "flag",
    [
        "--v 6",
        "--version 5.1",
        "--niji",
        "--niji 6",
        "--style raw",
        "--style 2EX4xsZkKozAxjh0ObRFrSE3D-7Lva4CUz6Tepj6SaF2kbCXtwoHrpaMa8Dfh0Z",
        "--raw",
        "--stylize 750",
        "--s 6000",
        "--weird 3000",
        "--w 250.5",
        "--exp 25",
        "--iw 2",  # with no image prompt
        "--iw 0.5",
        "--sref 1234",  # a Midjourney style code; links are references (test_references.py)
        "--sref random",
        "--sw 100",  # with no style reference
        "--sv 4",
        "--cw 0",
        "--ow 400",
        "--sameseed",
        "--sameseed 77",
        "--hd",
        "--test",
        "--testp",
        "--creative",
        "--uplight",
        "--upbeta",
        "--upanime",
        "--video",
        "--motion high",
        "--loop",
        "--end https://example.com/last.png",
        "--bs 2",
        "--zoom 1.5",
        "--beta",
        "--vibe",
        "--wallpaper",
        "--stealth",
        "--public",
        "--h 1792",
    ],
)
def test_midjourney_only_parameters_are_ignored_with_a_note(flag: str) -> None:
    parsed = parse(f"a cat {flag}")
    name = flag.split()[0]
    assert parsed.request.prompt == "a cat"
    assert len(parsed.notes) == 1
    # A value Markdown could act on (a link) is shown in a code span.
    assert parsed.notes[0].lstrip("`").startswith(name + " ") and "ignored" in parsed.notes[0]
    default = parse("a cat").request
    assert parsed.request == default  # nothing about the job changed


def test_long_ignored_values_are_cut_short_in_the_note() -> None:
    note = parse("a cat --style " + "x" * 200).notes[0]
    assert len(note) < 80 and "…" in note


def test_optional_value_flag_leaves_following_words_in_the_prompt() -> None:
    parsed = parse("a cat --niji cute style")
    assert parsed.request.prompt == "a cat, cute style"


def test_flag_table_is_consistent() -> None:
    names = [name for spec in FLAGS for name in spec.names]
    assert len(names) == len(set(names))
    assert all(name.isalpha() and name.islower() for name in names)
    for spec in FLAGS:
        if spec.arity is not Arity.NONE and spec.name != "steps":
            assert spec.check is not None, spec.name
    honoured = {spec.name for spec in FLAGS if spec.treatment is Treatment.HONOURED}
    assert honoured == {
        *("ar", "seed", "no", "steps", "cfg", "sampler", "model", "repeat"),
        *("lora", "cn", "cnw"),
        *("fast", "relax", "turbo"),
        "personalize",
    }
    mapped = {spec.name for spec in FLAGS if spec.treatment is Treatment.MAPPED}
    assert mapped == {"quality", "chaos", "tile", "stop", "h", "draft"} | {
        *("iw", "sref", "sw", "oref", "ow", "cref", "cw")
    }


# --- unknown and duplicate flags ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "flag"),
    [
        # Not at the end: a flag-like word followed by prompt text.
        ("a cat --foo bar baz", "--foo"),
        ("a --sparkly cat in the snow --ar 3:2", "--sparkly"),
        ("a cat —foo in a hat", "--foo"),
        # Other tools' flags, typos of known ones, glued values: refused wherever they are.
        ("a cat --negative dogs", "--negative"),
        ("a cat --width 512", "--width"),
        ("a cat --upscale", "--upscale"),
        ("a cat --ar 3:2 --stylise 100", "--stylise"),
        ("a cat --ar16:9", "--ar16:9"),
    ],
)
def test_unknown_flags_are_named(text: str, flag: str) -> None:
    error = parse_error(text)
    assert error.flag == flag
    assert str(error).startswith(f"{flag}: unknown flag")


def test_glued_value_gets_a_suggestion() -> None:
    assert "did you mean '--ar 16:9'" in str(parse_error("a cat --ar16:9"))
    assert "did you mean '--v 6'" in str(parse_error("a cat --v6"))


@pytest.mark.parametrize(
    ("text", "flag"),
    [
        ("a cat --ar 3:2 --ar 2:3", "--ar"),
        ("a cat --ar 3:2 --aspect 2:3", "--aspect"),
        ("a cat --seed 1 --seed 2", "--seed"),
        ("a cat --no dogs --no birds", "--no"),
        ("a cat --cfg 5 --guidance 6", "--guidance"),
        ("a cat --r 2 --repeat 3", "--repeat"),
        ("a cat --stop 50 --stop 60", "--stop"),
        ("a cat --q 2 --quality .5", "--quality"),
        ("a cat --c 5 --chaos 6", "--chaos"),
        ("a cat --sampler ddim --sampler euler", "--sampler"),
    ],
)
def test_a_flag_given_twice_with_different_values_is_an_error(text: str, flag: str) -> None:
    error = parse_error(text)
    assert error.flag == flag
    assert "given twice" in str(error)


@pytest.mark.parametrize(
    "text",
    [
        "a cat --v 5.1 --style raw --v 5.1",  # corpus
        "a cat --ar 3:2 --aspect 6:4",
        "a cat --tile --tile",
        "a cat --seed 5 --seed 005",
        "a cat --sampler euler-a --sampler Euler a",
    ],
)
def test_a_flag_repeated_with_the_same_value_is_harmless(text: str) -> None:
    parsed = parse(text)
    assert parsed.request.prompt == "a cat"
    assert len([n for n in parsed.notes if n.startswith("--v")]) <= 1


# --- bad values -----------------------------------------------------------------------------------
# Each row: the flag, a bad value (None: missing), and a word its message must contain to say
# what is accepted.

_NUMERIC_GARBAGE = ["abc", "nan", "NaN", "inf", "-inf", "1e3", "0x10", "1_0", "٣", "", "½"]

BAD_VALUES: list[tuple[str, str | None, str]] = [
    *[("--ar", v, "W:H") for v in [None, "0:1", "1:0", "0:0", "16x9", "123456:1"]],
    *[("--ar", v, "W:H") for v in ["16/9", "1.5:1", "-16:9", "16:-9", "16:9:1", "abc", "1:"]],
    *[("--ar", v, "W:H") for v in ["99999999999:1", ":", "16 :9"]],
    *[("--aspect", v, "W:H") for v in [None, "4:a"]],
    *[("--seed", v, "4294967295") for v in [None, "-1", "4294967296", "1.5", "1" * 5000]],
    *[("--seed", v, "4294967295") for v in _NUMERIC_GARBAGE],
    *[("--steps", v, "between 1 and 100") for v in [None, "0", "-5", "101", "1000000", "2.5"]],
    *[("--steps", v, "between 1 and 100") for v in _NUMERIC_GARBAGE],
    *[("--cfg", v, "between 0 and 30") for v in [None, "-1", "30.5", "1000", "1e400", "9" * 400]],
    *[("--cfg", v, "between 0 and 30") for v in _NUMERIC_GARBAGE],
    *[("--guidance", v, "between 0 and 30") for v in [None, "31", "-0.1"]],
    *[("--sampler", v, "dpmpp_2m_karras") for v in [None, "k_lms", "euler_b", "'; DROP--"]],
    *[
        ("--model", v, "configured model (sd15, tiny, sdxl)")
        for v in [None, "sd99", "../etc/passwd"]
    ],
    *[("--no", v, "expected") for v in [None]],
    *[("--q", v, ".25, .5, 1, 2, 4") for v in [None, "3", "0", "-1", "0.3", "100", "high"]],
    *[("--quality", v, ".25, .5, 1, 2, 4") for v in ["nan", "inf", "8"]],
    *[("--chaos", v, "between 0 and 100") for v in [None, "-1", "101", "1e2", "lots"]],
    *[("--c", v, "between 0 and 100") for v in ["nan", "100.5", "-0.5"]],
    *[("--stop", v, "between 10 and 100") for v in [None, "9", "0", "101", "50.5", "nan"]],
    *[("--v", v, "version") for v in [None, "abc", "0", "11", "-5", "nan", "5.2.1"]],
    *[("--version", v, "version") for v in [None, "latest"]],
    *[("--s", v, "between 0 and 60000") for v in [None, "-1", "60001", "lots", "inf"]],
    *[("--stylize", v, "between 0 and 60000") for v in [None, "1e9"]],
    *[("--w", v, "between 0 and 3000") for v in [None, "3001", "-3", "weird"]],
    *[("--weird", v, "between 0 and 3000") for v in ["nan"]],
    *[("--iw", v, "between 0 and 3") for v in [None, "4", "-1", "two"]],
    *[("--sw", v, "between 0 and 1000") for v in [None, "1001"]],
    *[("--cw", v, "between 0 and 100") for v in [None, "101"]],
    *[("--ow", v, "between 1 and 1000") for v in [None, "0"]],
    *[("--exp", v, "between 0 and 100") for v in [None, "101"]],
    *[("--sv", v, "version") for v in [None, "x"]],
    *[("--r", v, "between 1 and 40") for v in [None, "0", "41", "2.5"]],
    *[("--repeat", v, "between 1 and 40") for v in ["-4"]],
    *[("--style", v, "expected") for v in [None]],
    *[("--sref", v, "expected") for v in [None]],
    *[("--cref", v, "expected") for v in [None]],
    *[("--motion", v, "low, high") for v in [None, "fast"]],
    *[("--bs", v, "1, 2, 4") for v in [None, "3"]],
    *[("--sameseed", v, "4294967295") for v in ["-1", "99999999999", "1.5"]],
    *[("--zoom", v, "between 1 and 2") for v in [None, "0.5", "3", "far"]],
    *[("--h", v, "between 1 and 10000") for v in [None, "0", "10001", "1792.5", "tall"]],
]


@pytest.mark.parametrize(("flag", "value", "accepted"), BAD_VALUES)
def test_bad_values_name_the_flag_and_what_is_accepted(
    flag: str, value: str | None, accepted: str
) -> None:
    # A missing value is tested both at the end and followed by another flag.
    texts = (
        [f"a cat {flag}", f"a cat {flag} --tile"] if value is None else [f"a cat {flag} {value}"]
    )
    for text in texts:
        error = parse_error(text)
        assert error.flag == flag, text
        message = str(error)
        assert message.startswith(f"{flag}: "), message
        assert accepted in message, message
        assert len(message) < 400, "a long user value must be cut short in the message"
        if value is None:
            assert "got nothing" in message or "expected" in message


def test_the_brief_s_aspect_message() -> None:
    # The /imagine option declares its range; an inline --ar beyond it is clamped instead.
    assert str(parse_error("a cat", options=ImagineOptions(aspect="1000:1"))) == (
        "aspect: expected W:H with whole numbers between 1:4 and 4:1, got '1000:1'"
    )


def test_steps_limit_follows_the_settings() -> None:
    settings = EngineSettings(max_steps=40)
    with pytest.raises(PromptError, match="between 1 and 40"):
        parse_prompt("a cat --steps 41", settings)
    assert parse_prompt("a cat --steps 40", settings).request.steps == 40


def test_sampler_error_lists_every_accepted_name() -> None:
    message = str(parse_error("a cat --sampler k_lms"))
    for sampler in Sampler:
        assert sampler.value in message


# The names AUTOMATIC1111 writes into PNG metadata and shared prompts, most common first.
A1111_SAMPLERS = {
    "DPM++ 2M Karras": Sampler.DPMPP_2M_KARRAS,
    "Euler a": Sampler.EULER_A,
    "DPM++ SDE Karras": Sampler.DPMPP_SDE_KARRAS,
    "DPM++ 2M SDE Karras": Sampler.DPMPP_2M_SDE_KARRAS,
    "Euler": Sampler.EULER,
    "DDIM": Sampler.DDIM,
    "DPM++ 2M": Sampler.DPMPP_2M,
    "DPM++ 2M SDE": Sampler.DPMPP_2M_SDE,
    "DPM++ SDE": Sampler.DPMPP_SDE,
    "UniPC": Sampler.UNIPC,
    "Heun": Sampler.HEUN,
    "LMS": Sampler.LMS,
    "LMS Karras": Sampler.LMS_KARRAS,
    "DPM2": Sampler.DPM2,
    "DPM2 Karras": Sampler.DPM2_KARRAS,
    "DPM2 a": Sampler.DPM2_A,
    "DPM2 a Karras": Sampler.DPM2_A_KARRAS,
}


@pytest.mark.parametrize(("name", "sampler"), A1111_SAMPLERS.items())
def test_a1111_sampler_names_are_accepted_as_flag_and_option(name: str, sampler: Sampler) -> None:
    assert parse(f"a cat --sampler {name}").request.sampler is sampler
    assert parse("a cat", options=ImagineOptions(sampler=name)).request.sampler is sampler
    assert parse(f"a cat --sampler {sampler.value}").request.sampler is sampler
    assert sampler.a1111_name == name


@pytest.mark.parametrize(
    ("name", "sampler"),
    [
        ("euler_ancestral", Sampler.EULER_A),
        ("dpm_2_ancestral", Sampler.DPM2_A),
        ("uni_pc", Sampler.UNIPC),
        ("dpm++ 2m sde karras", Sampler.DPMPP_2M_SDE_KARRAS),
        ("DPM++-2M-SDE-Karras", Sampler.DPMPP_2M_SDE_KARRAS),
    ],
)
def test_other_common_sampler_spellings(name: str, sampler: Sampler) -> None:
    assert Sampler.parse(name) is sampler


def test_ddpm_is_offered_and_its_step_count_caveat_is_noted() -> None:
    parsed = parse("a cat --sampler ddpm --steps 30")
    assert parsed.request.sampler is Sampler.DDPM
    assert any("DDPM needs about" in note and "at 30" in note for note in parsed.notes)
    assert not any("DDPM" in note for note in parse("a cat --sampler ddim --steps 30").notes)


@pytest.mark.parametrize("name", ["DPM++ 2S a Karras", "DPM fast", "Restart"])
def test_samplers_without_a_diffusers_equivalent_are_refused_with_the_list(name: str) -> None:
    message = str(parse_error(f"a cat --sampler {name}"))
    assert message.startswith("--sampler: expected a sampler")
    assert "DPM++ 2M SDE Karras" in message and "Euler a" in message
    with pytest.raises(
        ValueError, match=r"^sampler: unknown sampler .*accepted: DDIM, DDPM, Euler"
    ):
        Sampler.parse(name)


# --- options and conflicts ------------------------------------------------------------------------


def test_options_alone_set_the_request() -> None:
    options = ImagineOptions(
        negative="blurry", aspect="3:2", seed=11, steps=20, guidance=5.5, sampler="euler_a"
    )
    request = parse("a cat", options=options).request
    assert request.negative_prompt == "blurry"
    assert (request.width, request.height) == (576, 384)  # see test_size_for_aspect_known_sizes
    assert (request.seed, request.steps, request.guidance) == (11, 20, 5.5)
    assert request.sampler is Sampler.EULER_A


@pytest.mark.parametrize(
    ("text", "options", "flag"),
    [
        ("a cat --ar 16:9", ImagineOptions(aspect="3:2"), "--ar"),
        ("a cat --aspect 16:9", ImagineOptions(aspect="3:2"), "--aspect"),
        ("a cat --seed 1", ImagineOptions(seed=2), "--seed"),
        ("a cat --steps 10", ImagineOptions(steps=20), "--steps"),
        ("a cat --cfg 5", ImagineOptions(guidance=6.0), "--cfg"),
        ("a cat --guidance 5", ImagineOptions(guidance=6.0), "--guidance"),
        ("a cat --sampler ddim", ImagineOptions(sampler="euler"), "--sampler"),
    ],
)
def test_option_and_flag_that_disagree_are_a_conflict(
    text: str, options: ImagineOptions, flag: str
) -> None:
    error = parse_error(text, options=options)
    assert error.flag == flag
    assert "conflicts with" in str(error)


@pytest.mark.parametrize(
    ("text", "options"),
    [
        ("a cat --ar 3:2", ImagineOptions(aspect="3:2")),
        ("a cat --ar 6:4", ImagineOptions(aspect="3:2")),
        ("a cat --seed 2", ImagineOptions(seed=2)),
        ("a cat --steps 20", ImagineOptions(steps=20)),
        ("a cat --cfg 6", ImagineOptions(guidance=6.0)),
        ("a cat --sampler euler-a", ImagineOptions(sampler="euler_a")),
    ],
)
def test_option_and_flag_that_agree_are_fine(text: str, options: ImagineOptions) -> None:
    assert parse(text, options=options).request.prompt == "a cat"


def test_model_argument_and_model_flag() -> None:
    assert parse("a cat", model="tiny").request.model == "tiny"
    assert parse("a cat --model tiny", model="tiny").request.model == "tiny"
    error = parse_error("a cat --model sdxl", model="tiny")
    assert error.flag == "--model" and "conflicts with" in str(error)
    error = parse_error("a cat", model="nope")
    assert error.flag == "model" and "(sd15, tiny, sdxl)" in str(error)


@pytest.mark.parametrize(
    ("options", "name"),
    [
        (ImagineOptions(aspect="10:1"), "aspect"),
        (ImagineOptions(aspect="wide"), "aspect"),
        (ImagineOptions(seed=-1), "seed"),
        (ImagineOptions(seed=MAX_SEED + 1), "seed"),
        (ImagineOptions(steps=0), "steps"),
        (ImagineOptions(steps=101), "steps"),
        (ImagineOptions(guidance=-0.5), "guidance"),
        (ImagineOptions(guidance=math.nan), "guidance"),
        (ImagineOptions(guidance=math.inf), "guidance"),
        (ImagineOptions(sampler="k_lms"), "sampler"),
        (ImagineOptions(negative="x" * (MAX_PROMPT_CHARS + 1)), "negative"),
    ],
)
def test_bad_option_values_name_the_option(options: ImagineOptions, name: str) -> None:
    error = parse_error("a cat", options=options)
    assert error.flag == name
    assert str(error).startswith(f"{name}: ")


# --- :: multi-prompt weights ----------------------------------------------------------------------


def test_weights_from_the_brief() -> None:
    request = parse("a castle::2 fog::-0.5 a stormy sea").request
    assert request.prompt_parts == (
        PromptPart("a castle", 2.0),
        PromptPart("fog", -0.5),
        PromptPart("a stormy sea", 1.0),
    )
    # CLIP ranks against what should be in the picture, so the negative part is left out.
    assert request.prompt == "a castle, a stormy sea"


@pytest.mark.parametrize(
    ("text", "parts"),
    [
        ("hot:: dog", [("hot", 1.0), ("dog", 1.0)]),
        ("hot::2 dog", [("hot", 2.0), ("dog", 1.0)]),
        ("space::.5 ship::1.5", [("space", 0.5), ("ship", 1.5)]),
        ("space:: ship::", [("space", 1.0), ("ship", 1.0)]),  # trailing :: weighs 1
        ("frostpunk::, a spaceship::", [("frostpunk", 1.0), ("a spaceship", 1.0)]),
        ("background::2, 3ds max", [("background", 2.0), ("3ds max", 1.0)]),
        ("crystal::2 eyes::planet", [("crystal", 2.0), ("eyes", 1.0), ("planet", 1.0)]),
        # A number glued to letters is text, not a weight.
        ("a robot::3d render", [("a robot", 1.0), ("3d render", 1.0)]),
        ("tea:: 2 cups", [("tea", 1.0), ("2 cups", 1.0)]),
        ("sun::+2 moon", [("sun", 2.0), ("moon", 1.0)]),
        ("sun::2. moon", [("sun", 2.0), ("moon", 1.0)]),
        ("sun::0 moon", [("sun", 0.0), ("moon", 1.0)]),
    ],
)
def test_weight_syntax(text: str, parts: list[tuple[str, float]]) -> None:
    assert parse(text).request.prompt_parts == tuple(PromptPart(t, w) for t, w in parts)


@pytest.mark.parametrize("text", ["a castle::2", "a castle::", "a castle::1 --v 5"])
def test_a_single_weighted_part_is_a_plain_prompt(text: str) -> None:
    # Weights are relative, so one part alone has nothing to be weighed against.
    request = parse(text).request
    assert request.prompt == "a castle"
    assert request.prompt_parts == ()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("fog::-1", "add up to more than 0"),
        ("fog::0", "add up to more than 0"),
        ("a castle::1 fog::-1", "add up to more than 0"),
        ("a castle::-2 fog::1", "add up to more than 0"),
        ("::2 a castle", "needs text before it"),
        ("a castle:: ::3", "needs text before it"),
        ("a castle::101 fog", "between -100 and 100"),
        ("a castle::1 fog::-1000", "between -100 and 100"),
        ("a castle::" + "9" * 400 + " fog", "between -100 and 100"),
        (
            "::".join(f"p{i}" for i in range(MAX_PROMPT_PARTS + 1)),
            f"at most {MAX_PROMPT_PARTS} parts",
        ),
    ],
)
def test_bad_weights(text: str, message: str) -> None:
    error = parse_error(text)
    assert error.flag == "::"
    assert message in str(error)


def test_as_many_parts_as_allowed() -> None:
    text = "::".join(f"p{i}" for i in range(MAX_PROMPT_PARTS))
    assert len(parse(text).request.prompt_parts) == MAX_PROMPT_PARTS


def test_flags_after_weights_are_still_flags() -> None:
    request = parse("a dress, clean background::2, V-ray --ar 2:3 --no mannequin").request
    assert request.prompt_parts == (
        PromptPart("a dress, clean background", 2.0),
        PromptPart("V-ray"),
    )
    assert request.negative_prompt == "mannequin"
    assert (request.width, request.height) == (384, 576)


# --- text clean-up --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "prompt"),
    [
        ("/imagine prompt: a cat", "a cat"),
        ("/imagine prompt:a cat --ar 1:1", "a cat"),
        ("/IMAGINE a cat", "a cat"),
        ("a cat,", "a cat"),
        ("a cat, , ,", "a cat"),
        (", a cat", "a cat"),
        ("a cat, --v 5", "a cat"),
        ("a\tcat\n\nin a hat", "a cat in a hat"),
        ("a   cat", "a cat"),
        ("a\x00 cat\x1b[31m", "a cat[31m"),
        ("a c\u200bat", "a cat"),  # zero-width space
        ("a \u202ecat", "a cat"),  # right-to-left override
        ("a\u00a0cat\u3000hat", "a cat hat"),  # no-break and ideographic spaces
        ("a cat \ud800", "a cat"),  # a lone surrogate cannot be stored as UTF-8
        ("a cat 🐱 🜁", "a cat 🐱 🜁"),
        ("שלום cat", "שלום cat"),
        ("<@123> @everyone **bold** `code`", "<@123> @everyone **bold** `code`"),
        ("'; DROP TABLE jobs; --", "'; DROP TABLE jobs; --"),
    ],
)
def test_text_clean_up(text: str, prompt: str) -> None:
    assert parse(text).request.prompt == prompt


@pytest.mark.parametrize(
    "text",
    [
        "https://example.com/cat.png a cat in a hat",
        "<https://example.com/cat.png> a cat in a hat",
        "https://s. mj. run/qEPRlfloqJU a cat in a hat",  # as the corpus has it
        "a cat in a hat http://example.com/ref.jpg",
    ],
)
def test_image_prompt_links_are_taken_out_of_the_prompt(text: str) -> None:
    parsed = parse(text)
    assert parsed.request.prompt == "a cat in a hat"
    if text.startswith(("http", "<")):
        # At the start: an image prompt, fetched by the bot (generation.references).
        (ref,) = parsed.image_refs
        assert ref.source.startswith("https://") and " " not in ref.source
        assert not parsed.notes
    else:
        assert not parsed.image_refs
        assert any("image prompts go at the start" in note for note in parsed.notes)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "\n\t",
        "\u200b\u200b",
        ",,,",
        "--ar 3:2",
        "--ar 3:2 --v 6",
        "/imagine prompt:",
        "/imagine prompt: --seed 3",
        ":: ::",
    ],
)
def test_nothing_left_to_draw_is_an_error(text: str) -> None:
    error = parse_error(text)
    assert error.flag == "prompt"
    assert "nothing to draw" in str(error)


def test_prompt_length_limit() -> None:
    limit_text = "a" * MAX_PROMPT_CHARS
    assert parse(limit_text + " --v 6").request.prompt == limit_text
    error = parse_error("a" * (MAX_PROMPT_CHARS + 1))
    assert error.flag == "prompt" and str(MAX_PROMPT_CHARS) in str(error)


def test_input_length_limit_comes_first() -> None:
    error = parse_error("a" * (MAX_INPUT_CHARS + 1) + " --bogus")
    assert error.flag == "prompt" and str(MAX_INPUT_CHARS) in str(error)


def test_negative_length_limit() -> None:
    error = parse_error("a cat --no " + "x" * (MAX_PROMPT_CHARS + 1))
    assert error.flag == "--no"


# --- size_for_aspect ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("w", "h", "base", "size"),
    [
        (1, 1, 512, (512, 512)),
        (1, 1, 128, (128, 128)),
        # 16:9 of 512² would be 682.7x384. 704x384 (1.83, 3% off, area +3%) beats 640x384
        # (1.67, 6% off) and 768x448 (1.71, but 31% more area).
        (16, 9, 512, (704, 384)),
        # At base 128 the grid is coarse: 192x128 (1.5, area 1.5x) beats 128x64 and 256x128
        # (2.0, area 0.5x / 2x).
        (16, 9, 128, (192, 128)),
        (9, 16, 128, (128, 192)),
        # 2:3 exactly: 384x576 (area 0.84x) beats 448x640 (0.7, area 1.09x).
        (2, 3, 512, (384, 576)),
        (2, 3, 128, (128, 192)),
        # 68:128 = 0.531: 384x704 = 0.545 with area 1.03x.
        (68, 128, 512, (384, 704)),
        # 64x128 and 128x256 both have ratio 0.5, with half and double the area: a tie that
        # goes to the smaller image.
        (68, 128, 128, (64, 128)),
        # 3:2 is 2:3 turned sideways.
        (3, 2, 512, (576, 384)),
        (1, 4, 512, (256, 1024)),
        (16, 9, 1024, (1344, 768)),  # the size SDXL was trained at for this shape
    ],
)
def test_size_for_aspect_known_sizes(w: int, h: int, base: int, size: tuple[int, int]) -> None:
    assert size_for_aspect(w, h, base, 1024 * 1024) == size


RATIOS = [(w, h) for w in range(1, 17) for h in range(1, 17) if 1 / 4 <= w / h <= 4]


@pytest.mark.parametrize("base", [128, 512, 768, 1024])
@pytest.mark.parametrize("budget", [128 * 128, 512 * 512, 1024 * 1024, 2048 * 2048])
def test_size_for_aspect_properties(base: int, budget: int) -> None:
    for w, h in RATIOS:
        width, height = size_for_aspect(w, h, base, budget)
        assert width % 64 == 0 and height % 64 == 0
        assert width >= 64 and height >= 64
        assert width * height <= budget
        # The same shape turned sideways gives the same size turned sideways.
        assert size_for_aspect(h, w, base, budget) == (height, width)
        target = min(base * base, budget)
        shape_error = abs(math.log(width / height / (w / h)))
        area = width * height / target
        if target >= 512 * 512 and budget > target:
            # A grid fine enough for the shape to be close and the area near the target.
            assert shape_error < math.log(1.1), (w, h, width, height)
            assert 0.75 <= area <= 1.35, (w, h, width, height)
        elif target >= 512 * 512:
            # The budget binds: nothing may go over it, so the shape has less room (3:8 in
            # 512x512 worth of pixels is 320x768 at best, 11 % off; 336x896 would not fit).
            assert shape_error < math.log(1.2), (w, h, width, height)
            assert 0.7 <= area <= 1.0, (w, h, width, height)


def test_size_for_aspect_respects_a_budget_below_the_base() -> None:
    # An SDXL model on a server that allows only 512x512 worth of pixels.
    assert size_for_aspect(1, 1, 1024, 512 * 512) == (512, 512)
    width, height = size_for_aspect(16, 9, 1024, 512 * 512)
    assert width * height <= 512 * 512 and width > height


def test_size_for_aspect_rejects_impossible_inputs() -> None:
    with pytest.raises(ValueError):
        size_for_aspect(0, 1, 512, 1024 * 1024)
    with pytest.raises(ValueError):
        size_for_aspect(1, 1, 512, 63 * 63)
    with pytest.raises(ValueError):
        size_for_aspect(1, 1, 32, 1024 * 1024)


def test_parsed_size_uses_the_settings_budget() -> None:
    settings = EngineSettings(
        models=(ModelSpec(name="sdxl", source="x", base_resolution=1024),),
        default_model="sdxl",
        max_pixels=512 * 512,
    )
    request = parse_prompt("a cat --ar 16:9", settings).request
    assert request.width * request.height <= 512 * 512


# --- hostile input: nothing but a PromptError or a valid request ----------------------------------

HOSTILE = [
    "a" * 10_000,
    "🐱" * 3000,
    "\u202e" * 100 + "a cat",
    "a cat " + "--v 6 " * 200,
    "a cat " + "--" * 500,
    "a cat --",
    "a cat ---",
    "a cat — ",
    "a cat --- ar 3:2",
    "a cat -- --ar 3:2",
    "a cat --ar",
    "a cat --ar --ar",
    "a cat --no --no",
    "a cat --no ::",
    "::::::",
    ":::2",
    "a::b::c::d",
    "a cat ::-0",
    "```\na cat\n```",
    "<@&123456> <#1> @here",
    "a cat\r\n--ar 3:2",
    "a cat --seed " + "9" * 10_000,
    "a cat --ar " + "9" * 5000 + ":1",
    "a cat --cfg 1" + "0" * 400,
    "a cat --sampler " + "x" * 5000,
    "/imagine",
    "/imagine prompt: /imagine prompt: a cat",
    "a cat\x00--ar 3:2",
    "ａ ｃａｔ －－ａｒ ３：２",
    "a cat --ar 3:2\u200b",
    "a cat --\u200bar 3:2",
    "a cat\u2028--seed 4",
]


@pytest.mark.parametrize("text", HOSTILE)
def test_hostile_input_gets_an_error_or_a_valid_request(text: str) -> None:
    try:
        parsed = parse(text)
    except PromptError as error:
        assert error.flag and str(error)
        assert len(str(error)) < 600
        return
    request = parsed.request
    request.validate()
    assert request.prompt.strip()
    assert request.width % 64 == 0 and request.height % 64 == 0
    assert all(len(note) < 200 for note in parsed.notes)
