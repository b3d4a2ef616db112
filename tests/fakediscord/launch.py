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
    arguments = list(sys.argv[1:] if argv is None else argv)
    # Everything after "-m MODULE" belongs to the module, options like --config included;
    # argparse's REMAINDER would try to read those as the launcher's own.
    if "-m" not in arguments or arguments.index("-m") + 1 >= len(arguments):
        parser.error("-m MODULE is required")
    split = arguments.index("-m")
    options = parser.parse_args(arguments[:split])
    module, module_args = arguments[split + 1], arguments[split + 2 :]
    with redirect_discord(options.url):
        sys.argv = [module, *module_args]
        runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
