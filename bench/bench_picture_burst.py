"""Bursts of /imagine commands full of image links, through the fake Discord (figures only).

    python -m bench.bench_picture_burst [--links 40] [--commands 5] [--side 4000]

no-credits: a member with no credits sends `--commands` `/imagine {link1,…,linkN} cat` at the
  same moment (the reported burst: once 200 fetches), while another member sends a plain
  /imagine; `--rounds` times in a row. Printed: fetches started (the fake CDN's GETs),
  event-loop lag (p50, p99, max) from a 10 ms sleeper over all rounds, and the longest the
  other member waited for an answer.
with-credits: the same burst from a member who can pay, with no cooldown, each link a
  `--side`² PNG (about what the pixel cap allows): every picture is fetched and decoded, a
  few at a time. Printed: fetches started, the most in flight at once against the limits,
  the loop lag, and how long the burst took to be queued.

The engine is the fake one (the pictures are the point); nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import io
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from PIL import Image

from bench._common import LagProbe, merge, percentile, tiny_config_sections, write_config
from bot.app.fetch import FetchPolicy
from bot.config import load_config
from bot.core import InProcessWorker
from tests.core.fakes import create_fake_engine

FAKE_CDN = FetchPolicy(
    allowed_hosts=frozenset({"127.0.0.1"}),
    allowed_schemes=frozenset({"http"}),
    allow_private_addresses=True,
)


def picture(side: int, shade: int) -> bytes:
    image = Image.new("RGB", (side, side), (shade % 256, 80, 160))
    for x in range(0, side, 50):
        image.paste(((x + shade) % 256, 20, 200), (x, 0, x + 10, side))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


async def burst(args: argparse.Namespace, root: Path, *, paying: bool) -> dict[str, Any]:
    from bot.discord.client import ImagineBot
    from tests.fakediscord import FakeDiscord

    async with FakeDiscord() as fake:
        sections = merge(
            tiny_config_sections(fake.guild_id, root / "models"),
            {
                "credits": {"daily_allowance": 0},
                "scheduler": {"max_queue": 1000, "max_queued_per_user": 1000},
                "discord": {"command_cooldown_s": 0.0 if paying else 5.0},
            },
        )
        config = load_config(write_config(root, sections))
        config = dataclasses.replace(
            config, engine=dataclasses.replace(config.engine, extra={"fake_step_s": "0.001"})
        )
        worker = InProcessWorker(config.engine, config.data_dir, create_fake_engine)
        bot = ImagineBot(
            config,
            core_options={"workers": [worker]},
            fetch_policy=FAKE_CDN,
            guild_ready_timeout=0.05,
        )
        member = fake.add_user("member")
        side = args.side if paying else 64
        links = [fake.host_file(f"p{n}.png", picture(side, n)) for n in range(args.links)]
        prompt = "{" + ", ".join(links) + "} cat"
        async with fake.run_bot(bot, timeout=60):
            if paying:
                await bot.core.admin.grant(user_id=member.id, amount=10**6, actor_id=1)
            probe = LagProbe()
            probe.start()
            started = time.perf_counter()
            answered_ms: list[float] = []
            rounds = args.rounds if not paying else 1
            for round_number in range(rounds):
                began = time.perf_counter()
                fired = await asyncio.gather(
                    *(fake.slash(member, "imagine", prompt=prompt) for _ in range(args.commands))
                )
                # Someone new each round, with credits and no cooldown of their own.
                other = fake.add_user(f"other{round_number}")
                await bot.core.admin.grant(user_id=other.id, amount=10**6, actor_id=1)
                plain = await fake.slash(other, "imagine", prompt="a lighthouse at dusk")
                await plain.wait_acked(timeout=30)
                answered_ms.append((time.perf_counter() - began) * 1000)
                for interaction in fired:
                    await interaction.wait_message(
                        lambda m: m.ephemeral and m.content, timeout=args.timeout_s
                    )
                # The other member's grid posted: the lag covers it.
                await plain.wait_original(lambda m: bool(m.attachments), timeout=args.timeout_s)
            done_s = time.perf_counter() - started
            lag = await probe.stop()
            pictures = bot.app.pictures
            return {
                "fetches started": fake.count("GET", "/cdn/attachments/*"),
                "most in flight": pictures.peak_in_flight,
                "limits": f"{config.images.max_fetches} bot, "
                f"{config.images.max_fetches_per_member} member",
                "loop lag p50/p99/max": "/".join(
                    f"{percentile(lag, q) * 1000:.1f}" for q in (50, 99, 100)
                )
                + " ms",
                "rounds, lag samples": f"{rounds}, {len(lag)}",
                "other member answered": f"max {max(answered_ms):.0f} ms",
                "all answered": f"{done_s:.2f} s",
            }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--links", type=int, default=40)
    parser.add_argument("--commands", type=int, default=5)
    parser.add_argument("--side", type=int, default=4000)
    parser.add_argument("--timeout-s", type=float, default=600.0)
    parser.add_argument("--rounds", type=int, default=20, help="no-credits bursts in a row")
    parser.add_argument("--only", choices=("no-credits", "with-credits"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="burst-") as folder:
        for name, paying in (("no-credits", False), ("with-credits", True)):
            if args.only not in (None, name):
                continue
            figures = await burst(args, Path(folder) / name, paying=paying)
            print(f"{name}: {args.commands} x /imagine with {args.links} links")
            for key, value in figures.items():
                print(f"  {key:>22}: {value}")


if __name__ == "__main__":
    asyncio.run(main())
