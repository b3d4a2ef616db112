"""Per-member settings: what /settings and /prefer store, and how they shape a new prompt.

A member's defaults (aspect, model, sampler, steps) apply only where the prompt and the slash
options say nothing (`generation.prompt.PromptDefaults`), so typed flags always win and never
conflict with a default. `/prefer option set mystyle --ar 3:2 --sampler euler_a` makes
`--mystyle` in a prompt stand for those words, and `/prefer suffix` is appended to every prompt.
Previews and Remix are switches the Discord layer reads.

Settings live in SQLite (tables `member_settings`, `member_options`) and in a small in-memory
copy: the Discord layer reads them before acknowledging a button press (Remix decides between a
modal and a new job), which must not wait for the database. Every write goes through this
store, so the copy never goes stale. No Discord imports.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from bot.core.clock import Clock, to_db
from bot.core.db import Database, Transaction
from generation.contract import Sampler
from generation.flags import FLAGS_BY_NAME, PromptError, aspect_option, sampler_value
from generation.prompt import MAX_INPUT_CHARS, PromptDefaults
from generation.prompt_text import with_suffix
from generation.settings import EngineSettings

log = logging.getLogger(__name__)

MAX_SUFFIX_CHARS = 200
MAX_OPTION_VALUE_CHARS = 200
# Discord shows at most 25 choices in a list; more shortcuts than that help nobody.
MAX_OPTIONS = 25
# A prompt with its shortcuts expanded is a prompt: it gets the prompt's own limit.
MAX_EXPANDED_CHARS = MAX_INPUT_CHARS
OPTION_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")
# `--name` (or a phone's em dash) standing alone: not inside `--names` or `x--name`.
_OPTION_USE = r"(?<![\w-])(?:--|—){name}(?![\w-])"

# The columns /settings may change, with the type each holds.
SETTING_FIELDS = ("aspect", "model", "sampler", "steps", "previews", "remix", "personalize")


@dataclass(frozen=True)
class Preferences:
    """One member's settings; a member who never set anything has these defaults."""

    user_id: int
    aspect: str | None = None
    model: str | None = None
    sampler: str | None = None
    steps: int | None = None
    previews: bool = True
    remix: bool = False
    # Rank by one's taste (as with --p) without typing it.
    personalize: bool = False
    suffix: str = ""
    options: Mapping[str, str] = field(default_factory=dict)

    def prompt_defaults(self, settings: EngineSettings) -> PromptDefaults:
        """The defaults for a new prompt. One that no longer fits the server (a model removed
        from the config, a step limit lowered) is left out rather than refuse every prompt."""
        names = {spec.name for spec in settings.models}
        model = self.model if self.model in names else None
        steps = self.steps if self.steps is not None and self.steps <= settings.max_steps else None
        return PromptDefaults(aspect=self.aspect, model=model, sampler=self.sampler, steps=steps)

    def expand(self, text: str) -> str:
        """The prompt with the member's `--shortcut`s replaced by what they stand for and the
        suffix added (its flags give way to the prompt's own, see `with_suffix`)."""
        text = self.expand_shortcuts(text)
        return with_suffix(text, self.suffix) if self.suffix else text

    def expand_shortcuts(self, text: str) -> str:
        """The prompt with the member's `--shortcut`s replaced, without the suffix: what a
        prompt edited in a form (Remix, Custom Zoom, Vary (Region)) gets, since the form showed
        the job's stored prompt, which has the suffix already.

        One pass over the typed text: what a shortcut stands for is not searched for shortcuts
        again (expanding values in turn let a chain of 25 shortcuts, each naming the next 40
        times, grow a few characters into billions). The result is capped as it is built, at
        the prompt's own limit, and PromptError names the cap."""
        if not self.options:
            return text
        names = "|".join(re.escape(name) for name in sorted(self.options, key=len, reverse=True))
        uses = re.compile(_OPTION_USE.format(name=f"({names})"), re.IGNORECASE)
        pieces: list[str] = []
        size = start = 0
        for use in uses.finditer(text):
            for piece in (text[start : use.start()], self.options[use[1].lower()]):
                size += len(piece)
                if size > MAX_EXPANDED_CHARS:
                    raise _too_long()
                pieces.append(piece)
            start = use.end()
        if size + len(text) - start > MAX_EXPANDED_CHARS and pieces:
            raise _too_long()
        pieces.append(text[start:])
        return "".join(pieces)


