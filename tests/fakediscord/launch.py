"""Run a module with discord.py pointed at a fake Discord, for bots that need their own process.

    python -m tests.fakediscord.launch --url http://127.0.0.1:PORT -m bot --config x.toml

patches the two redirect attributes and runs the module as ``__main__`` (so a test can kill it
with SIGKILL and start it again). ``FakeDiscord.subprocess_argv("bot", ...)`` builds this argv.
"""

from __future__ import annotations

import argparse
import runpy
import sys

from tests.fakediscord.redirect import redirect_discord


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run a module against a fake Discord.")
    parser.add_argument("--url", required=True, help="the fake's base URL, http://127.0.0.1:PORT")
    parser.add_argument("-m", dest="module", required=True, help="module to run as __main__")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments for that module")
    options = parser.parse_args(argv)
    with redirect_discord(options.url):
        sys.argv = [options.module, *options.args]
        runpy.run_module(options.module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
