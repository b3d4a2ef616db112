"""A corpus of hostile and malformed input across every command, option and button.

Each input must end in a clear, specific refusal (a `UserError` or the admin API's `ValueError`)
or a safe accepted job: nothing else may escape, a refusal charges nothing, and the service
keeps serving other users afterwards. The engine is the fake one (the point is the front door,
not the pixels); a slice of the corpus also goes through the real bot and the fake Discord.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bot.app import render
from bot.app.actions import Action, Actor, UserError
from bot.app.application import ImagineApp, open_core
from bot.config import Config, parse_config
from bot.core import InProcessWorker
from bot.core.service import Core
from generation.flags import FLAGS
from generation.prompt import ImagineOptions
from generation.settings import EngineSettings, ModelSpec
from tests.bot.test_picture_formats import encoded
from tests.core.fakes import create_fake_engine
from tests.core.test_shortcut_expansion import NAMES, chain_values

ALLOWANCE = 1_000_000  # so that only the input decides, never the balance
HUGE = 10**30

# --- /imagine prompt text ----------------------------------------------------------------------
HOSTILE_PROMPTS: list[str] = [
    "",
    " ",
    "\n\n\t",
    "x" * 10_000,
    "a" * 2_001,
    "--ar 3:2",
    "--seed 5 --no cats",
    "a cat --ar 1000:1",
    "a cat --ar 1:1000",
    "a cat --ar 0:1",
    "a cat --ar 3:0",
    "a cat --ar -3:2",
    "a cat --ar 3:2:1",
    "a cat --ar three:two",
    "a cat --ar",
    "a cat --ar 3.5:2",
    "a cat --ar 99999999999999999999:1",
    "a cat --seed",
    "a cat --seed -1",
    "a cat --seed 4294967296",
    "a cat --seed 1e9",
    "a cat --seed abc",
    f"a cat --seed {HUGE}",
    "a cat --seed 5 --seed 6",
    "a cat --steps 0",
    "a cat --steps -5",
    "a cat --steps 100000",
    "a cat --steps 2.5",
    "a cat --steps NaN",
    "a cat --steps",
    "a cat --cfg -1",
    "a cat --cfg 31",
    "a cat --cfg nan",
    "a cat --cfg inf",
    "a cat --cfg -inf",
    "a cat --cfg 1e400",
    "a cat --cfg",
    "a cat --guidance 7 --cfg 8",
    "a cat --sampler",
    "a cat --sampler plms",
    "a cat --sampler '; DROP TABLE jobs; --",
    "a cat --sampler euler_a --sampler ddim",
    "a cat --model",
    "a cat --model sdxl-turbo",
    "a cat --model ../../etc/passwd",
    "a cat --q 3",
    "a cat --q -1",
    "a cat --q",
    "a cat --quality 0",
    "a cat --chaos 101",
    "a cat --chaos -1",
    "a cat --c abc",
    "a cat --stop 5",
    "a cat --stop 101",
    "a cat --stop",
    "a cat --tile 5",
    "a cat --no",
    "a cat --v 99",
    "a cat --v abc",
    "a cat --stylize -5",
    "a cat --s 1000000",
    "a cat --iw -3",
    "a cat --weird 5000",
    "a cat --wat 3",
    "a cat --help",
    "a cat --rm -rf /",
    "a cat --__proto__ 1",
    "a cat --ar16:9",
    "a cat -ar 16:9",
    "a cat --------",
    "a cat —",
    "a cat —ar 100:1",
    "a::",
    "a::0",
    "a::-1",
    "a::1 b::-2",
    "::5",
    "a::1e999 b",
    "a::nan b::1",
    "::" * 40,
    "a::1 " * 30,
    "\x00\x01\x02",
    "a cat\x00 --ar 3:2",
    "\u202eevil\u202c cat",
    "\u200b\u200b\u200b",
    "\ufeff",
    "\ud800 lone surrogate",
    "@everyone look at this",
    "@here <@&123456789> <@987654321>",
    "<#123> <:emoji:456> <a:anim:789>",
    "```python\nimport os\nos.system('rm -rf /')\n```",
    "**bold** __underline__ ~~strike~~ ||spoiler|| > quote",
    "'; DROP TABLE jobs; --",
    "Robert'); DELETE FROM ledger WHERE ('1'='1",
    "1 OR 1=1",
    "../../../../etc/passwd",
    "C:\\Windows\\System32",
    "%s %d %n {0} {prompt} ${HOME} $(whoami) `id`",
    "🦊" * 600,
    "🦊🦊🦊 a fox made of emoji 🔥",
    "ｆｕｌｌ　ｗｉｄｔｈ　ｃａｔ",
    "مرحبا بالعالم cat",
    "猫 の 絵",
    "a\u0301\u0301\u0301\u0301\u0301\u0301 zalgơ̸̢̛͖̗",
    "/imagine prompt: a cat --ar 3:2",
    "/imagine prompt:",
    "https://example.com/cat.png",
    "https://s.mj.run/abc a cat --ar 2:3",
    "a cat " + "--v 6 " * 2,
    "a cat --v 5.2 --v 6",
    "a cat --ar 2:3 --ar 9:16",
    "a cat\r\n--ar 3:2",
    "a cat -- ar 3:2",
    "a cat --  --",
    "a cat ––no dogs",
    "<script>alert(1)</script>",
    "{{7*7}} ${7*7} <%= 7*7 %>",
    "\\" * 500,
    "a cat --no " + "dog, " * 400,
    # Markdown in the text a public note repeats (an ignored flag's value, words moved from
    # after a flag, a link dropped mid-prompt): a masked link, emphasis, spoilers, mentions.
    "a cat --style [a](https://e.x)",
    "a cat --foo [click here](https://evil.example/login) **now**",
    "a cat --profile <@123> ||hidden|| <#456>",
    "a cat --ar 3:2 [a](https://e.x) @everyone",
    "a cat --v 6 `code` ~~strike~~ __under__",
    "a cat [a](https://e.x) https://cdn.discordapp.com/x.png",
    "a cat --personalize [a](https://e.x) --niji [b](https://f.x)",
    "a cat --sref 1234 --stylize 100 # heading > quote",
    "a cat --exp 5 www.evil.example",
    "a cat --q 2 --steps 10 \\[x\\](https://e.x)",
    "a cat --lumen [x](https://e.x)",
    "a cat --w 300 --h 200 [a](https://e.x)",
]
# Every flag the parser knows, with values that are wrong for almost all of them.
HOSTILE_PROMPTS += [
    f"a cat --{spec.name} {value}"
    for spec in FLAGS
    for value in ("-1", "nan", "99999999999999999999", "'; --")
]

# --- /imagine options (what Discord lets through; Discord enforces the declared ranges) ------
# "safe": an accepted job is the right answer (agreeing duplicates, text that only looks odd).
HOSTILE_OPTIONS: list[dict[str, Any]] = [
    {"aspect": "1000:1"},
    {"aspect": "0:0"},
    {"aspect": "a:b"},
    {"aspect": ""},
    {"aspect": "3:2", "prompt_suffix": " --ar 2:3"},
    {"seed": 5, "prompt_suffix": " --seed 6"},
    {"seed": 5, "prompt_suffix": " --seed 5", "safe": True},
    {"seed": -1},
    {"seed": 2**32},
    {"seed": HUGE},
    {"steps": 0},
    {"steps": -1},
    {"steps": 10**6},
    {"steps": 30, "prompt_suffix": " --steps 20"},
    {"guidance": -0.1},
    {"guidance": 31.0},
    {"guidance": float("nan")},
    {"guidance": float("inf")},
    {"guidance": 7.0, "prompt_suffix": " --cfg 8"},
    {"sampler": "plms"},
    {"sampler": ""},
    {"sampler": "DROP TABLE"},
    {"sampler": "ddim", "prompt_suffix": " --sampler euler"},
    {"negative": "x" * 10_000},
    {"negative": "@everyone", "safe": True},
    {"negative": "\x00\x00", "safe": True},
    {"negative": "dogs", "prompt_suffix": " --no cats", "safe": True},
    {"model": "nope"},
    {"model": "", "safe": True},  # empty means the default model
    {"model": "../tiny"},
]

# --- buttons: (job id, action, index) as a forged or stale custom_id could carry them --------
HOSTILE_PRESSES: list[tuple[int, Action, int]] = [
    (0, Action.UPSCALE, 1),
    (-1, Action.UPSCALE, 1),
    (10**18, Action.VARY, 2),
    (1, Action.UPSCALE, 0),
    (1, Action.UPSCALE, 5),
    (1, Action.VARY, 9),
    (1, Action.VARY, -1),
    (2, Action.UPSCALE, 1),  # someone else's job
    (2, Action.REROLL, 0),
    (2, Action.CANCEL, 0),
    (3, Action.UPSCALE, 1),  # a failed job has no images
    (3, Action.CANCEL, 0),  # already finished
    # 19 digits, as a forged custom_id may carry: past SQLite's 64-bit INTEGER.
    (9_999_999_999_999_999_999, Action.VARY, 1),
    (2**63, Action.UPSCALE, 1),
    (2**63, Action.CANCEL, 0),
    (2**63 - 1, Action.REROLL, 0),
]

# --- admin commands: (method, kwargs) -----------------------------------------------------------
HOSTILE_ADMIN: list[tuple[str, dict[str, Any]]] = [
    ("grant", {"user_id": 5, "amount": -10}),
    ("grant", {"user_id": 5, "amount": 0}),
    ("grant", {"user_id": 5, "amount": HUGE}),
    ("grant", {"user_id": 5, "amount": 10**7}),
    ("grant", {"user_id": 5, "amount": 1.5}),
    ("grant", {"user_id": 5, "amount": "10"}),
    ("grant", {"user_id": 5, "amount": True}),
    ("grant", {"user_id": -5, "amount": 10}),
    ("grant", {"user_id": 0, "amount": 10}),
    ("grant", {"user_id": 5, "amount": 10, "reason": "x" * 5000}),
    ("set_balance", {"user_id": 5, "amount": -1}),
    ("set_balance", {"user_id": 5, "amount": HUGE}),
    ("set_balance", {"user_id": 5, "amount": float("nan")}),
    ("set_user_allowance", {"user_id": 5, "amount": -1}),
    ("set_user_allowance", {"user_id": 5, "amount": HUGE}),
    ("set_role_allowance", {"role_id": 7, "amount": -3}),
    ("set_role_allowance", {"role_id": -7, "amount": 3}),
    ("set_role_allowance", {"role_id": 7, "amount": HUGE}),
    ("ledger", {"user_id": 5, "limit": -1}),
    ("ledger", {"user_id": 5, "limit": 10**9}),
    ("ban", {"user_id": -1, "actor_id": 1}),
    ("audit", {"limit": -5}),
]


def test_the_corpus_has_at_least_200_inputs() -> None:
    total = len(HOSTILE_PROMPTS) + len(HOSTILE_OPTIONS) + len(HOSTILE_PRESSES) + len(HOSTILE_ADMIN)
    assert total >= 200, total


def _config(tmp_path: Path) -> Config:
    config = parse_config(
        {
            "credits": {"daily_allowance": ALLOWANCE},
            "discord": {"command_cooldown_s": 0.0},
            "scheduler": {"max_queued_per_user": 100, "max_queue": 1000},
        }
    )
    engine = EngineSettings(
        models=(ModelSpec("tiny", "tiny", 128),),
        cache_dir=tmp_path / "models",
        default_steps=4,
        extra={"fake_step_s": "0.0005"},
    )
    return dataclasses.replace(config, data_dir=tmp_path / "data", engine=engine)


@pytest.fixture
async def app(tmp_path: Path) -> AsyncIterator[ImagineApp]:
    config = _config(tmp_path)
    worker = InProcessWorker(config.engine, config.data_dir, create_fake_engine)
    core: Core = await open_core(config, lambda _c: False, workers=[worker])
    yield ImagineApp(config, core, seed_source=lambda: 1234)
    await core.close(drain_timeout_s=5.0)


ALICE = Actor(user_id=11, guild_id=1, channel_id=2)
BOB = Actor(user_id=22, guild_id=1, channel_id=2)


async def _available(app: ImagineApp, actor: Actor) -> int:
    return (await app.core.credits.balance(actor.user_id)).available


async def _assert_still_serving(app: ImagineApp) -> None:
    (submitted,) = await app.imagine(BOB, "a calm lake at dawn")
    async with app.core.scheduler.subscribe(submitted.job.id) as events:
        async for _event in events:
            pass
    job = await app.core.jobs.require(submitted.job.id)
    assert job.state.value == "succeeded"
    report = await app.core.credits.check_consistency()
    assert report.ok, str(report)


def _is_clear(message: str) -> bool:
    """Short, and names what was wrong rather than a stack trace."""
    return 0 < len(message) <= 400 and "Traceback" not in message


async def test_hostile_prompts_refuse_clearly_or_run_safely(app: ImagineApp) -> None:
    refused = accepted = 0
    for text in HOSTILE_PROMPTS:
        before = await _available(app, ALICE)
        try:
            (submitted,) = await app.imagine(ALICE, text)
        except UserError as exc:
            refused += 1
            assert _is_clear(str(exc)), (text[:60], str(exc))
            assert await _available(app, ALICE) == before, f"charged for a refusal: {text[:60]!r}"
        else:
            accepted += 1
            request = submitted.job.request_data
            assert request["width"] * request["height"] <= app.config.engine.max_pixels
            assert 1 <= request["steps"] <= app.config.engine.max_steps
            assert len(request["prompt"]) <= 2000
            assert await _available(app, ALICE) == before - submitted.job.cost
    assert refused >= 60 and accepted >= 20, (refused, accepted)
    await _assert_still_serving(app)


# Outside a code span or a <link> (which Discord shows as the link itself, without a preview),
# what Discord's Markdown would act on in a public line.
_QUOTED = re.compile(r"`[^`]*`|<https?://[^\s<>]*>")
_ACTIVE = re.compile(r"[*_~|\[\]<>\\@#`]|https?://|www\.", re.IGNORECASE)


def _active_markdown(line: str) -> list[str]:
    return _ACTIVE.findall(_QUOTED.sub("", line))


async def test_member_text_in_public_messages_is_escaped_or_quoted(app: ImagineApp) -> None:
    # Every accepted hostile prompt: the lines of its public status message and caption that
    # repeat what the member typed (the notes, the pictures, the title) carry it only inside
    # a code span or <>, so it can't post a masked link, a ping or formatting as the bot.
    checked = 0
    for text in HOSTILE_PROMPTS:
        try:
            batch = await app.imagine(ALICE, text)
        except UserError:
            continue
        for submitted in batch:
            job = submitted.job
            shown = render.queued_text(job, submitted.position, submitted.notes)
            shown += "\n" + render.result_text(job, "<@11>", submitted.notes)
            for line in shown.splitlines():
                if line.startswith(("ℹ️", "🖼️")):
                    assert not _active_markdown(line), (text[:60], line)
                if line.startswith("**") and " — " in line:
                    title = line.split(" — ", 1)[1].removesuffix(" — <@11>")
                    assert not _active_markdown(title.rstrip("*")), (text[:60], line)
            checked += 1
        await app.core.scheduler.cancel_queued_for_user(ALICE.user_id, None, "checked")
    assert checked >= 20
    # The case that was reported: an ignored flag's value is a code span, not a masked link.
    (job,) = await app.imagine(ALICE, "a cat --style [a](https://e.x)")
    assert "`--style [a](https://e.x)` ignored (Midjourney style)" in job.notes


async def test_hostile_options_refuse_clearly_or_run_safely(app: ImagineApp) -> None:
    for raw in HOSTILE_OPTIONS:
        values = dict(raw)
        suffix = values.pop("prompt_suffix", "")
        model = values.pop("model", None)
        safe = values.pop("safe", False)
        before = await _available(app, ALICE)
        try:
            options = ImagineOptions(**values)
            (submitted,) = await app.imagine(ALICE, "a red fox" + suffix, options, model)
        except UserError as exc:
            assert not safe, (raw, str(exc))
            assert _is_clear(str(exc)), (raw, str(exc))
            assert await _available(app, ALICE) == before
        else:
            assert safe, f"accepted {raw}"
            assert "\x00" not in submitted.job.request_data["negative_prompt"]
    await _assert_still_serving(app)


async def test_forged_and_stale_button_presses(app: ImagineApp) -> None:
    (own,) = await app.imagine(ALICE, "a red fox")
    (others,) = await app.imagine(BOB, "a blue bird")
    (failing,) = await app.imagine(ALICE, "a [raise] broken one")
    assert (own.job.id, others.job.id, failing.job.id) == (1, 2, 3)
    for job_id in (1, 2, 3):
        async with app.core.scheduler.subscribe(job_id) as events:
            async for _event in events:
                pass
    for job_id, action, index in HOSTILE_PRESSES:
        before = await _available(app, ALICE)
        with pytest.raises(UserError) as caught:
            if action is Action.CANCEL:
                await app.cancel(ALICE, job_id)
            else:
                await app.press(ALICE, job_id, action, index)
        assert _is_clear(str(caught.value))
        assert await _available(app, ALICE) == before
    await _assert_still_serving(app)


async def test_a_chain_of_shortcuts_is_refused_by_its_cap_uncharged(app: ImagineApp) -> None:
    # 25 /prefer shortcuts, each naming the next 40 times: once billions of characters.
    for name, value in chain_values().items():
        await app.preferences.set_option(ALICE.user_id, name, value)
    before = await _available(app, ALICE)
    head = f"--{NAMES[0]}"
    with pytest.raises(UserError, match="over 6000 characters"):
        await app.imagine(ALICE, " ".join([head] * 1500))
    # Expanded once, the next shortcut's name stays and is refused as the unknown flag it is.
    with pytest.raises(UserError, match=f"--{NAMES[1]}: unknown flag"):
        await app.imagine(ALICE, f"a cat {head}")
    assert await _available(app, ALICE) == before
    await _assert_still_serving(app)


async def test_masks_in_formats_not_taken_are_refused_by_name_uncharged(app: ImagineApp) -> None:
    (grid,) = await app.imagine(ALICE, "a red fox")
    async with app.core.scheduler.subscribe(grid.job.id) as events:
        async for _event in events:
            pass
    before = await _available(app, ALICE)
    # EPS would run Ghostscript; the others are parsers few feed hostile files.
    for fmt, name in (("EPS", "EPS"), ("TIFF", "TIFF"), ("SGI", "SGI"), ("DDS", "DDS")):
        with pytest.raises(UserError) as caught:
            await app.vary_region(ALICE, grid.job.id, 1, mask=encoded(fmt, (128, 128)))
        assert str(caught.value).startswith("mask: ") and f"it is {name}" in str(caught.value)
    assert await _available(app, ALICE) == before
    await _assert_still_serving(app)


async def test_hostile_admin_amounts_are_refused_by_name(app: ImagineApp) -> None:
    admin = app.core.admin
    for method, kwargs in HOSTILE_ADMIN:
        kwargs = dict(kwargs)
        if method in ("grant", "set_balance"):
            kwargs.setdefault("actor_id", 1)
        with pytest.raises(ValueError) as caught:
            await getattr(admin, method)(**kwargs)
        message = str(caught.value)
        named = [name for name in kwargs if message.startswith(name.split("_id")[0])]
        assert named, (method, kwargs, message)
    report = await app.core.credits.check_consistency()
    assert report.ok, str(report)
    await _assert_still_serving(app)


async def test_banned_words_are_refused_uncharged_and_audited(tmp_path: Path) -> None:
    config = _config(tmp_path)
    moderation = dataclasses.replace(config.moderation, banned_words=("gore",))
    config = dataclasses.replace(config, moderation=moderation)
    worker = InProcessWorker(config.engine, config.data_dir, create_fake_engine)
    core = await open_core(config, lambda _c: False, workers=[worker])
    try:
        app = ImagineApp(config, core)
        for prompt in ("a g\u200bore scene", "ＧＯＲＥ fest", "g.o.r.e"):
            with pytest.raises(UserError, match="blocked term"):
                await app.imagine(ALICE, prompt)
        assert await _available(app, ALICE) == ALLOWANCE
        # Asking to keep it out is not asking for it.
        (accepted,) = await app.imagine(ALICE, "a calm meadow --no gore")
        assert "gore" in accepted.job.request_data["negative_prompt"]
        entries = await core.admin.audit(10)
        assert [e.kind for e in entries].count("prompt_blocked") == 3
        assert all(e.user_id == ALICE.user_id for e in entries)
    finally:
        await core.close(drain_timeout_s=5.0)
