"""/shorten: the ranking and shortening algorithm against a stand-in text encoder whose right
answer is known (an oracle), and the real path through the engine's tiny CLIP (plumbing: a
weight for every word, at most five shorter prompts keeping the flags).

The tiny CLIP has random weights, so which of its words "matter" is noise; the oracle encoder
embeds a text as the sum of fixed random word vectors, each scaled by a known importance, so
leaving out a word moves the embedding by about its importance and the ranking is known.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

from generation.contract import JobKind
from generation.requests import shorten_request
from generation.shorten import (
    MAX_SHORTER,
    NothingToShorten,
    Shortened,
    read_prompt,
    shorten,
)

# What each word means to the stand-in encoder; filler barely moves it.
IMPORTANCE = {
    "cat": 5.0,
    "mat": 3.0,
    "orange": 2.0,
    "on": 0.3,
    "a": 0.2,
    "very": 0.1,
    "beautiful": 0.15,
}


class OracleEncoder:
    """A text's embedding is the importance-weighted sum of its words' fixed random vectors
    (near-orthogonal in 512 dimensions), normalised."""

    def __init__(self, dim: int = 512, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.dim = dim
        self.vectors: dict[str, np.ndarray] = {}
        self.calls: list[list[str]] = []

    def vector(self, word: str) -> np.ndarray:
        if word not in self.vectors:
            self.vectors[word] = self.rng.standard_normal(self.dim) / np.sqrt(self.dim)
        return self.vectors[word]

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        self.calls.append(list(texts))
        rows = []
        for text in texts:
            total = np.zeros(self.dim)
            for word in text.replace(",", " ").split():
                total += IMPORTANCE.get(word, 1.0) * self.vector(word)
            rows.append(total / max(float(np.linalg.norm(total)), 1e-12))
        return np.stack(rows)


def weight_of(found: Shortened, word: str) -> float:
    return found.word_weights[found.words.words.index(word)]


def test_filler_ranks_below_the_subject_with_the_oracle() -> None:
    found = shorten("a very beautiful orange cat on a mat", OracleEncoder())
    assert found.words.words == ("a", "very", "beautiful", "orange", "cat", "on", "a", "mat")
    assert weight_of(found, "very") < weight_of(found, "cat")
    assert weight_of(found, "beautiful") < weight_of(found, "cat")
    # The whole order follows the known importance.
    ranked = sorted(set(found.words.words), key=lambda w: -weight_of(found, w))
    assert ranked[:3] == ["cat", "mat", "orange"]
    assert {"very", "beautiful"} & set(ranked[-3:]) == {"very", "beautiful"}


def test_shorter_prompts_drop_the_filler_first_and_keep_the_subject() -> None:
    found = shorten("a very beautiful orange cat on a mat --ar 3:2 --seed 5", OracleEncoder())
    assert 1 <= len(found.prompts) <= MAX_SHORTER
    lengths = [len(p.split()) for p in found.prompts]
    assert lengths == sorted(lengths, reverse=True) and len(set(found.prompts)) == len(lengths)
    for prompt in found.prompts:
        assert prompt.endswith("--ar 3:2 --seed 5")
        assert "cat" in prompt.split()
    shortest = found.prompts[-1].removesuffix(" --ar 3:2 --seed 5")
    assert "very" not in shortest.split() and "beautiful" not in shortest.split()
    # Each shorter prompt's similarity to the whole, from a second pass: shorter, further.
    assert len(found.similarities) == len(found.prompts)
    assert list(found.similarities) == sorted(found.similarities, reverse=True)
    assert all(0.0 < s < 1.0 for s in found.similarities)


def test_phrases_are_weighed_when_there_are_several() -> None:
    encoder = OracleEncoder()
    found = shorten("orange cat, on a mat, very beautiful", encoder)
    assert found.words.phrases == (("orange", "cat"), ("on", "a", "mat"), ("very", "beautiful"))
    assert len(found.phrase_weights) == 3
    assert found.phrase_weights[2] < found.phrase_weights[0]
    # One batch for the whole, each word and each phrase left out; one for the shorter ones.
    assert len(encoder.calls) == 2
    assert encoder.calls[0][0] == "orange cat, on a mat, very beautiful"
    assert "orange cat, very beautiful" in encoder.calls[0]
    # The numbers round-trip through a job result's clip_scores.
    again = Shortened.from_scores(
        "orange cat, on a mat, very beautiful", found.prompts, found.scores()
    )
    assert again == found


def test_links_and_flags_are_kept_and_not_weighed() -> None:
    prompt = "https://cdn.discordapp.com/a.png very beautiful cat --ar 2:3"
    words = read_prompt(prompt)
    assert words.lead == "https://cdn.discordapp.com/a.png"
    assert words.words == ("very", "beautiful", "cat")
    assert words.tail == "--ar 2:3"
    found = shorten(prompt, OracleEncoder())
    assert all(p.startswith(words.lead + " ") and p.endswith(" --ar 2:3") for p in found.prompts)


@pytest.mark.parametrize("prompt", ["", "   ", "--ar 3:2", "cat --ar 3:2", "https://e.x/a.png"])
def test_nothing_to_shorten(prompt: str) -> None:
    with pytest.raises(NothingToShorten):
        read_prompt(prompt)


def test_mismatched_scores_are_refused() -> None:
    with pytest.raises(ValueError, match="scores"):
        Shortened.from_scores("a red cat", ["red cat"], [0.1, 0.2])


# ----- the real path: the engine's tiny CLIP ----------------------------------------------


@pytest.fixture(scope="module")
def shortened(engine):
    return engine.generate(shorten_request("a very beautiful red cat, sitting on a mat --ar 3:2"))


def test_the_engine_weighs_every_word_with_its_clip(engine, shortened) -> None:
    request = shorten_request("a very beautiful red cat, sitting on a mat --ar 3:2")
    assert request.kind is JobKind.SHORTEN
    assert shortened.images == ()
    found = Shortened.from_scores(request.prompt, shortened.texts, shortened.clip_scores)
    assert len(found.word_weights) == 9
    assert len(found.phrase_weights) == 2
    assert 1 <= len(found.prompts) <= MAX_SHORTER
    assert all(p.endswith(" --ar 3:2") for p in found.prompts)
    # The weights are the tiny CLIP's own: recomputed here from its text tower.
    ranker = engine.ranker()
    whole, without_cat = ranker.text_embeddings(
        ["a very beautiful red cat, sitting on a mat", "a very beautiful red, sitting on a mat"]
    )
    assert weight_of(found, "cat") == pytest.approx(1.0 - float(whole @ without_cat), abs=1e-5)
    assert len(set(found.word_weights)) > 1


# ----- a long prompt: what CLIP's window can't see is not encoded -------------------------


class WindowedOracle(OracleEncoder):
    """The oracle with CLIP's window: only a text's first 75 words reach its embedding (each
    word one token here; a real word is at least one). `sent` keeps the texts as received."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[str] = []

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        self.sent += list(texts)
        return super().__call__([" ".join(t.replace(",", " ").split()[:75]) for t in texts])


