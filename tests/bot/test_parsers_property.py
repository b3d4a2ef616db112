"""Property tests: random and adversarial text fed to every parser of member input. Whatever
comes in, only the parser's own error type (written for the member) may come out: the prompt
parser's PromptError, the permutation expander's PermutationError, a custom_id parser's
CustomIdError (and /prefer shortcuts' PromptError, tests/core/test_shortcut_expansion.py).
Anything else (RecursionError, OverflowError, IndexError …) is a crash a member could trigger
at will."""

from __future__ import annotations

from pathlib import Path

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from bot.app.actions import Action
from bot.discord.views.buttons import (
    CustomIdError,
    UiAction,
    job_in_custom_id,
    parse_job_button,
    parse_ui_button,
)
from bot.discord.views.buttons import custom_id as job_custom_id
from bot.discord.views.describe import DescribeAction, parse_describe_button
from bot.discord.views.describe import custom_id as describe_custom_id
from bot.discord.views.forms import parse_form_id
from generation.flags import FLAGS
from generation.permutations import PermutationError, count_permutations, expand_permutations
from generation.prompt import MAX_INPUT_CHARS, ImagineOptions, PromptError, parse_jobs
from generation.settings import EngineSettings, ModelSpec

SETTINGS = EngineSettings(
    models=(ModelSpec("tiny", "tiny", 128),), cache_dir=Path("unused"), default_steps=4
)
FAST = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None
)

# Pieces a hostile prompt is made of: every flag, values of every shape, the permutation and
# weight syntax, escapes, links, mentions, markdown and odd Unicode.
_FLAG_WORDS = [f"--{spec.name}" for spec in FLAGS] + ["—ar", "--", "---", "-ar", "--x"]
_VALUES = [
    "0",
    "-1",
    "1.5",
    "3:2",
    "0:0",
    "1e400",
    "nan",
    "inf",
    "99999999999999999999",
    "9" * 400,
    "-0",
    "1:1:1",
    "a:b",
    "::",
    "::-1",
    "::1e999",
]
_SYNTAX = ["{", "}", ",", "\\", "\\{", "\\}", "\\,", "::", " ", "\n", "'", '"', "<", ">", "|"]
_ODD = [
    "https://cdn.discordapp.com/a.png",
    "<https://cdn.discordapp.com/b.png>",
    "http://127.0.0.1/x",
    "@everyone",
    "<@123>",
    "`",
    "```",
    "[a](https://e.x)",
    "\x00",
    "\u202e",
    "\u200b",
    "\ufeff",
    "🦊",
    "ｆｕｌｌ",
    "/imagine prompt:",
]
TOKENS = st.sampled_from(_FLAG_WORDS + _VALUES + _SYNTAX + _ODD + ["a", "cat", "red"])
ADVERSARIAL = st.lists(TOKENS, max_size=60).map(" ".join) | st.lists(TOKENS, max_size=60).map(
    "".join
)
RANDOM = st.text(max_size=300)
ANY_TEXT = ADVERSARIAL | RANDOM


def _nested(depth: int) -> str:
    return "{" * depth + "a, b" + "}" * depth


@FAST
@given(ANY_TEXT)
@example(_nested(5000))
@example("{" * 400)
@example("}" * 400)
@example("{a,b}" * 30)
@example("{" + ",".join("x" * 40) + "}")
def test_the_permutation_expander_raises_only_its_own_error(text: str) -> None:
    try:
        prompts = expand_permutations(text)
    except PermutationError as exc:
        assert str(exc).startswith("{}: ")
        return
    assert 1 <= len(prompts) <= 40
    assert count_permutations(text) == len(prompts)


def test_deep_nesting_is_refused_by_name_not_by_the_stack() -> None:
    # (Outside hypothesis, which raises the recursion limit while it runs a test.)
    for depth in (9, 400, 2900, 5000):
        try:
            expand_permutations(_nested(depth))
        except PermutationError as exc:
            assert "more than 8 deep" in str(exc)
        else:
            raise AssertionError(f"{depth} levels accepted")
        if len(_nested(depth)) > MAX_INPUT_CHARS:
            continue  # the parser refuses the length first
        try:
            parse_jobs("a " + _nested(depth), SETTINGS)
        except PromptError as exc:
            assert "more than 8 deep" in str(exc)
        else:
            raise AssertionError(f"{depth} levels accepted")
    assert sorted(expand_permutations("a " + _nested(8))) == ["a a", "a b"]


