"""Pictures a prompt refers to, and how strongly each one counts.

Midjourney takes pictures three ways, and so does this bot:

* image prompts: links at the very start of the prompt (and /imagine's `image`/`image2`
  attachment options), weighted by `--iw` (0-3, default 1);
* a style reference, `--sref <link>` (style only, not content), weighted by `--sw` (0-1000,
  default 100); Midjourney's numeric style codes (`--sref 1234`, `--sref random`) name styles
  that exist only on Midjourney's servers, so they are ignored with a note;
* object or character references, `--oref <link>` weighted by `--ow` (1-1000, default 100) and
  `--cref <link>` weighted by `--cw` (0-100, default 100): the subject to keep.

Parsing only, and pure: the bot fetches each `ImageRef` (bot/app/fetch.py) and turns it into an
`InputImage` of the same role, weight and source. What the weights do to the image is the
engine's business (see generation's image conditioning).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from generation.contract import InputRole
from generation.flags import LINK, PromptError, shown_fragment

DEFAULT_IMAGE_WEIGHT = 1.0
DEFAULT_STYLE_WEIGHT = 100.0
DEFAULT_OBJECT_WEIGHT = 100.0
DEFAULT_CHARACTER_WEIGHT = 100.0
# Each picture is fetched, checked and encoded by the model: a handful per role is plenty
# (Midjourney's /blend takes five).
MAX_PICTURES_PER_ROLE = 5
ATTACHMENT_PREFIX = "attachment:"

# Flags whose values are pictures; given several times, their links add up.
REFERENCE_FLAGS = frozenset({"sref", "oref", "cref"})
# The weight flags, and the role of the pictures each one weighs.
WEIGHT_ROLES: Mapping[str, InputRole] = {
    "iw": InputRole.IMAGE_PROMPT,
    "sw": InputRole.STYLE,
    "ow": InputRole.OBJECT,
    "cw": InputRole.OBJECT,
}


@dataclass(frozen=True)
class ImageRef:
    """One picture a job asks for: a link to fetch, or an attachment (`attachment:<name>`)."""

    role: InputRole
    source: str
    weight: float
    asked_by: str  # for messages: "prompt", "image", "--sref" …

    @property
    def is_link(self) -> bool:
        return not self.source.startswith(ATTACHMENT_PREFIX)


def image_references(
    values: Mapping[str, object],
    typed: Mapping[str, str],
    leading_links: Sequence[str],
    attachments: Sequence[str],
    notes: list[str],
    kept: frozenset[InputRole] = frozenset(),
) -> tuple[ImageRef, ...]:
    """Every picture the prompt and options ask for, in order: attachments, prompt links,
    style, object and character references. `values`/`typed` are the parsed inline flags by
    canonical name; notes say what was ignored. A weight for a role in `kept` (pictures the
    job keeps from the one it comes from) is not ignored: the caller applies it to them."""

    def weight(name: str, default: float) -> float:
        return float(values[name]) if name in values else default  # type: ignore[arg-type]

    def words(name: str) -> tuple[str, ...]:
        return values.get(name, ())  # type: ignore[return-value]

    def unused_weight(name: str, needs: str) -> None:
        if name in values and WEIGHT_ROLES[name] not in kept:
            notes.append(f"{typed[name]} {values[name]:g} ignored (no {needs})")

    refs: list[ImageRef] = []
    image_weight = weight("iw", DEFAULT_IMAGE_WEIGHT)
    refs += [
        ImageRef(InputRole.IMAGE_PROMPT, source, image_weight, "image") for source in attachments
    ]
    refs += [
        ImageRef(InputRole.IMAGE_PROMPT, link, image_weight, "prompt") for link in leading_links
    ]
    if not refs:
        unused_weight("iw", "image prompt")

    style_links = [word for word in words("sref") if LINK.fullmatch(word)]
    for code in dict.fromkeys(word for word in words("sref") if not LINK.fullmatch(word)):
        notes.append(
            f"{typed['sref']} {shown_fragment(code)} ignored (a Midjourney style code: it can't "
            "be reproduced here; give an image link instead)"
        )
    style_weight = weight("sw", DEFAULT_STYLE_WEIGHT)
    refs += [ImageRef(InputRole.STYLE, link, style_weight, typed["sref"]) for link in style_links]
    if not style_links:
        unused_weight("sw", "--sref image link")

    object_weight = weight("ow", DEFAULT_OBJECT_WEIGHT)
    refs += [
        ImageRef(InputRole.OBJECT, link, object_weight, typed["oref"]) for link in words("oref")
    ]
    if "oref" not in values:
        unused_weight("ow", "--oref image link")
    character_weight = weight("cw", DEFAULT_CHARACTER_WEIGHT)
    refs += [
        ImageRef(InputRole.OBJECT, link, character_weight, typed["cref"]) for link in words("cref")
    ]
    if "cref" not in values:
        unused_weight("cw", "--cref image link")

    unique = list({(ref.role, ref.source): ref for ref in refs}.values())
    for role in InputRole:
        mine = [ref for ref in unique if ref.role is role]
        if len(mine) > MAX_PICTURES_PER_ROLE:
            asked_by = mine[-1].asked_by
            flag = "prompt" if asked_by in ("prompt", "image") else asked_by
            raise PromptError(
                flag,
                f"{flag}: at most {MAX_PICTURES_PER_ROLE} {_ROLE_WORDS[role]} per job, "
                f"got {len(mine)}",
            )
    return tuple(unique)


_ROLE_WORDS = {
    InputRole.IMAGE_PROMPT: "image prompts",
    InputRole.STYLE: "style references",
    InputRole.OBJECT: "object or character references",
    InputRole.MASK: "masks",
    InputRole.CONTROL: "control images",
}