def test_a_long_prompt_costs_a_bounded_number_of_encodes_and_weighs_the_same() -> None:
    # About 2000 characters of one-word phrases: weighing every word and every phrase would be
    # ~800 encodes of ~2000-character texts for a free command, though past the 75th word
    # nothing reaches CLIP.
    prompt = ",".join(f"w{i}" for i in range(400))
    encoder = WindowedOracle()
    found = shorten(prompt, encoder)
    assert len(encoder.sent) <= 1 + 75 + 75 + MAX_SHORTER
    assert max(len(text.replace(",", " ").split()) for text in encoder.sent) <= 76
    # The weights are the ones weighing every word and phrase in full would give.
    words = read_prompt(prompt)
    reference = WindowedOracle()
    whole = reference([words.body()])[0]
    dropped = reference([words.body(dropped_words=frozenset({i})) for i in range(400)])
    phrases = reference([words.body(dropped_phrase=j) for j in range(400)])
    np.testing.assert_allclose(found.word_weights, np.maximum(0, 1 - dropped @ whole), atol=1e-9)
    np.testing.assert_allclose(found.phrase_weights, np.maximum(0, 1 - phrases @ whole), atol=1e-9)
    assert max(found.word_weights[:75]) > 0 and max(found.word_weights[75:]) == 0
    again = Shortened.from_scores(prompt, found.prompts, found.scores())
    assert again == found