class PreferenceStore:
    def __init__(self, db: Database, settings: EngineSettings, clock: Clock) -> None:
        self._db = db
        self._settings = settings
        self._clock = clock
        self._cache: dict[int, Preferences] = {}
        # Each write reads the current settings and stores a changed copy: two presses of one
        # member must not both start from the same copy and lose one change.
        self._writing = asyncio.Lock()

    async def get(self, user_id: int) -> Preferences:
        cached = self._cache.get(user_id)
        if cached is not None:
            return cached
        row = await self._db.read_one("SELECT * FROM member_settings WHERE user_id = ?", (user_id,))
        rows = await self._db.read(
            "SELECT name, value FROM member_options WHERE user_id = ? ORDER BY name", (user_id,)
        )
        options = {str(r["name"]): str(r["value"]) for r in rows}
        if row is None:
            found = Preferences(user_id, options=options)
        else:
            found = Preferences(
                user_id,
                aspect=row["aspect"],
                model=row["model"],
                sampler=row["sampler"],
                steps=row["steps"],
                previews=bool(row["previews"]),
                remix=bool(row["remix"]),
                personalize=bool(row["personalize"]),
                suffix=str(row["suffix"]),
                options=options,
            )
        # A write that finished while this read waited has filled the cache with newer data.
        return self._cache.setdefault(user_id, found)

    async def update(self, user_id: int, **changes: Any) -> Preferences:
        """Change settings (`aspect`, `model`, `sampler`, `steps`: a value or None for the
        server default; `previews`, `remix`: bool). Raises ValueError naming a bad one."""
        checked = {name: self._check(name, value) for name, value in changes.items()}
        return await self._save(user_id, **checked)

    async def set_suffix(self, user_id: int, suffix: str | None) -> Preferences:
        """Text appended to every prompt; None or blank removes it."""
        text = " ".join((suffix or "").split())
        if len(text) > MAX_SUFFIX_CHARS:
            raise ValueError(f"suffix: at most {MAX_SUFFIX_CHARS} characters, got {len(text)}")
        return await self._save(user_id, suffix=text)

    async def set_option(self, user_id: int, name: str, value: str) -> Preferences:
        """`--name` in this member's prompts stands for `value` from now on."""
        name = normalise_option_name(name)
        text = " ".join(value.split())
        if not text:
            raise ValueError("value: what the option stands for can't be empty")
        if len(text) > MAX_OPTION_VALUE_CHARS:
            raise ValueError(f"value: at most {MAX_OPTION_VALUE_CHARS} characters, got {len(text)}")
        if re.search(_OPTION_USE.format(name=re.escape(name)), text, re.IGNORECASE):
            raise ValueError(f"value: --{name} can't stand for itself")
        async with self._writing:
            current = await self.get(user_id)
            if name not in current.options and len(current.options) >= MAX_OPTIONS:
                raise ValueError(f"name: at most {MAX_OPTIONS} options; unset one first")
            now = to_db(self._clock())

            async def work(txn: Transaction) -> None:
                await txn.execute(
                    "INSERT INTO member_options (user_id, name, value, updated_at)"
                    " VALUES (?, ?, ?, ?) ON CONFLICT(user_id, name) DO UPDATE SET"
                    " value = excluded.value, updated_at = excluded.updated_at",
                    (user_id, name, text, now),
                )

            await self._db.transaction(work)
            updated = dataclasses.replace(current, options={**current.options, name: text})
            self._cache[user_id] = updated
            return updated

    async def unset_option(self, user_id: int, name: str) -> Preferences:
        name = normalise_option_name(name)
        async with self._writing:
            current = await self.get(user_id)
            if name not in current.options:
                known = ", ".join(f"--{n}" for n in current.options) or "none"
                raise ValueError(f"name: you have no option --{name} (yours: {known})")

            async def work(txn: Transaction) -> None:
                await txn.execute(
                    "DELETE FROM member_options WHERE user_id = ? AND name = ?", (user_id, name)
                )

            await self._db.transaction(work)
            options = {n: v for n, v in current.options.items() if n != name}
            updated = dataclasses.replace(current, options=options)
            self._cache[user_id] = updated
            return updated

    # ----- internals ---------------------------------------------------------------------

    async def _save(self, user_id: int, **changes: Any) -> Preferences:
        async with self._writing:
            updated = dataclasses.replace(await self.get(user_id), **changes)
            await self._db.transaction(lambda txn: self._write_settings(txn, updated))
            self._cache[user_id] = updated
            return updated

    def _check(self, name: str, value: Any) -> Any:
        if name not in SETTING_FIELDS:
            raise ValueError(f"{name}: not a setting (settings: {', '.join(SETTING_FIELDS)})")
        if name in ("previews", "remix", "personalize"):
            if not isinstance(value, bool):
                raise ValueError(f"{name}: expected on or off, got {value!r}")
            return value
        if value is None:
            return None
        if name == "aspect":
            width, height = aspect_option("aspect", str(value).replace(" ", ""))
            return f"{width}:{height}"
        if name == "model":
            names = [spec.name for spec in self._settings.models]
            if value not in names:
                raise ValueError(f"model: expected one of {', '.join(names)}, got {value!r}")
            return value
        if name == "sampler":
            sampler: Sampler = sampler_value("sampler", str(value))
            return sampler.value
        limit = self._settings.max_steps
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
            raise ValueError(f"steps: expected a whole number between 1 and {limit}, got {value!r}")
        return value

    async def _write_settings(self, txn: Transaction, prefs: Preferences) -> None:
        await txn.execute(
            "INSERT INTO member_settings (user_id, aspect, model, sampler, steps, previews, remix,"
            " personalize, suffix, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT(user_id) DO UPDATE SET aspect = excluded.aspect,"
            " model = excluded.model, sampler = excluded.sampler, steps = excluded.steps,"
            " previews = excluded.previews, remix = excluded.remix,"
            " personalize = excluded.personalize, suffix = excluded.suffix,"
            " updated_at = excluded.updated_at",
            (
                prefs.user_id,
                prefs.aspect,
                prefs.model,
                prefs.sampler,
                prefs.steps,
                int(prefs.previews),
                int(prefs.remix),
                int(prefs.personalize),
                prefs.suffix,
                to_db(self._clock()),
            ),
        )


def _too_long() -> PromptError:
    return PromptError(
        "prompt",
        f"prompt: with your /prefer shortcuts expanded it is over {MAX_EXPANDED_CHARS} "
        "characters (the limit); use fewer or shorter shortcuts",
    )


def normalise_option_name(name: str) -> str:
    """`--MyStyle`, `mystyle` → `mystyle`; refuses names of the bot's own flags, which a
    shortcut would silently take over."""
    cleaned = name.strip().lstrip("-—").lower()
    if not OPTION_NAME.fullmatch(cleaned):
        raise ValueError(
            f"name: letters, digits and _ (starting with a letter, at most 32), got {name!r}"
        )
    if cleaned in FLAGS_BY_NAME:
        raise ValueError(f"name: --{cleaned} is one of the bot's own flags; pick another name")
    return cleaned
