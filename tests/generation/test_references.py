"""Pictures in prompts (generation.references through generation.prompt): image prompt links at
the start, /imagine's attachment options, --sref/--oref/--cref and their weights."""

from __future__ import annotations

import pytest

from generation.contract import InputRole
from generation.prompt import ImagineOptions, PromptError, parse_jobs, parse_prompt
from generation.settings import EngineSettings

SETTINGS = EngineSettings()
A = "https://cdn.discordapp.com/attachments/1/2/a.png"
B = "https://media.discordapp.net/attachments/1/3/b.jpg?ex=1&hm=2"


def parse(text: str, **options: object):  # type: ignore[no-untyped-def]
    return parse_prompt(
        text,
        SETTINGS,
        options=ImagineOptions(**options),
        seed_source=lambda: 7,  # type: ignore[arg-type]
    )


def refused(text: str, **options: object) -> PromptError:
    with pytest.raises(PromptError) as caught:
        parse(text, **options)
    return caught.value


def test_leading_links_and_attachments_are_image_prompts_at_iw() -> None:
    parsed = parse(f"{A} <{B}> a red fox --iw 2.5", images=("attachment:fox.png",))
    assert parsed.request.prompt == "a red fox"
    assert [(r.role, r.source, r.weight) for r in parsed.image_refs] == [
        (InputRole.IMAGE_PROMPT, "attachment:fox.png", 2.5),
        (InputRole.IMAGE_PROMPT, A, 2.5),
        (InputRole.IMAGE_PROMPT, B, 2.5),
    ]
    assert not parsed.image_refs[0].is_link and parsed.image_refs[1].is_link
    assert parse(f"{A} a fox").image_refs[0].weight == 1.0  # Midjourney's default --iw


def test_references_with_their_weights() -> None:
    parsed = parse(f"a fox --sref {A} 1234 --sw 300 --oref {B} --ow 400 --cref {A} --cw 50")
    assert [(r.role, r.source, r.weight) for r in parsed.image_refs] == [
        (InputRole.STYLE, A, 300.0),
        (InputRole.OBJECT, B, 400.0),
        (InputRole.OBJECT, A, 50.0),
    ]
    assert parsed.notes == (
        "--sref 1234 ignored (a Midjourney style code: it can't be reproduced here; give an "
        "image link instead)",
    )
    defaults = parse(f"a fox --sref {A} --sref {B} --cref {B}").image_refs
    assert [(r.role, r.weight) for r in defaults] == [
        (InputRole.STYLE, 100.0),
        (InputRole.STYLE, 100.0),
        (InputRole.OBJECT, 100.0),
    ]


def test_weights_without_their_picture_are_noted() -> None:
    notes = parse("a fox --iw 2 --sw 50 --ow 10 --cw 5").notes
    assert [note.split(" (")[0] for note in notes] == [
        "--iw 2 ignored",
        "--sw 50 ignored",
        "--ow 10 ignored",
        "--cw 5 ignored",
    ]


@pytest.mark.parametrize(
    ("text", "flag", "expected"),
    [
        ("a fox --iw 9", "--iw", "between 0 and 3"),
        ("a fox --sref", "--sref", "expected an image link"),
        ("a fox --sref --ar 3:2", "--sref", "expected an image link"),
        ("a fox --sref style.png", "--sref", "or a Midjourney style code, got 'style.png'"),
        ("a fox --cref 123", "--cref", "expected an image link (https://…), got '123'"),
        ("a fox --oref", "--oref", "expected an image link"),
        ("a fox --sw 1001", "--sw", "between 0 and 1000"),
        ("a fox --cw 101", "--cw", "between 0 and 100"),
        (
            " ".join(f"https://cdn.discordapp.com/{n}.png" for n in range(6)) + " fox",
            "prompt",
            "at most 5 image prompts",
        ),
    ],
)
def test_bad_pictures_are_refused_naming_the_flag(text: str, flag: str, expected: str) -> None:
    error = refused(text)
    assert error.flag == flag and expected in str(error), str(error)


def test_a_permutation_of_links_gives_each_job_its_picture() -> None:
    jobs = parse_jobs(f"{{{A}, {B}}} a fox", SETTINGS, seed_source=lambda: 7)
    assert [job.image_refs[0].source for job in jobs] == [A, B]
    assert {job.request.prompt for job in jobs} == {"a fox"}


def test_two_pictures_without_words_are_a_blend_once_attached() -> None:
    from PIL import Image

    from generation.contract import InputImage

    parsed = parse(f"{A} {B} --ar 3:2", images=("attachment:c.png",))
    assert parsed.wordless and len(parsed.image_refs) == 3
    pictures = tuple(
        InputImage(ref.role, Image.new("RGB", (8, 8)), ref.weight, ref.source, "0" * 64)
        for ref in parsed.image_refs
    )
    attached = parsed.with_pictures(pictures).request
    assert attached.prompt == "" and attached.prompt_parts == ()
    assert [i.source for i in attached.inputs] == ["attachment:c.png", A, B]
    assert attached.width > attached.height
    # Words keep their prompt when the pictures come.
    worded = parse(f"{A} {B} a fox")
    assert not worded.wordless
    assert worded.with_pictures(pictures[1:]).request.prompt == "a fox"


@pytest.mark.parametrize(
    ("text", "images", "expected"),
    [
        (f"{A}", (), "one image prompt needs words beside it"),
        ("--ar 3:2", ("attachment:c.png",), "one image prompt needs words beside it"),
        (f"{A} --sref {B}", (), "one image prompt needs words beside it"),
        (f"--sref {A} --cref {B}", (), "nothing to draw"),
    ],
)
def test_a_single_picture_needs_words(text: str, images: tuple[str, ...], expected: str) -> None:
    error = refused(text, images=images)
    assert error.flag == "prompt" and expected in str(error), str(error)