@FAST
@given(ANY_TEXT, st.sampled_from([None, "tiny", "nope", "", "../x"]))
@example(_nested(5000), None)
@example("a " + _nested(2900), None)
@example("a " + _nested(9), None)
@example("a cat --seed 99999999999999999999999", None)
@example("a cat --ar 99999999999999999999:1", None)
@example("a::1e309 b::1", None)
@example("x" * (MAX_INPUT_CHARS + 1), None)
def test_the_prompt_parser_raises_only_its_own_error(text: str, model: str | None) -> None:
    try:
        jobs = parse_jobs(text, SETTINGS, model=model or None, seed_source=lambda: 7)
    except PromptError as exc:
        assert 0 < len(str(exc)) <= 2000
        return
    assert jobs
    for job in jobs:
        request = job.request
        assert request.width * request.height <= SETTINGS.max_pixels
        assert 1 <= request.steps <= SETTINGS.max_steps


@FAST
@given(
    ANY_TEXT,
    st.one_of(st.none(), st.text(max_size=30)),
    st.one_of(st.none(), st.integers(min_value=-(2**70), max_value=2**70)),
    st.one_of(st.none(), st.integers(min_value=-(10**6), max_value=10**6)),
    st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True)),
    st.one_of(st.none(), st.text(max_size=30)),
)
def test_the_slash_options_raise_only_the_parsers_error(
    text: str,
    aspect: str | None,
    seed: int | None,
    steps: int | None,
    guidance: float | None,
    lora: str | None,
) -> None:
    options = ImagineOptions(
        negative=text[:50] or None,
        aspect=aspect,
        seed=seed,
        steps=steps,
        guidance=guidance,
        sampler=aspect,
        lora=lora,
    )
    try:
        parse_jobs("a cat " + text, SETTINGS, options=options, seed_source=lambda: 7)
    except PromptError:
        pass


# ----- custom_ids --------------------------------------------------------------------------------

_ID_PIECES = st.sampled_from(
    [
        "imagine:",
        "imagine-ui:",
        "imagine-form:",
        "describe:",
        "settings:",
        "RX-",
        *(action.value for action in Action),
        *(what.value for what in UiAction),
        "I",
        "R",
        ":",
        "0",
        "1",
        "9",
        "9999999999999999999",
        "99999999999999999999",
        "18446744073709551616",
        "-1",
        "٣",  # a digit, but not an ASCII one
        "\n",
        "",
    ]
)
CUSTOM_IDS = st.lists(_ID_PIECES, max_size=8).map("".join) | st.text(max_size=120)
PARSERS = [
    parse_job_button,
    parse_ui_button,
    parse_describe_button,
    parse_form_id,
    job_in_custom_id,
]


@FAST
@given(CUSTOM_IDS)
@example("imagine:V:9999999999999999999:1")
@example("imagine-ui:VR:9999999999999999999:1")
@example("describe:I:9999999999999999999:1")
@example("imagine-form:RX-V:9999999999999999999:1")
@example("imagine-form:RX-ZZZZ:1:1")
@example("imagine:V:1:1\n")
def test_custom_id_parsers_raise_only_their_own_error(custom_id: str) -> None:
    for parse in PARSERS:
        try:
            parsed = parse(custom_id)
        except CustomIdError:
            continue
        values = parsed if isinstance(parsed, tuple) else (parsed,)
        # A parsed job id is a plain non-negative int: the app refuses one past SQLite's range
        # itself (tests/bot/test_bad_input.py), and it never overflows here.
        assert all(isinstance(v, int) and v >= 0 for v in values if isinstance(v, int))


@FAST
@given(
    st.sampled_from(list(Action)),
    st.integers(min_value=1, max_value=10**19 - 1),
    st.integers(min_value=0, max_value=9),
)
def test_the_bots_own_custom_ids_parse_back(action: Action, job_id: int, index: int) -> None:
    index = index or (1 if action.needs_index else 0)
    if 0 < index <= 9:
        assert parse_job_button(job_custom_id(action, job_id, index)) == (action, job_id, index)
    assert parse_describe_button(describe_custom_id(DescribeAction.AGAIN, job_id)) == (
        DescribeAction.AGAIN,
        job_id,
        0,
    )
