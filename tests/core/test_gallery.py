"""The web home's storage on a real SQLite file: keyset pages of a member's jobs and a server's
shared ones, prompt search through FTS5 kept in step by triggers (also when retention erases a
job), the filters, Explore's sharing rules, one-time links and the retention of web rows."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest

from bot.core.clock import ManualClock, to_db
from bot.core.db import Database, Transaction
from bot.core.gallery import FilterError, Gallery, GalleryFilter, fts_query
from bot.core.storage import prune_jobs
from bot.core.web_store import LinkUse, WebStore

GUILD = 500
OTHER_GUILD = 501
START = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    database = await Database.open(tmp_path / "bot.sqlite3")
    yield database
    await database.close()


async def add_job(
    db: Database,
    user_id: int,
    prompt: str,
    *,
    guild_id: int | None = GUILD,
    kind: str = "imagine",
    model: str = "tiny",
    size: tuple[int, int] = (512, 512),
    state: str = "succeeded",
    when: datetime = START,
) -> int:
    request = {"prompt": prompt, "model": model, "width": size[0], "height": size[1]}
    result = {
        "image_paths": ["images/x/1.png"],
        "grid_path": None,
        "seeds": [1],
        "clip_scores": [0],
    }

    async def work(txn: Transaction) -> int:
        return await txn.insert(
            "INSERT INTO jobs (user_id, guild_id, channel_id, kind, request, state, cost, "
            "hold_allowance, hold_granted, hold_day, created_at, finished_at, result) "
            "VALUES (?, ?, 1, ?, ?, ?, 1, 0, 0, '2025-03-01', ?, ?, ?)",
            (
                user_id,
                guild_id,
                kind,
                json.dumps(request),
                state,
                to_db(when),
                to_db(when),
                json.dumps(result) if state == "succeeded" else None,
            ),
        )

    return await db.transaction(work)


async def test_keyset_pages_cover_every_job_once_newest_first(db: Database) -> None:
    ids = [await add_job(db, 1, f"picture number {n}") for n in range(23)]
    await add_job(db, 2, "someone else's picture")
    gallery = Gallery(db)
    seen, before = [], None
    while True:
        page = await gallery.member_page(1, GalleryFilter(), before, size=5)
        seen += [item.job_id for item in page.items]
        assert all(item.user_id == 1 for item in page.items)
        if page.next_before is None:
            break
        before = page.next_before
    assert seen == sorted(ids, reverse=True)
    # The query walks the index from the last id: no OFFSET anywhere.
    plan = await db.read(
        "EXPLAIN QUERY PLAN SELECT j.id FROM jobs j WHERE j.user_id = ? AND j.id < ? "
        "ORDER BY j.id DESC LIMIT 5",
        (1, 10),
    )
    assert any("jobs_user_id" in str(row["detail"]) for row in plan), [r["detail"] for r in plan]


async def test_search_and_filters(db: Database) -> None:
    fox = await add_job(db, 1, "a red fox in the snow", size=(768, 512))
    café = await add_job(db, 1, "a cozy café at night", model="sd15", size=(512, 768))
    await add_job(db, 1, "a red barn", kind="variation", when=START + timedelta(days=3))
    await add_job(db, 2, "a red fox for bob")
    gallery = Gallery(db)

    async def found(**kwargs: object) -> list[str]:
        page = await gallery.member_page(1, GalleryFilter(**kwargs))  # type: ignore[arg-type]
        return [item.prompt for item in page.items]

    assert await found(text="fox") == ["a red fox in the snow"]
    assert await found(text="red") == ["a red barn", "a red fox in the snow"]
    # Accents don't matter, and the last word is a prefix (search as you type).
    assert await found(text="cafe") == ["a cozy café at night"]
    assert await found(text="sno") == ["a red fox in the snow"]
    assert await found(model="sd15") == ["a cozy café at night"]
    assert await found(aspect="portrait") == ["a cozy café at night"]
    assert await found(aspect="3:2") == ["a red fox in the snow"]
    assert await found(kind="variation") == ["a red barn"]
    assert await found(since=date(2025, 3, 2)) == ["a red barn"]
    assert await found(until=date(2025, 3, 1), text="red") == ["a red fox in the snow"]
    # What a member types is words, never FTS5 syntax: quotes, operators, stars, columns.
    for hostile in ('"', "fox OR barn", "NEAR(red fox)", "prompt:fox", "*", "red -fox", "^fox"):
        await gallery.member_page(1, GalleryFilter(text=hostile))
    assert await found(text="fox OR barn") == []
    assert await found(text="!!!") == []
    assert fts_query('say "hi" now') == '"say" AND "hi" AND "now"*'
    with pytest.raises(FilterError):
        GalleryFilter(kind="sculpture")
    with pytest.raises(FilterError):
        GalleryFilter(aspect="wide")
    with pytest.raises(FilterError):
        GalleryFilter(since=date(2025, 3, 2), until=date(2025, 3, 1))
    assert {fox, café}


async def test_retention_erasing_a_job_takes_its_prompt_out_of_search(db: Database) -> None:
    old = await add_job(db, 1, "an old lighthouse", when=START - timedelta(days=200))
    await add_job(db, 1, "a new lighthouse")
    await db.transaction(
        lambda txn: txn.execute(
            "UPDATE jobs SET images_expired_at = ? WHERE id = ?", (to_db(START), old)
        )
    )
    gallery = Gallery(db)
    before = await gallery.member_page(1, GalleryFilter(text="lighthouse"))
    assert len(before.items) == 2
    clock = ManualClock(START)
    assert await prune_jobs(db, clock, 90) == [old]
    after = await gallery.member_page(1, GalleryFilter(text="lighthouse"))
    assert [item.prompt for item in after.items] == ["a new lighthouse"]
    rows = await db.read("SELECT rowid FROM job_search WHERE rowid = ?", (old,))
    assert rows == []


async def test_explore_shows_a_servers_shared_finished_jobs(db: Database) -> None:
    store = WebStore(db, ManualClock(START))
    gallery = Gallery(db)
    shared = await add_job(db, 1, "alice shares this")
    await add_job(db, 1, "alice in another server", guild_id=OTHER_GUILD)
    await add_job(db, 1, "alice's failed job", state="failed")
    quiet = await add_job(db, 2, "bob never chose")
    await add_job(db, 3, "carol said no")
    await store.set_share(1, True)
    await store.set_share(3, False)

    async def explore(guild: int = GUILD) -> list[int]:
        return [i.job_id for i in (await gallery.explore_page(guild, GalleryFilter())).items]

    # Off by default: only alice, who turned it on; only finished jobs of this server.
    assert await explore() == [shared]
    assert await store.shares(2, GUILD) is False
    # The server's default covers members who never chose, not those who said no.
    await store.set_guild_default(GUILD, True, actor_id=99)
    assert await explore() == [quiet, shared]
    assert await store.shares(2, GUILD) is True and await store.shares(3, GUILD) is False
    assert await explore(OTHER_GUILD) != []  # alice shares everywhere she chose to
    await store.set_share(1, False)
    assert await explore() == [quiet]
    assert await gallery.member_guilds(1, [GUILD, OTHER_GUILD, 777]) == [GUILD, OTHER_GUILD]


async def test_a_link_is_used_once_and_web_rows_are_pruned(db: Database) -> None:
    clock = ManualClock(START)
    store = WebStore(db, clock)
    await store.add_link("h1", 1, "alice", GUILD, "none", ttl_s=600)
    assert (await store.use_link("h1"))[0] is LinkUse.OK
    assert await store.use_link("h1") == (LinkUse.USED, None)
    assert await store.use_link("nope") == (LinkUse.UNKNOWN, None)
    await store.add_link("h2", 1, "alice", GUILD, "none", ttl_s=600)
    clock.advance(seconds=601)
    assert await store.use_link("h2") == (LinkUse.EXPIRED, None)
    await store.add_session(
        "s1", user_id=1, name="alice", guild_id=None, admin_scope="none", via="link", ttl_s=60
    )
    assert await store.session("s1") is not None
    clock.advance(seconds=61)
    assert await store.session("s1") is None
    # A day after expiry the links go (a replay until then is told "used"); the session too.
    assert await store.prune() == 1
    clock.advance(days=1)
    assert await store.prune() == 2
    assert await db.read("SELECT * FROM web_links") == []


async def test_a_jobs_thumbnails_go_with_its_images(db: Database, tmp_path: Path) -> None:
    from bot.core.storage import prune_images
    from bot.web.thumbnails import Thumbnails

    job = await add_job(db, 1, "an old fox", when=START - timedelta(days=40))
    thumb = Thumbnails(tmp_path).path_for(job, 0)
    thumb.parent.mkdir(parents=True)
    thumb.write_bytes(b"jpeg")
    assert await prune_images(db, tmp_path, ManualClock(START), 30) == [job]
    assert not thumb.exists()
