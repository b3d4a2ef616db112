"""/shorten: which words of a prompt matter to CLIP, and shorter prompts that keep them.

Each word is taken out in turn (and each comma-separated phrase, when there are several) and
the prompt's CLIP text embedding is compared with the whole prompt's: the cosine distance it
moves is that word's weight. Words CLIP barely notices ("very", "beautiful" beside a subject,
anything past its 77-token window) move it least; words after the 75th can't reach that
window, so they weigh 0 without an encode (CLIP_WINDOW_WORDS). The shorter prompts drop the
lightest words first, keeping about 80, 65, 50, 35 and 20 % of them (never all, never none),
in the order they were typed; a second pass measures how close each stays to the whole
(cosine similarity).

Image links at the start of the prompt and its `--flags` are kept as typed in every shorter
prompt and are not weighed: CLIP's text tower never sees them.

The embedding is a parameter (`Embed`: texts to unit rows), so the algorithm is tested with a
stand-in encoder whose right answer is known; the engine passes its CLIP ranker's
`text_embeddings`. No torch here.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from generation.prompt_text import IMAGINE_PREFIX, URL, clean, split_flags, unquote

# Texts to unit-length embeddings, one row each.
Embed = Callable[[Sequence[str]], np.ndarray]

MAX_SHORTER = 5
# CLIP's text tower reads 77 tokens: a start token, 75 of the text's, an end token. Every word
# is at least one token, so a word after the 75th never reaches it and leaving it out moves
# nothing. Such words (and phrases starting after them) weigh 0 without an encode, and every
# text is cut after its 76th word before encoding: a prompt at the 2000-character limit made
# of one-letter phrases would otherwise cost a worker ~2000 encodes of ~2000-character texts
# (tens of seconds of tokenizing) for what CLIP can't see, on a command that is free.
CLIP_WINDOW_WORDS = 75
# Shares of the words each shorter prompt keeps, longest first.
KEEP_SHARES = (0.8, 0.65, 0.5, 0.35, 0.2)
_PHRASE_BREAK = re.compile(r"[,;]")


class NothingToShorten(ValueError):
    """The prompt has fewer than two words once its links and flags are set aside; the message
    is written for the member."""


@dataclass(frozen=True)
class PromptWords:
    """A prompt as /shorten reads it: the words of each comma-separated phrase, between the
    image links it starts with and its flags, both kept as typed."""

    lead: str
    phrases: tuple[tuple[str, ...], ...]
    tail: str

    @property
    def words(self) -> tuple[str, ...]:
        return tuple(word for phrase in self.phrases for word in phrase)

    def body(self, dropped_words: frozenset[int] = frozenset(), dropped_phrase: int = -1) -> str:
        """The words that are left, phrases joined with commas (an emptied phrase goes)."""
        kept: list[str] = []
        index = 0
        for number, phrase in enumerate(self.phrases):
            words = [w for i, w in enumerate(phrase, index) if i not in dropped_words]
            index += len(phrase)
            if words and number != dropped_phrase:
                kept.append(" ".join(words))
        return ", ".join(kept)

    def prompt(self, body: str) -> str:
        """A whole prompt with `body` as its words."""
        return " ".join(piece for piece in (self.lead, body, self.tail) if piece)


def read_prompt(prompt: str) -> PromptWords:
    """The prompt's words, links and flags (flags as `generation.prompt` reads them; a bad
    flag raises its PromptError). NothingToShorten under two words."""
    cleaned = unquote(IMAGINE_PREFIX.sub("", unquote(clean(prompt))))
    text, _flags = split_flags(cleaned)
    tail = cleaned[len(text) :].strip()
    tokens = text.split()
    links: list[str] = []
    while tokens and URL.fullmatch(tokens[0]):
        links.append(tokens.pop(0))
    phrases = tuple(
        tuple(words)
        for words in (piece.split() for piece in _PHRASE_BREAK.split(" ".join(tokens)))
        if words
    )
    words = PromptWords(" ".join(links), phrases, tail)
    if not words.words:
        raise NothingToShorten("/shorten: the prompt has no words to weigh, only flags or links.")
    if len(words.words) < 2:
        raise NothingToShorten(
            f"/shorten: {words.words[0]!r} is a single word; there is nothing shorter to try."
        )
    return words


@dataclass(frozen=True)
class Shortened:
    """What /shorten found: a weight per word (and per phrase, with several), and up to
    MAX_SHORTER shorter whole prompts with how close each stays to the original."""

    words: PromptWords
    word_weights: tuple[float, ...]
    phrase_weights: tuple[float, ...]
    prompts: tuple[str, ...]
    similarities: tuple[float, ...]

    def scores(self) -> tuple[float, ...]:
        """The numbers as one flat tuple (a job result's `clip_scores`): word weights, phrase
        weights (none with one phrase), then the shorter prompts' similarities."""
        return (*self.word_weights, *self.phrase_weights, *self.similarities)

    @classmethod
    def from_scores(cls, prompt: str, prompts: Sequence[str], scores: Sequence[float]) -> Shortened:
        """Read back what `scores()` and `prompts` stored for `prompt`; ValueError when they
        don't fit it."""
        words = read_prompt(prompt)
        count = len(words.words)
        phrases = len(words.phrases) if len(words.phrases) > 1 else 0
        if len(scores) != count + phrases + len(prompts):
            raise ValueError(
                f"scores: {len(scores)} numbers for {count} words, {phrases} phrases and "
                f"{len(prompts)} prompts"
            )
        values = tuple(float(s) for s in scores)
        return cls(
            words,
            values[:count],
            values[count : count + phrases],
            tuple(prompts),
            values[count + phrases :],
        )


def shorten(prompt: str, embed: Embed) -> Shortened:
    """Weigh every word (and phrase) of `prompt` by how far leaving it out moves its
    embedding, and build the shorter prompts; see the module docstring."""
    words = read_prompt(prompt)
    count = len(words.words)
    several = len(words.phrases) > 1
    seen = min(count, CLIP_WINDOW_WORDS)
    # The phrases that start inside CLIP's window; leaving out a later one moves nothing.
    starts = np.cumsum([0, *(len(phrase) for phrase in words.phrases)])[:-1]
    seen_phrases = int(np.count_nonzero(starts < CLIP_WINDOW_WORDS)) if several else 0
    texts = [words.body()]
    texts += [words.body(dropped_words=frozenset({i})) for i in range(seen)]
    texts += [words.body(dropped_phrase=j) for j in range(seen_phrases)]
    embeddings = _unit_rows(embed([_in_window(text) for text in texts]), len(texts))
    moved = 1.0 - embeddings[1:] @ embeddings[0]
    word_weights = (
        *(max(0.0, float(d)) for d in moved[:seen]),
        *(0.0 for _ in range(count - seen)),
    )
    phrase_weights = (
        (
            *(max(0.0, float(d)) for d in moved[seen:]),
            *(0.0 for _ in range(len(words.phrases) - seen_phrases)),
        )
        if several
        else ()
    )

    bodies = shorter_bodies(words, word_weights)
    similarities: tuple[float, ...] = ()
    if bodies:
        shorter = _unit_rows(embed([_in_window(body) for body in bodies]), len(bodies))
        similarities = tuple(float(s) for s in shorter @ embeddings[0])
    return Shortened(
        words,
        word_weights,
        phrase_weights,
        tuple(words.prompt(body) for body in bodies),
        similarities,
    )


def shorter_bodies(words: PromptWords, weights: Sequence[float]) -> list[str]:
    """Up to MAX_SHORTER texts of the prompt's words, longest first, each dropping the
    lightest words (ties: the later word first); distinct, each shorter than the whole."""
    count = len(words.words)
    # Lightest first; among equal weights the later word goes first.
    order = sorted(range(count), key=lambda i: (weights[i], -i))
    keeps = sorted({min(count - 1, max(1, round(count * share))) for share in KEEP_SHARES})
    bodies: list[str] = []
    for keep in reversed(keeps):
        body = words.body(dropped_words=frozenset(order[: count - keep]))
        if body not in bodies:
            bodies.append(body)
    return bodies[:MAX_SHORTER]


def _in_window(text: str) -> str:
    """`text` cut after its first CLIP_WINDOW_WORDS + 1 words: CLIP reads no further, and
    cutting at a space leaves the tokens before it as they were."""
    pieces = text.split()
    return (
        text if len(pieces) <= CLIP_WINDOW_WORDS + 1 else " ".join(pieces[: CLIP_WINDOW_WORDS + 1])
    )


def _unit_rows(rows: np.ndarray, expected: int) -> np.ndarray:
    values = np.asarray(rows, dtype=np.float64)
    if values.ndim != 2 or values.shape[0] != expected:
        raise ValueError(f"embed: expected {expected} rows, got shape {values.shape}")
    norms = np.linalg.norm(values, axis=1, keepdims=True)
    return values / np.maximum(norms, 1e-12)
