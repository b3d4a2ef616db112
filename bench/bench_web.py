"""The web home's pages with 100,000 jobs in a real SQLite file (figures only, no assertions).

    python bench/bench_web.py [--jobs 100000] [--repeats 200] [--keep DIR]

Fills a fresh data folder through the bot's own migrations (the prompt-search triggers run on
every insert): 100,000 jobs of 50 members in two servers, half of them in one member's name (the
worst My images), a third of the members sharing in Explore. Then the real web app (bot/web,
its middlewares and session cookie included) serves each page `--repeats` times over a real
socket, one request at a time; each line gives the median and p95 of the time from sending the
request to the last byte of the page (an upper bound of the server's time: the client's share
is in it). The thumbnail lines: the first request makes it (off the event loop), the next
ones must come from the file on disk (made stays 1) or as 304 Not Modified.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiohttp
from aiohttp import web
from PIL import Image

from bot.app.application import ImagineApp
from bot.app.companions import open_services
from bot.app.sign_in import secret_hash
from bot.config import parse_config
from bot.config.web import WebSecrets
from bot.core import InProcessWorker
from bot.core.clock import system_clock, to_db
from bot.core.db import Database
from bot.core.service import Core
from bot.web.server import build_app, build_context
from bot.web.sessions import SESSION_COOKIE, session_cookie_value

GUILD, OTHER_GUILD = 1000, 2000
HEAVY_USER = 1
MEMBERS = 50
WORDS = (
    "red fox lighthouse dusk castle forest river neon city portrait dragon ocean mountain "
    "garden robot cat dog owl galaxy desert snow rain sunset cyberpunk watercolor oil "
    "painting photo cinematic misty golden hour ancient temple market bridge train"
).split()
MODELS = ("sd15", "sdxl", "tiny")
SIZES = ((512, 512), (768, 512), (512, 768), (912, 512))
KINDS = ("imagine",) * 6 + ("variation", "upscale", "zoom", "reroll")


def fill(path: Path, jobs: int, image: str) -> None:
    """`jobs` rows straight into the migrated database (one transaction per 10,000)."""
    rng = random.Random(7)
    start = datetime(2025, 1, 1, tzinfo=UTC)
    conn = sqlite3.connect(path)
    result = json.dumps(
        {
            "image_paths": [image] * 4,
            "grid_path": image,
            "seeds": [1, 2, 3, 4],
            "clip_scores": [0] * 4,
        }
    )
    batch = []
    for n in range(jobs):
        user = HEAVY_USER if n % 2 == 0 else rng.randrange(2, MEMBERS + 1)
        width, height = rng.choice(SIZES)
        prompt = " ".join(rng.sample(WORDS, 6))
        request = json.dumps(
            {"prompt": prompt, "model": rng.choice(MODELS), "width": width, "height": height}
        )
        when = to_db(start + timedelta(seconds=30 * n))
        guild = GUILD if rng.random() < 0.8 else OTHER_GUILD
        batch.append((user, guild, rng.choice(KINDS), request, when, when, result))
        if len(batch) == 10_000 or n == jobs - 1:
            conn.executemany(
                "INSERT INTO jobs (user_id, guild_id, channel_id, kind, request, state, cost, "
                "hold_allowance, hold_granted, hold_day, created_at, finished_at, result) "
                "VALUES (?, ?, 1, ?, ?, 'succeeded', 1, 0, 0, '2025-01-01', ?, ?, ?)",
                batch,
            )
            conn.commit()
            batch = []
    conn.executemany(
        "INSERT INTO explore_sharing (user_id, share, updated_at) VALUES (?, 1, '2025-01-01')",
        [(user,) for user in range(2, MEMBERS + 1, 3)],
    )
    conn.commit()
    conn.execute("ANALYZE")
    conn.close()


def percentiles(times_s: list[float]) -> str:
    ms = sorted(t * 1000 for t in times_s)
    p95 = ms[min(len(ms) - 1, int(len(ms) * 0.95))]
    return f"median {statistics.median(ms):6.1f} ms   p95 {p95:6.1f} ms"


async def timed(http: aiohttp.ClientSession, url: str, repeats: int) -> tuple[list[float], int]:
    times, size = [], 0
    for _ in range(repeats):
        began = time.perf_counter()
        async with http.get(url) as response:
            body = await response.read()
            if response.status != 200:
                raise SystemExit(f"{url}: HTTP {response.status}")
        times.append(time.perf_counter() - began)
        size = len(body)
    return times, size


async def run(jobs: int, repeats: int, folder: Path) -> None:
    data = folder / "data"
    config = parse_config(
        {
            "discord": {"guild_ids": [GUILD, OTHER_GUILD]},
            "web": {
                "enabled": True,
                "port": 8080,
                "member_requests_per_minute": 10**9,
                "ip_requests_per_minute": 10**9,
            },
            "storage": {
                "image_retention_days": 0,
                "job_retention_days": 0,
                "audit_retention_days": 0,
            },
        },
        base_dir=folder,
    )
    config = type(config)(**{**config.__dict__, "data_dir": data})
    db = await Database.open(config.database_path)
    await db.close()
    (data / "images" / "bench").mkdir(parents=True, exist_ok=True)
    Image.effect_noise((512, 512), 64).convert("RGB").save(data / "images" / "bench" / "1.png")
    began = time.perf_counter()
    await asyncio.to_thread(fill, config.database_path, jobs, "images/bench/1.png")
    took_s = time.perf_counter() - began
    print(f"filled {jobs:,} jobs (search index by the triggers) in {took_s:.1f} s")

    # No job runs here: a worker whose engine is never built.
    core = await Core.open(
        config, workers=[InProcessWorker(config.engine, config.data_dir, lambda _settings: None)]
    )
    try:
        services = open_services(
            config, core, ImagineApp(config, core), system_clock, WebSecrets("k" * 40), lambda: ()
        )
        ctx = build_context(services)
        runner = web.AppRunner(build_app(ctx), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        session_id = b"b" * 24
        await services.web_store.add_session(
            secret_hash(session_id),
            user_id=HEAVY_USER,
            name="heavy",
            guild_id=GUILD,
            admin_scope="none",
            via="link",
            ttl_s=3600,
        )
        cookies = {SESSION_COOKIE: session_cookie_value(services.signing_key, session_id)}
        counts = await core.db.read(
            "SELECT (SELECT count(*) FROM jobs) AS jobs, "
            "(SELECT count(*) FROM jobs WHERE user_id = ?) AS mine",
            (HEAVY_USER,),
        )
        middle = (await core.db.read("SELECT max(id) / 2 AS id FROM jobs"))[0]["id"]
        mine = (
            await core.db.read("SELECT max(id) AS id FROM jobs WHERE user_id = ?", (HEAVY_USER,))
        )[0]["id"]
        print(
            f"{counts[0]['jobs']:,} jobs, {counts[0]['mine']:,} of them the member's; "
            f"{config.web.page_size} thumbnails a page; {repeats} requests a line\n"
        )
        base = f"http://127.0.0.1:{port}"
        pages = [
            ("My images, first page", "/images"),
            ("My images, a page deep in the middle", f"/images?before={middle}"),
            ("My images, search 'fox' (about 1 in 6 jobs)", "/images?q=fox"),
            ("My images, search 'fox castle' (rarer)", "/images?q=fox+castle"),
            ("My images, model sdxl + portrait", "/images?model=sdxl&aspect=portrait"),
            ("My images, kind zoom, two weeks", "/images?kind=zoom&from=2025-01-05&to=2025-01-18"),
            ("Explore, first page", f"/explore?guild={GUILD}"),
            ("Explore, a page deep in the middle", f"/explore?guild={GUILD}&before={middle}"),
            ("Explore, search 'dragon'", f"/explore?guild={GUILD}&q=dragon"),
            ("A job's page", f"/jobs/{mine}"),
        ]
        async with aiohttp.ClientSession(cookies=cookies) as http:
            for name, path in pages:
                await timed(http, base + path, 3)  # warm the page cache and the templates
                times, size = await timed(http, base + path, repeats)
                print(f"{name:48} {percentiles(times)}   ({size // 1024} KiB)")
            job = (
                await core.db.read(
                    "SELECT max(id) AS id FROM jobs WHERE user_id = ?", (HEAVY_USER,)
                )
            )[0]["id"]
            thumb = f"{base}/jobs/{job}/thumbs/0.jpg"
            first, _ = await timed(http, thumb, 1)
            cached, _ = await timed(http, thumb, repeats)
            async with http.get(thumb) as response:
                etag = response.headers["ETag"]
            not_modified = []
            for _ in range(repeats):
                began = time.perf_counter()
                async with http.get(thumb, headers={"If-None-Match": etag}) as response:
                    assert response.status == 304
                not_modified.append(time.perf_counter() - began)
        print(f"\n{'thumbnail, first request (made now)':48} {first[0] * 1000:6.1f} ms")
        print(f"{'thumbnail, again (from disk)':48} {percentiles(cached)}")
        print(f"{'thumbnail, If-None-Match (304)':48} {percentiles(not_modified)}")
        print(f"thumbnails made: {ctx.thumbnails.made} (1 means every later request was cached)")
        await runner.cleanup()
    finally:
        await core.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--keep", type=Path, help="build the data folder here (kept)")
    args = parser.parse_args()
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        asyncio.run(run(args.jobs, args.repeats, args.keep))
        return
    with tempfile.TemporaryDirectory() as folder:
        asyncio.run(run(args.jobs, args.repeats, Path(folder)))


if __name__ == "__main__":
    main()
