"""Per-member settings in a real SQLite file: stored, read back after a reopen, validated, and
applied to prompts (defaults under typed flags, shortcuts, the suffix)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bot.core.clock import ManualClock
from bot.core.db import SCHEMA_VERSION, Database
from bot.core.preferences import Preferences, PreferenceStore
from generation.prompt import PromptError, parse_jobs
from generation.settings import EngineSettings, ModelSpec

SETTINGS = EngineSettings(
    models=(
        ModelSpec(name="tiny", source="tiny", base_resolution=128),
        ModelSpec(name="other", source="tiny", base_resolution=128),
    ),
    max_steps=50,
    default_steps=20,
    max_pixels=256 * 256,
)


async def open_store(path: Path) -> tuple[Database, PreferenceStore]:
    db = await Database.open(path)
    return db, PreferenceStore(db, SETTINGS, ManualClock())


def parse(text: str, prefs: Preferences, **options: object) -> dict[str, object]:
    (job,) = parse_jobs(
        prefs.expand(text),
        SETTINGS,
        seed_source=lambda: 1,
        defaults=prefs.prompt_defaults(SETTINGS),
        **options,  # type: ignore[arg-type]
    )
    request = job.request
    return {
        "prompt": request.prompt,
        "size": (request.width, request.height),
        "steps": request.steps,
        "sampler": request.sampler.value,
        "model": request.model,
        "negative": request.negative_prompt,
    }


async def test_settings_survive_a_reopen_and_start_as_defaults(tmp_path: Path) -> None:
    db, store = await open_store(tmp_path / "bot.db")
    fresh = await store.get(7)
    assert (fresh.previews, fresh.remix, fresh.aspect, fresh.suffix) == (True, False, None, "")
    await store.update(7, aspect="16:9", model="other", sampler="Euler a", steps=12)
    await store.update(7, previews=False, remix=True)
    await store.set_suffix(7, "  oil   painting --no text ")
    await store.set_option(7, "--MyStyle", "--ar 3:2 --sampler ddim")
    await store.set_option(7, "warm", "golden light")
    await db.close()

    db, store = await open_store(tmp_path / "bot.db")
    try:
        prefs = await store.get(7)
        assert prefs.aspect == "16:9" and prefs.model == "other"
        assert prefs.sampler == "euler_a" and prefs.steps == 12
        assert (prefs.previews, prefs.remix) == (False, True)
        assert prefs.suffix == "oil painting --no text"
        assert dict(prefs.options) == {"mystyle": "--ar 3:2 --sampler ddim", "warm": "golden light"}
        assert (await store.get(8)) == Preferences(8)  # others are untouched

        await store.update(7, aspect=None, steps=None)
        await store.set_suffix(7, None)
        await store.unset_option(7, "warm")
        again = await store.get(7)
        assert again.aspect is None and again.steps is None and again.suffix == ""
        assert list(again.options) == ["mystyle"]
        rows = await db.read("SELECT version FROM schema_version")
        assert rows[0][0] == SCHEMA_VERSION
    finally:
        await db.close()


async def test_defaults_apply_under_typed_flags(tmp_path: Path) -> None:
    db, store = await open_store(tmp_path / "bot.db")
    try:
        prefs = await store.update(1, aspect="2:1", sampler="ddim", steps=9, model="other")
        plain = parse("a fox", prefs)
        assert plain["size"][0] == 2 * plain["size"][1]  # type: ignore[index]
        assert (plain["sampler"], plain["steps"], plain["model"]) == ("ddim", 9, "other")

        # Typed flags win, and never conflict with a default.
        typed = parse("a fox --ar 1:1 --sampler euler --steps 5 --model tiny", prefs)
        assert typed["size"] == (128, 128)
        assert (typed["sampler"], typed["steps"], typed["model"]) == ("euler", 5, "tiny")
        # --q decides the steps when typed, so the steps default stays out of its way.
        assert parse("a fox --q .5", prefs)["steps"] == 10
        # Slash options win too.
        from generation.prompt import ImagineOptions

        option = parse("a fox", prefs, options=ImagineOptions(aspect="1:2"))
        assert option["size"][1] == 2 * option["size"][0]  # type: ignore[index]

        # Without defaults the server's own apply.
        assert parse("a fox", Preferences(2))["steps"] == 20
        # A default the server no longer offers is left out instead of refusing prompts.
        stale = Preferences(3, model="gone", steps=99)
        assert parse("a fox", stale)["model"] == "tiny" and parse("a fox", stale)["steps"] == 20
    finally:
        await db.close()


async def test_shortcuts_and_suffix_expand_into_the_prompt(tmp_path: Path) -> None:
    db, store = await open_store(tmp_path / "bot.db")
    try:
        await store.set_option(1, "mystyle", "watercolour --ar 3:2 --no people")
        prefs = await store.set_suffix(1, "soft light")
        # The suffix's words join the prompt text, not the last flag's value.
        assert prefs.expand("a harbour --mystyle") == (
            "a harbour watercolour soft light --ar 3:2 --no people"
        )
        parsed = parse("a harbour --MYSTYLE", prefs)
        assert "watercolour" in str(parsed["prompt"]) and "people" in str(parsed["negative"])
        width, height = parsed["size"]  # type: ignore[misc]
        assert width > height
        # Only the whole flag is replaced.
        assert prefs.expand("a --mystyles b") == "a soft light --mystyles b"
        # A prompt edited in a form gets the shortcuts, not the suffix (the form showed the
        # stored prompt, which has it already).
        assert prefs.expand_shortcuts("a harbour, soft light --mystyle") == (
            "a harbour, soft light watercolour --ar 3:2 --no people"
        )
        # A flag both typed and in a shortcut with another value is refused, naming it.
        with pytest.raises(PromptError, match="--ar"):
            parse("a harbour --mystyle --ar 1:1", prefs)
    finally:
        await db.close()


async def test_flags_in_the_suffix_give_way_to_typed_ones(tmp_path: Path) -> None:
    db, store = await open_store(tmp_path / "bot.db")
    try:
        prefs = await store.set_suffix(1, "film grain --ar 16:9 --no text")
        wide = parse("a fox", prefs)
        assert "film grain" in str(wide["prompt"]) and "text" in str(wide["negative"])
        width, height = wide["size"]  # type: ignore[misc]
        assert width > height
        # Typed under another name (--aspect is --ar): the typed one wins, no conflict.
        typed = parse("a fox --aspect 2:3 --no blur", prefs)
        width, height = typed["size"]  # type: ignore[misc]
        assert width < height
        assert "blur" in str(typed["negative"]) and "text" not in str(typed["negative"])
    finally:
        await db.close()


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"aspect": "7:1"}, "aspect"),
        ({"aspect": "wide"}, "aspect"),
        ({"model": "sdxl"}, "model"),
        ({"sampler": "fastest"}, "sampler"),
        ({"steps": 0}, "steps"),
        ({"steps": 51}, "steps"),
        ({"steps": True}, "steps"),
        ({"previews": "yes"}, "previews"),
        ({"colour": "red"}, "colour"),
    ],
)
async def test_bad_settings_are_refused_by_name(
    tmp_path: Path, change: dict[str, object], named: str
) -> None:
    db, store = await open_store(tmp_path / "bot.db")
    try:
        with pytest.raises(ValueError, match=f"^{named}:"):
            await store.update(1, **change)
        assert await store.get(1) == Preferences(1)
        rows = await db.read("SELECT COUNT(*) FROM member_settings")
        assert rows[0][0] == 0
    finally:
        await db.close()


async def test_bad_options_and_suffix_are_refused_by_name(tmp_path: Path) -> None:
    db, store = await open_store(tmp_path / "bot.db")
    try:
        for name, value, named in [
            ("ar", "--ar 1:1", "name"),  # the bot's own flag
            ("seed", "--seed 1", "name"),
            ("9lives", "x", "name"),
            ("has space", "x", "name"),
            ("ok", "   ", "value"),
            ("ok", "x" * 201, "value"),
            ("selfie", "more --selfie", "value"),
        ]:
            with pytest.raises(ValueError, match=f"^{named}:"):
                await store.set_option(1, name, value)
        with pytest.raises(ValueError, match=r"^suffix:"):
            await store.set_suffix(1, "y" * 201)
        with pytest.raises(ValueError, match=r"^name: you have no option --nope"):
            await store.unset_option(1, "nope")
        for index in range(25):
            await store.set_option(1, f"o{index}", "x")
        with pytest.raises(ValueError, match=r"^name: at most 25"):
            await store.set_option(1, "onemore", "x")
        await store.set_option(1, "o3", "replaced")  # replacing one is not adding one
        assert (await store.get(1)).options["o3"] == "replaced"
    finally:
        await db.close()
