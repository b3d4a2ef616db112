"""/prefer shortcuts expand in one pass with the result capped: the worst a member can build
(25 shortcuts, each standing for 200 characters that name the next one 40 times) is refused or
stays within the prompt's limit. How long that takes is printed by bench/bench_shortcuts.py."""

from __future__ import annotations

import itertools
import string
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bot.core.clock import ManualClock
from bot.core.db import Database
from bot.core.preferences import (
    MAX_EXPANDED_CHARS,
    MAX_OPTION_VALUE_CHARS,
    MAX_OPTIONS,
    Preferences,
    PreferenceStore,
)
from generation.flags import FLAGS_BY_NAME
from generation.prompt import MAX_INPUT_CHARS, PromptError
from tests.core.test_preferences import SETTINGS

# The shortest names that are not the bot's own flags: the most uses per character typed.
_LETTERS = string.ascii_lowercase
NAMES = [
    name
    for name in itertools.chain(
        _LETTERS, ("".join(p) for p in itertools.product(_LETTERS, repeat=2))
    )
    if name not in FLAGS_BY_NAME
][:MAX_OPTIONS]
FIRST = NAMES[0]


def chain_values() -> dict[str, str]:
    """Each shortcut stands for as many uses of the next one as fit (the last for plain
    words): expanded again and again, the first would become 40^24 times the last value."""
    values = {}
    for name, following in zip(NAMES, [*NAMES[1:], None], strict=True):
        if following is None:
            values[name] = "x" * MAX_OPTION_VALUE_CHARS
        else:
            use = f"--{following} "
            values[name] = (use * (MAX_OPTION_VALUE_CHARS // len(use))).strip()
    return values


async def worst_chain(path: Path) -> Preferences:
    """The chain, saved through /prefer's store as a member would."""
    db = await Database.open(path)
    store = PreferenceStore(db, SETTINGS, ManualClock())
    try:
        for name, value in chain_values().items():
            prefs = await store.set_option(1, name, value)
        assert len(prefs.options) == MAX_OPTIONS
        return prefs
    finally:
        await db.close()


async def test_a_chain_expands_once_not_into_billions(tmp_path: Path) -> None:
    prefs = await worst_chain(tmp_path / "bot.db")
    # The first stands for its 200 characters; the uses of the second inside them are left as
    # typed (the parser then names them as an unknown flag).
    assert prefs.expand_shortcuts(f"--{FIRST}") == prefs.options[FIRST]
    assert prefs.expand(f"a cat --{NAMES[-1]}") == "a cat " + prefs.options[NAMES[-1]]


@pytest.mark.parametrize("uses", [1, 30, 31, 1_500])
async def test_the_worst_prompt_is_refused_or_within_the_cap(tmp_path: Path, uses: int) -> None:
    prefs = await worst_chain(tmp_path / "bot.db")
    # "--a" is 3 characters; a prompt of the longest a member may type holds 1,500 of them.
    text = " ".join([f"--{FIRST}"] * uses)
    assert len(text) <= MAX_INPUT_CHARS
    try:
        expanded = prefs.expand(text)
    except PromptError as exc:
        assert f"over {MAX_INPUT_CHARS} characters" in str(exc)
        assert uses * (len(prefs.options[FIRST]) + 1) > MAX_INPUT_CHARS
    else:
        assert len(expanded) <= MAX_INPUT_CHARS
        assert expanded.count(f"--{NAMES[1]}") == prefs.options[FIRST].count("--") * uses


def test_text_without_shortcuts_is_left_to_the_parser() -> None:
    # The typed prompt's own length is the parser's to refuse (naming its limit); expansion
    # only refuses what the shortcuts add.
    prefs = Preferences(1, options={"a": "b"})
    long = "y" * (MAX_EXPANDED_CHARS + 5)
    assert prefs.expand_shortcuts(long) == long
    with pytest.raises(PromptError, match="shortcuts expanded"):
        prefs.expand_shortcuts(long + " --a")


_VALUES = st.lists(
    st.sampled_from([f"--{name}" for name in NAMES] + ["x" * 50, "{a,b}", "--ar 3:2", " ", "—a"]),
    max_size=60,
).map(" ".join)


@settings(max_examples=300, deadline=None, database=None)
@given(
    st.dictionaries(st.sampled_from(NAMES), _VALUES, max_size=MAX_OPTIONS),
    st.text(max_size=200)
    | st.lists(st.sampled_from([f"--{n}" for n in NAMES]), max_size=2000).map(" ".join),
)
def test_any_shortcuts_and_prompt_give_a_capped_prompt_or_the_cap_named(
    options: dict[str, str], text: str
) -> None:
    prefs = Preferences(user_id=1, options=options)
    try:
        expanded = prefs.expand_shortcuts(text)
    except PromptError as exc:
        assert f"over {MAX_INPUT_CHARS} characters" in str(exc)
        return
    assert expanded == text or len(expanded) <= MAX_INPUT_CHARS
