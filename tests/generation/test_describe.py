"""/describe through the real engine: the project's phrase vocabulary ranked by the (tiny)
CLIP model, four suggestions, seeded, each with the picture's --ar."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from PIL import Image

from generation.contract import InputImage, InputRole, JobKind
from generation.describe import PARTS, TOP_PHRASES, aspect_ratio, vocabulary
from generation.requests import describe_request

PICTURE = Image.new("RGB", (100, 80), (30, 120, 200))


def pictured(image: Image.Image = PICTURE) -> InputImage:
    return InputImage(InputRole.IMAGE_PROMPT, image, source="attachment:a.png", sha256="ff")


@pytest.fixture(scope="module")
def described(engine):
    return engine.generate(describe_request(pictured(), seed=3))


def test_four_suggestions_with_the_pictures_shape(described) -> None:
    assert described.images == ()
    assert len(described.texts) == 4
    assert all(text.endswith(" --ar 5:4") for text in described.texts)
    assert len(set(described.texts)) == 4


def test_each_suggestion_leads_with_a_subject_and_a_medium(described) -> None:
    words = vocabulary()
    subjects = []
    for text in described.texts:
        phrases = text.removesuffix(" --ar 5:4").split(", ")
        assert phrases[0] in words.parts["subjects"]
        assert phrases[1] in words.parts["mediums"]
        assert len(phrases) == 5
        subjects.append(phrases[0])
    assert len(set(subjects)) == 4


def test_phrases_come_from_the_best_clip_matches(engine, described) -> None:
    ranker = engine.ranker()
    picture = ranker.image_embeddings([PICTURE])[0]
    words = vocabulary()
    for part in PARTS:
        scores = ranker.text_embeddings(words.parts[part]) @ picture
        best = {words.parts[part][i] for i in np.argsort(-scores)[:TOP_PHRASES]}
        used = {
            phrase
            for text in described.texts
            for phrase in text.removesuffix(" --ar 5:4").split(", ")
            if phrase in words.parts[part]
        }
        assert used <= best, part


def test_the_same_seed_gives_the_same_suggestions(engine, described) -> None:
    again = engine.generate(describe_request(pictured(), seed=3))
    assert again.texts == described.texts


def test_another_seed_gives_other_phrases(engine, described) -> None:
    other = engine.generate(describe_request(pictured(), seed=4))
    assert other.texts != described.texts
    assert len(set(other.texts) & set(described.texts)) < 4


def test_the_aspect_follows_the_picture(engine) -> None:
    tall = engine.generate(describe_request(pictured(Image.new("RGB", (64, 96))), seed=1))
    assert all(text.endswith(" --ar 2:3") for text in tall.texts)


@pytest.mark.parametrize(
    ("width", "height", "expected"),
    [
        (1920, 1080, "16:9"),
        (1500, 1000, "3:2"),
        (1023, 768, "4:3"),
        (512, 512, "1:1"),
        (700, 1000, "7:10"),
        (6000, 1000, "4:1"),
        (1000, 999, "1:1"),
    ],
)
def test_aspect_ratio(width: int, height: int, expected: str) -> None:
    assert aspect_ratio(width, height) == expected


def test_the_vocabulary_is_the_projects_own_and_sizeable() -> None:
    words = vocabulary()
    assert set(words.parts) == set(PARTS)
    for part, phrases in words.parts.items():
        assert len(phrases) >= 25, part
        assert len(set(phrases)) == len(phrases), part
    assert sum(len(p) for p in words.parts.values()) >= 300


def test_a_describe_reads_exactly_one_picture() -> None:
    request = describe_request(pictured(), seed=1)
    assert request.kind is JobKind.DESCRIBE and request.prompt == ""
    with pytest.raises(ValueError, match=r"^inputs: a describe reads exactly one picture"):
        request.with_changes(inputs=(pictured(), pictured()))
    with pytest.raises(ValueError, match=r"^inputs: a describe reads an image_prompt"):
        describe_request(InputImage(InputRole.STYLE, PICTURE, weight=100), seed=1)


def test_a_configured_caption_model_leads_every_suggestion(settings, described) -> None:
    """`caption_model = "tiny"`: a random-weight BLIP built from a config, saved and loaded
    with from_pretrained like a real one; its caption comes first, then the same phrases."""
    from generation.caption import Captioner
    from generation.engine import create_engine
    from generation.tiny import ensure_tiny_captioner

    captioned = create_engine(dataclasses.replace(settings, caption_model="tiny"))
    texts = captioned.generate(describe_request(pictured(), seed=3)).texts
    caption = Captioner(str(ensure_tiny_captioner(settings.cache_dir))).caption(PICTURE)
    words = caption.split()
    assert words and all(word.isalpha() for word in words), caption
    assert [text.removeprefix(f"{caption}, ") for text in texts] == list(described.texts)
    assert all(text.startswith(f"{caption}, ") for text in texts)
