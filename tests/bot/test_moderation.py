"""Moderation: prompt normalisation and filter, and the image safety check with the real
open_nsfw classifier, real files and a real SQLite audit table.

The "flagged" test image is an abstract 8x8 colour mosaic, smoothly upscaled: it was found by a
random search against the model and scores above 0.95, while plain colours and gradients score
near zero. That lets every policy branch run through the real classifier with nothing
objectionable in the repository.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from bot.app.moderation import (
    FLAGS_FILE,
    WITHHELD_REASON,
    ImageSafety,
    PromptFilter,
    Refusal,
    audit_refusal,
    flagged_indices,
    make_output_check,
    normalize_for_matching,
    squash_for_matching,
)
from bot.config import Config, ModerationConfig
from bot.core import Core, Finished, InProcessWorker, ManualClock
from bot.core.audit import AuditLog
from bot.core.db import Database
from bot.core.execute import WorkOutcome
from bot.core.models import Job, JobKind, JobResult, JobState, Owner
from generation.contract import GenerationRequest, GenerationResult
from generation.contract import JobKind as GenerationKind
from generation.settings import EngineSettings

# ----- test images -----------------------------------------------------------------------------

_MOSAIC_RGB = bytes.fromhex(
    "be9bdcf2ab2bd1b298f89192bd4dadddb0e3a67c72ffc6ae9f78c4f9c39df2b24ece9ed7cb8688853940a68d"
    "a2dba79ce5adb5b0cabeff90cfc8a8a2f7c0cfd08f8ada9d85d7a275e3427effbeeee2917cea809fffc4d1da"
    "91ac9dad60bce9628cad9ced9970ff4387b2ec75ff8fb4f65bbad0ff7b738f55dfa231ff4765e9af99f1ec9a"
    "f9a6c9d96193ebe059cc80b2bed68cfeda55eae7aac339e0a3dd8de052edffb3c9f9b64ab28592f29fffeb3b"
    "99ffcb9acadad4b0ff23b4dd7cc867a4"
)


def mosaic(size: int = 256) -> Image.Image:
    """The abstract image the classifier scores high (see the module docstring)."""
    cells = np.frombuffer(_MOSAIC_RGB, dtype=np.uint8).reshape(8, 8, 3)
    return Image.fromarray(cells).resize((size, size), Image.Resampling.BILINEAR)


def gradient(size: int = 256) -> Image.Image:
    ramp = np.linspace(0, 255, size, dtype=np.uint8)
    return Image.fromarray(np.stack([np.tile(ramp, (size, 1))] * 3, axis=-1))


def solid(colour: tuple[int, int, int], size: int = 256) -> Image.Image:
    return Image.new("RGB", (size, size), colour)


# ----- normalisation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("n\u200bsfw", "nsfw"),  # zero-width space
        ("n\u200c\u200ds\u2060f\ufeffw", "nsfw"),  # joiners, word joiner, BOM
        ("\u202ensfw\u202c", "nsfw"),  # bidi override
        ("\u2066ns\u00adfw\u2069", "nsfw"),  # bidi isolates, soft hyphen
        ("n\u3164sfw", "nsfw"),  # Hangul filler, an "invisible" letter
        ("ｎｓｆｗ", "nsfw"),  # full-width
        ("𝐧𝐬𝐟𝐰", "nsfw"),  # mathematical bold
        ("ⓝⓢⓕⓦ", "nsfw"),  # circled
        ("NSFW", "nsfw"),
        ("nѕfw", "nsfw"),  # Cyrillic dze
        ("ѕех", "sex"),  # all Cyrillic
        ("ΑΡΕ", "ape"),  # Greek capitals
        ("GÖRE", "gore"),
        ("g̷̛o̶r̸e̵", "gore"),  # combining-mark "zalgo"
        ("Straße", "strasse"),
        ("  a\tcat\n\u00a0on\u3000a  mat  ", "a cat on a mat"),
        ("a\x00b\x1bc", "abc"),
        ("", ""),
    ],
)
def test_normalize_for_matching(text: str, expected: str) -> None:
    assert normalize_for_matching(text) == expected


def test_normalize_keeps_other_scripts_readable() -> None:
    assert normalize_for_matching("한국어 日本語") == "한국어 日本語"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("n.s.f.w", "nsfw"),
        ("n s f w", "nsfw"),
        ("n . s . f . w art", "nsfw art"),
        ("n-sfw", "nsfw"),
        ("(nsfw)!", "nsfw"),
        ("a cat on a mat", "a cat on a mat"),
        ("an al fresco lunch", "an al fresco lunch"),
        ("x y z and more", "xyz and more"),
        ("...", ""),
    ],
)
def test_squash_for_matching(text: str, expected: str) -> None:
    assert squash_for_matching(normalize_for_matching(text)) == expected


# ----- prompt filter ---------------------------------------------------------------------------

BANNED = ModerationConfig(banned_words=("nsfw", "ass", "Gore", "hate speech"))


@pytest.mark.parametrize(
    ("prompt", "term"),
    [
        ("nsfw", "nsfw"),
        ("a NSFW photo", "nsfw"),
        ("n\u200bsfw", "nsfw"),
        ("ｎｓｆｗ portrait", "nsfw"),
        ("nѕfw", "nsfw"),
        ("ΝЅFW", "nsfw"),  # Greek Nu, Cyrillic Dze
        ("n.s.f.w", "nsfw"),
        ("n s f w", "nsfw"),
        ("N-S-F-W art", "nsfw"),
        ("painting, (nsfw:1.4)", "nsfw"),
        ("kick ass", "ass"),
        ("ass_hat", "ass"),
        ("a.s.s", "ass"),
        ("GÖRE everywhere", "Gore"),
        ("hate   speech", "hate speech"),
        ("hate-speech", "hate speech"),
        ("h a t e s p e e c h", "hate speech"),
    ],
)
def test_banned_words_are_found_after_normalisation(prompt: str, term: str) -> None:
    refusal = PromptFilter(BANNED).check(prompt)
    assert refusal is not None, prompt
    assert refusal.term == term and refusal.rule == "word"
    assert refusal.reason == f"Your prompt contains a blocked term (“{term}”). Please rephrase."


@pytest.mark.parametrize(
    "prompt",
    [
        "a class photo",
        "assassin's creed",
        "a glass of water",
        "bass guitar, passage, embassy",
        "an al fresco lunch",  # "anal" only by gluing two real words together
        "gorgeous gorge",
        "speech about hate",
        "a cat on a mat",
    ],
)
def test_innocent_words_containing_banned_words_pass(prompt: str) -> None:
    assert PromptFilter(BANNED).check(prompt) is None


def test_banned_words_are_normalised_too() -> None:
    prompt_filter = PromptFilter(ModerationConfig(banned_words=("ＮＳＦＷ", "  ", "\u200b")))
    refusal = prompt_filter.check("nsfw")
    assert refusal is not None and refusal.term == "ＮＳＦＷ"
    assert prompt_filter.check("a quiet lake") is None


def test_longest_overlapping_word_is_reported() -> None:
    prompt_filter = PromptFilter(ModerationConfig(banned_words=("blood", "blood bath")))
    refusal = prompt_filter.check("a BLOOD  BATH")
    assert refusal is not None and refusal.term == "blood bath"


def test_patterns_match_the_normalised_prompt() -> None:
    config = ModerationConfig(banned_patterns=(r"\bnud(e|ity)\b", r"<@!?\d+>"))
    prompt_filter = PromptFilter(config)
    for prompt in ("nude figure", "NUDITY", "nu\u200bde", "ｎｕｄｅ"):
        refusal = prompt_filter.check(prompt)
        assert refusal is not None and refusal.rule == "pattern", prompt
    refusal = prompt_filter.check("a NUDE figure")
    assert refusal == Refusal(
        reason="Your prompt contains blocked text (“nude”). Please rephrase.",
        term="nude",
        rule="pattern",
    )
    # A fragment that is not plain text is not echoed back into the channel.
    refusal = prompt_filter.check("draw <@123456>")
    assert refusal is not None and refusal.term == "<@123456>"
    assert refusal.reason == "Your prompt matches a blocked pattern. Please rephrase."
    assert prompt_filter.check("a nudibranch") is None


def test_empty_config_blocks_nothing() -> None:
    prompt_filter = PromptFilter(ModerationConfig())
    for prompt in ("nsfw", "", " ", "n\u200bsfw", "x" * 10_000, "\u202e<@1> ```sql```"):
        assert prompt_filter.check(prompt) is None


def test_refusal_is_immutable() -> None:
    refusal = PromptFilter(BANNED).check("nsfw")
    assert refusal is not None
    with pytest.raises(AttributeError):
        refusal.reason = "changed"  # type: ignore[misc]


def test_filter_is_fast_on_long_prompts() -> None:
    words = (*(f"bannedword{i}" for i in range(300)), "nsfw")
    patterns = (r"\bnud(e|ity)\b", r"blood\s*bath")
    prompt_filter = PromptFilter(ModerationConfig(banned_words=words, banned_patterns=patterns))
    long_prompt = "a b c " * 500 + "n.s.f.w " + "Зимний лес, ｆｕｌｌ ｗｉｄｔｈ\u200b " * 200
    started = time.perf_counter()
    for _ in range(10):
        refusal = prompt_filter.check(long_prompt)
    elapsed = (time.perf_counter() - started) / 10
    assert refusal is not None and refusal.term == "nsfw"
    # Measured around 5 ms; the bound only catches a pathological regression.
    assert elapsed < 0.25


# ----- image safety with the real classifier ---------------------------------------------------


@pytest.fixture(scope="module")
def safety() -> ImageSafety:
    classifier = ImageSafety()
    classifier.load()
    return classifier


def test_plain_images_score_low(safety: ImageSafety) -> None:
    images = [
        solid((0, 0, 0)),
        solid((255, 255, 255)),
        solid((40, 90, 200)),
        solid((30, 160, 60)),
        gradient(),
        gradient(512),
    ]
    scores = safety.score(images)
    assert len(scores) == len(images)
    assert all(0.0 <= s < 0.2 for s in scores), scores


def test_mosaic_scores_high(safety: ImageSafety) -> None:
    (high_256, high_512) = safety.score([mosaic(256), mosaic(512)])
    assert high_256 > 0.9 and high_512 > 0.9


def test_batches_keep_order_and_match_single_scores(safety: ImageSafety) -> None:
    images = [gradient(), mosaic(), solid((200, 30, 30)), mosaic(512), gradient(128)]
    singles = [safety.score([image])[0] for image in images]
    batched = ImageSafety(batch_size=2).score(images)
    assert batched == pytest.approx(singles, abs=1e-5)
    assert safety.score([]) == []


async def test_ascore_runs_in_a_thread(safety: ImageSafety) -> None:
    loop_thread = threading.get_ident()
    seen: list[int] = []
    original = safety.score

    def spy(images: Any) -> list[float]:
        seen.append(threading.get_ident())
        return original(images)

    safety.score = spy  # type: ignore[method-assign]
    try:
        scores = await safety.ascore([gradient(), mosaic()])
    finally:
        del safety.score
    assert seen and seen[0] != loop_thread
    assert scores[0] < 0.2 < 0.9 < scores[1]


def test_concurrent_first_use_loads_once_and_agrees() -> None:
    fresh = ImageSafety()
    images = [gradient(), mosaic()]
    results: list[list[float]] = []
    classifiers: list[object] = []

    def work() -> None:
        results.append(fresh.score(images))
        classifiers.append(fresh._classifier)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 4 and len({id(c) for c in classifiers}) == 1
    for scores in results:
        assert scores == pytest.approx(results[0], abs=1e-6)


# ----- the output check ------------------------------------------------------------------------

ALICE = 11
GUILD = 500
PUBLIC_CHANNEL = 700
NSFW_CHANNEL = 701


@pytest.fixture
async def audit(tmp_path: Path) -> AsyncIterator[AuditLog]:
    db = await Database.open(tmp_path / "audit.sqlite3")
    yield AuditLog(db, ManualClock(datetime(2025, 3, 1, 12, 0, tzinfo=UTC)))
    await db.close()


def save_job_images(data_dir: Path, job_id: int, images: list[Image.Image]) -> WorkOutcome:
    out_dir = data_dir / "images" / str(job_id)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, image in enumerate(images):
        image.save(out_dir / f"{index}.png")
        paths.append(f"images/{job_id}/{index}.png")
    return WorkOutcome(
        image_paths=tuple(paths),
        grid_path=paths[0],
        seeds=tuple(range(len(images))),
        clip_scores=tuple(0.5 for _ in images),
    )


def make_job(job_id: int, channel_id: int, outcome: WorkOutcome | None = None) -> Job:
    result = None
    if outcome is not None:
        result = JobResult(
            image_paths=outcome.image_paths,
            grid_path=outcome.grid_path,
            seeds=outcome.seeds,
            clip_scores=outcome.clip_scores,
        )
    return Job(
        id=job_id,
        owner=Owner(user_id=ALICE, guild_id=GUILD, channel_id=channel_id),
        kind=JobKind.IMAGINE,
        request_data={"prompt": "an abstract mosaic"},
        state=JobState.RUNNING,
        cost=4,
        attempts=1,
        created_at=datetime(2025, 3, 1, 12, 0, tzinfo=UTC),
        result=result,
    )


def is_nsfw_channel(channel_id: int | None) -> bool:
    return channel_id == NSFW_CHANNEL


async def test_withhold_refuses_and_audits_each_flagged_image(
    tmp_path: Path, audit: AuditLog, safety: ImageSafety
) -> None:
    data_dir = tmp_path / "data"
    outcome = save_job_images(data_dir, 7, [gradient(), mosaic(), mosaic(512)])
    config = ModerationConfig(nsfw_policy="withhold")
    check = make_output_check(config, data_dir, is_nsfw_channel, audit, safety)

    assert await check(make_job(7, PUBLIC_CHANNEL), outcome) == WITHHELD_REASON

    entries = await audit.recent()
    assert [e.kind for e in entries] == ["nsfw_flag", "nsfw_flag"]
    assert {(e.user_id, e.job_id, e.guild_id, e.channel_id) for e in entries} == {
        (ALICE, 7, GUILD, PUBLIC_CHANNEL)
    }
    reasons = sorted(e.reason for e in entries)
    assert reasons[0].startswith("image 1 scored 0.9") and reasons[0].endswith("; withheld")
    assert reasons[1].startswith("image 2 scored 0.9")
    assert entries[0].prompt == "an abstract mosaic"
    record = json.loads((data_dir / "images" / "7" / FLAGS_FILE).read_text())
    assert record["flagged"] == [1, 2] and record["withheld"] is True
    assert record["scores"][0] < 0.2


async def test_spoiler_accepts_and_records_flagged_indices(
    tmp_path: Path, audit: AuditLog, safety: ImageSafety
) -> None:
    data_dir = tmp_path / "data"
    outcome = save_job_images(data_dir, 8, [gradient(), mosaic(), solid((30, 160, 60))])
    check = make_output_check(ModerationConfig(), data_dir, is_nsfw_channel, audit, safety)
    job = make_job(8, PUBLIC_CHANNEL)

    assert await check(job, outcome) is None

    done = make_job(8, PUBLIC_CHANNEL, outcome)
    assert await flagged_indices(data_dir, done) == {1}
    assert await check.flagged_indices(done) == {1}
    (entry,) = await audit.recent()
    assert entry.kind == "nsfw_flag" and entry.job_id == 8
    assert entry.reason.endswith("; posted as spoiler")


async def test_age_restricted_channel_allows_everything(
    tmp_path: Path, audit: AuditLog, safety: ImageSafety
) -> None:
    data_dir = tmp_path / "data"
    outcome = save_job_images(data_dir, 9, [mosaic()])
    for policy in ("spoiler", "withhold"):
        config = ModerationConfig(nsfw_policy=policy)
        check = make_output_check(config, data_dir, is_nsfw_channel, audit, safety)
        assert await check(make_job(9, NSFW_CHANNEL), outcome) is None
    assert await audit.recent() == []
    assert await flagged_indices(data_dir, make_job(9, NSFW_CHANNEL, outcome)) == set()


async def test_clean_images_pass_without_audit(
    tmp_path: Path, audit: AuditLog, safety: ImageSafety
) -> None:
    data_dir = tmp_path / "data"
    outcome = save_job_images(data_dir, 10, [gradient(), solid((40, 90, 200))])
    config = ModerationConfig(nsfw_policy="withhold")
    check = make_output_check(config, data_dir, is_nsfw_channel, audit, safety)
    assert await check(make_job(10, PUBLIC_CHANNEL), outcome) is None
    assert await audit.recent() == []
    assert await flagged_indices(data_dir, make_job(10, PUBLIC_CHANNEL, outcome)) == set()


class _MustNotScore(ImageSafety):
    def score(self, images: Any) -> list[float]:
        raise AssertionError("the classifier must not run")


async def test_disabled_check_scores_nothing(tmp_path: Path, audit: AuditLog) -> None:
    data_dir = tmp_path / "data"
    outcome = save_job_images(data_dir, 11, [mosaic()])
    config = ModerationConfig(nsfw_check=False)
    check = make_output_check(config, data_dir, is_nsfw_channel, audit, _MustNotScore())
    assert await check(make_job(11, PUBLIC_CHANNEL), outcome) is None
    assert not (data_dir / "images" / "11" / FLAGS_FILE).exists()


async def test_unreadable_flag_record_counts_every_image_flagged(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    outcome = save_job_images(data_dir, 12, [gradient(), gradient()])
    job = make_job(12, PUBLIC_CHANNEL, outcome)
    assert await flagged_indices(data_dir, job) == set()
    (data_dir / "images" / "12" / FLAGS_FILE).write_text("{not json")
    assert await flagged_indices(data_dir, job) == {0, 1}
    assert await flagged_indices(data_dir, make_job(12, PUBLIC_CHANNEL)) == set()


async def test_audit_log_can_be_attached_after_construction(
    tmp_path: Path, audit: AuditLog, safety: ImageSafety
) -> None:
    data_dir = tmp_path / "data"
    outcome = save_job_images(data_dir, 13, [mosaic()])
    check = make_output_check(ModerationConfig(), data_dir, is_nsfw_channel, None, safety)
    assert await check(make_job(13, PUBLIC_CHANNEL), outcome) is None  # logged, not lost
    check.audit = audit
    assert await check(make_job(13, PUBLIC_CHANNEL), outcome) is None
    assert [e.kind for e in await audit.recent()] == ["nsfw_flag"]


async def test_audit_refusal_records_the_blocked_prompt(audit: AuditLog) -> None:
    refusal = PromptFilter(BANNED).check("n.s.f.w please")
    assert refusal is not None
    await audit_refusal(
        audit,
        user_id=ALICE,
        guild_id=GUILD,
        channel_id=PUBLIC_CHANNEL,
        prompt="n.s.f.w please",
        reason=refusal.reason,
    )
    (entry,) = await audit.recent()
    assert (entry.kind, entry.user_id, entry.guild_id, entry.channel_id) == (
        "prompt_blocked",
        ALICE,
        GUILD,
        PUBLIC_CHANNEL,
    )
    assert entry.prompt == "n.s.f.w please" and "nsfw" in entry.reason


# ----- through the real scheduler --------------------------------------------------------------


class MosaicEngine:
    """Generates a gradient, plus the mosaic when the prompt asks for one."""

    def generate(
        self, request: GenerationRequest, progress: Any = None, cancel: Any = None
    ) -> GenerationResult:
        images = [gradient(request.width), gradient(request.width)]
        if "mosaic" in request.prompt:
            images[1] = mosaic(request.width)
        return GenerationResult(
            images=tuple(images),
            seeds=(request.seed, request.seed + 1),
            clip_scores=(0.5, 0.4),
            candidate_indices=(0, 1),
        )


async def run_one(
    tmp_path: Path, policy: str, channel_id: int, prompt: str, safety: ImageSafety
) -> tuple[Core, Job]:
    config = Config(
        data_dir=tmp_path / "data",
        engine=EngineSettings(cache_dir=tmp_path / "models"),
        moderation=ModerationConfig(nsfw_policy=policy),
    )
    check = make_output_check(config.moderation, config.data_dir, is_nsfw_channel, None, safety)
    engine = MosaicEngine()
    worker = InProcessWorker(config.engine, config.data_dir, lambda _settings: engine)
    core = await Core.open(config, workers=[worker], output_check=check)
    check.audit = core.audit
    request = GenerationRequest(
        kind=GenerationKind.IMAGINE,
        prompt=prompt,
        width=256,
        height=256,
        steps=2,
        num_candidates=2,
        num_kept=2,
        seed=1,
    )
    owner = Owner(user_id=ALICE, guild_id=GUILD, channel_id=channel_id)
    job = await core.scheduler.submit(owner, request)
    async with asyncio.timeout(30):
        async with core.scheduler.subscribe(job.id) as events:
            async for event in events:
                if isinstance(event, Finished):
                    return core, event.job
    raise AssertionError("no Finished event")


async def test_withheld_job_is_refused_and_refunded(tmp_path: Path, safety: ImageSafety) -> None:
    core, job = await run_one(tmp_path, "withhold", PUBLIC_CHANNEL, "a mosaic", safety)
    try:
        assert job.state is JobState.REFUSED and job.error == WITHHELD_REASON
        balance = await core.credits.balance(ALICE)
        assert balance.available == core.config.credits.daily_allowance
        assert (await core.credits.check_consistency()).ok
        (entry,) = await core.audit.recent()
        assert entry.kind == "nsfw_flag" and entry.job_id == job.id
    finally:
        await core.close(1.0)


async def test_spoilered_job_succeeds_with_its_flag(tmp_path: Path, safety: ImageSafety) -> None:
    core, job = await run_one(tmp_path, "spoiler", PUBLIC_CHANNEL, "a mosaic", safety)
    try:
        assert job.state is JobState.SUCCEEDED
        assert await flagged_indices(core.config.data_dir, job) == {1}
        assert [e.kind for e in await core.audit.recent()] == ["nsfw_flag"]
    finally:
        await core.close(1.0)


async def test_job_in_age_restricted_channel_succeeds(tmp_path: Path, safety: ImageSafety) -> None:
    core, job = await run_one(tmp_path, "withhold", NSFW_CHANNEL, "a mosaic", safety)
    try:
        assert job.state is JobState.SUCCEEDED
        assert await flagged_indices(core.config.data_dir, job) == set()
        assert await core.audit.recent() == []
    finally:
        await core.close(1.0)
