"""/shorten, whatever the front end: which words of a prompt matter to CLIP and up to five
shorter prompts (a SHORTEN job, run on a worker by its CLIP ranker, generation/shorten.py),
and the buttons that imagine one of them (an ordinary paid /imagine).

`Shortening` is the part of `ImagineApp` (bot/app/application.py) these calls make; the checks
every command shares (cooldown, prompt filter, queue and credits) are the app's. What a
refusal costs: nothing, and nothing is queued.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

from bot.app.actions import Actor, Submitted, UserError
from bot.config import Config
from bot.core.models import Job, JobKind, JobState
from bot.core.preferences import PreferenceStore
from bot.core.service import Core
from generation.contract import GenerationRequest
from generation.prompt import ImagineOptions, ParsedPrompt, PromptDefaults, PromptError
from generation.requests import shorten_request
from generation.shorten import NothingToShorten, Shortened, read_prompt


class Shortening:
    """/shorten and its buttons. What it uses of the app is declared here."""

    config: Config
    core: Core
    preferences: PreferenceStore

    def _cooling(self, actor: Actor) -> contextlib.AbstractContextManager[None]:
        raise NotImplementedError

    def parse_jobs(
        self,
        text: str,
        options: ImagineOptions | None = None,
        model: str | None = None,
        defaults: PromptDefaults | None = None,
    ) -> list[ParsedPrompt]:
        raise NotImplementedError

    async def _check_prompt(self, actor: Actor, typed: str, prompt: str) -> None:
        raise NotImplementedError

    async def _job_for(self, actor: Actor, job_id: int, must_own: bool = True) -> Job:
        raise NotImplementedError

    async def _submit(
        self,
        actor: Actor,
        requests: list[GenerationRequest],
        kind: JobKind,
        parent: tuple[int, int | None] | None,
        cooled: bool | None = None,
    ) -> list[Job]:
        raise NotImplementedError

    async def imagine(self, actor: Actor, text: str) -> list[Submitted]:
        raise NotImplementedError

    async def shorten(self, actor: Actor, text: str) -> Submitted:
        """Queue a SHORTEN of `text` (the member's /prefer shortcuts expanded; not the suffix,
        which the shorter prompts' /imagine adds). Refused, free, when there is nothing to
        weigh, the flags are wrong, or the prompt makes several different prompts."""
        with self._cooling(actor):
            prefs = await self.preferences.get(actor.user_id)
            try:
                expanded = prefs.expand_shortcuts(text)
                read_prompt(expanded)
            except (NothingToShorten, PromptError) as exc:
                raise UserError(str(exc)) from None
            parsed = self.parse_jobs(expanded)
            if len({job.request.prompt for job in parsed}) > 1:
                raise UserError(
                    "/shorten weighs one prompt, and {…} makes several; shorten one of them."
                )
            request = parsed[0].request
            if request.prompt_parts:
                raise UserError(
                    "/shorten weighs the words of a plain prompt; take the :: weights out "
                    "(each part's words are weighed all the same)."
                )
            await self._check_prompt(actor, text, request.prompt)
            try:
                # The parsed job's size: within this server's limits, which the engine checks.
                shortening = shorten_request(
                    expanded, model=request.model, width=request.width, height=request.height
                )
            except ValueError as exc:
                raise UserError(str(exc)) from None
            (job,) = await self._submit(actor, [shortening], JobKind.SHORTEN, None, cooled=False)
        return Submitted(job, (), self.core.scheduler.queue_position(job.id))

    async def imagine_shortened(self, actor: Actor, job_id: int, index: int) -> list[Submitted]:
        """Buttons 1–5 under a /shorten: that shorter prompt as an ordinary (paid) /imagine."""
        job = await self._job_for(actor, job_id)
        prompts = shorter_prompts(job)
        if job.kind is not JobKind.SHORTEN or job.state is not JobState.SUCCEEDED or not prompts:
            raise UserError(f"Job {job.id} has no shorter prompts to imagine.")
        if not 1 <= index <= len(prompts):
            raise UserError(f"Shorter prompt {index} doesn't exist in job {job.id}.")
        return await self.imagine(actor, prompts[index - 1])


def shorter_prompts(job: Job) -> tuple[str, ...]:
    return job.result.texts if job.result is not None else ()


def shortened(job: Job) -> Shortened | None:
    """What a finished /shorten found, read back from its stored result (None if it can't be:
    a job from elsewhere, or one whose prompt retention erased)."""
    if job.result is None or job.kind is not JobKind.SHORTEN:
        return None
    try:
        return Shortened.from_scores(job.prompt, job.result.texts, job.result.clip_scores)
    except ValueError:
        return None


_BAR_CELLS = 8


def shorten_text(
    job: Job, notes: Sequence[str] = (), refused: Callable[[str], bool] | None = None
) -> str:
    """The /shorten result: the prompt's words weighted (bold: what CLIP leans on most,
    struck through: what it barely notices), each phrase's weight as a bar, and the shorter
    prompts with how close each stays.

    `refused` is the prompt filter: taking words out can make a phrase it refuses out of a
    prompt it let through ("naked happy child" → "naked child"), and the result is posted for
    the channel to read, so such a prompt is shown hidden (its button is refused when pressed,
    since the press runs the filter like any /imagine)."""
    found = shortened(job)
    lines = [f"**Shorten — job {job.id}**"]
    if found is None:
        lines.append("The analysis of this prompt is no longer available.")
        return "\n".join(lines)
    lines.append("What CLIP notices, word by word (**bold** most, ~~struck~~ least):")
    lines.append(weighted_words(found))
    if found.phrase_weights:
        top = max(found.phrase_weights) or 1.0
        for phrase, weight in zip(found.words.phrases, found.phrase_weights, strict=True):
            cells = round(weight / top * _BAR_CELLS)
            bar = "▰" * cells + "▱" * (_BAR_CELLS - cells)
            lines.append(f"{bar} `{_code(' '.join(phrase), 60)}`")
    lines.append("Shorter prompts (how close each stays to yours, by CLIP):")
    for number, (prompt, similarity) in enumerate(
        zip(found.prompts, found.similarities, strict=True), 1
    ):
        if refused is not None and refused(prompt):
            lines.append(f"**{number}.** *(hidden: the server's prompt filter refuses it)*")
            continue
        lines.append(f"**{number}.** `{_code(prompt, 180)}` — {similarity:.0%}")
    lines.append(
        f"Press 1–{len(found.prompts)} to imagine one (an ordinary job, charged as /imagine). "
        f"Job {job.id}, cost {job.cost} credit{'s' if job.cost != 1 else ''}."
    )
    lines += [f"ℹ️ {note}" for note in notes]
    text = "\n".join(lines)
    return text if len(text) <= 1900 else text[:1899] + "…"


def weighted_words(found: Shortened) -> str:
    """The prompt's words, the top third by weight in bold, the bottom third struck."""
    words = found.words.words
    order = sorted(range(len(words)), key=lambda i: found.word_weights[i])
    third = max(1, len(words) // 3)
    light, heavy = set(order[:third]), set(order[-third:])
    shown = []
    for index, word in enumerate(words):
        text = _plain(word)
        if index in heavy:
            text = f"**{text}**"
        elif index in light:
            text = f"~~{text}~~"
        shown.append(text)
    result = " ".join(shown)
    return result if len(result) <= 900 else result[:899] + "…"


def _plain(word: str) -> str:
    """A word with Discord's Markdown characters escaped, so it can't break the emphasis."""
    return "".join("\\" + c if c in "\\*_~`|<>[]()@#:" else c for c in word)[:60]


def _code(text: str, limit: int) -> str:
    text = " ".join(text.split())
    text = text if len(text) <= limit else text[:limit] + "…"
    return text.replace("`", "ˋ")
