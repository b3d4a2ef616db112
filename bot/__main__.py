"""`python -m bot` / `imagine-bot`: start the Discord bot, or the console front end with --shell."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence

from bot.app.logs import setup_logging
from bot.config import ConfigError, load_config
from bot.config.web import take_web_secrets
from bot.core.worker_env import forget_token

log = logging.getLogger(__name__)

EXIT_USAGE = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imagine-bot",
        description="A self-hosted Midjourney-style image bot for Discord.",
        epilog="The bot token is read from the DISCORD_TOKEN environment variable only.",
    )
    parser.add_argument("--config", default="config.toml", help="path to config.toml")
    parser.add_argument(
        "--shell",
        action="store_true",
        help="run the same commands in this terminal instead of Discord (no token needed)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"imagine-bot: bad config: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if config.workers.backend == "ray":
        from bot.core.ray_workers import RayNotInstalled, import_ray

        try:
            import_ray(config.workers.ray_address)
        except RayNotInstalled as exc:
            print(f"imagine-bot: {exc}", file=sys.stderr)
            return EXIT_USAGE
    # Read once and taken out of the environment: nothing started from here on (worker
    # processes, a local Ray cluster) inherits it.
    token = forget_token()
    web_secrets = take_web_secrets()
    setup_logging(
        config.log_level,
        secrets=[token, web_secrets.signing_key, web_secrets.client_secret],
    )

    from bot.core.storage import DataFolderInUse

    if args.shell:
        from bot.console.shell import run_shell

        try:
            return asyncio.run(run_shell(config))
        except DataFolderInUse as exc:
            print(f"imagine-bot: {exc}", file=sys.stderr)
            return EXIT_USAGE
    if not token:
        print(
            "imagine-bot: DISCORD_TOKEN is not set (export it, or use --shell to try the bot "
            "in this terminal)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if not config.discord.guild_ids:
        # Serving every server would hand the bot to whoever invites it (README, Security).
        print(
            "imagine-bot: [discord] guild_ids is empty: list the ids of the servers this bot "
            "serves in config.toml (it answers no other server)",
            file=sys.stderr,
        )
        return EXIT_USAGE

    import discord

    from bot.discord.client import run_discord
    from bot.web.server import start_web

    try:
        asyncio.run(run_discord(config, token, web_secrets=web_secrets, companions=(start_web,)))
    except discord.LoginFailure:
        print("imagine-bot: Discord refused the token in DISCORD_TOKEN", file=sys.stderr)
        return EXIT_USAGE
    except DataFolderInUse as exc:
        print(f"imagine-bot: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
