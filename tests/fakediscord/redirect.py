"""Point an unmodified discord.py at the fake: two class attributes, nothing else.

In-process, ``FakeDiscord`` applies :func:`redirect_discord` itself. For a bot that must run in
its own process (to be killed with SIGKILL, say), run it through this module:

    python -m tests.fakediscord.redirect --url http://127.0.0.1:PORT -m bot --config x.toml

which patches the same two attributes and then runs the module as ``__main__``.
"""

from __future__ import annotations

import argparse
import runpy
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import discord.gateway
import discord.http
import yarl


@contextmanager
def redirect_discord(base_url: str) -> Iterator[None]:
    """Send discord.py's REST calls and gateway connection to ``base_url`` while active.

    ``Route.BASE`` is read each time a Route is built, and ``DEFAULT_GATEWAY`` on each connect
    (and after an invalidated session), so setting them before ``bot.start()`` is enough.
    """
    route, websocket = discord.http.Route, discord.gateway.DiscordWebSocket
    saved = route.BASE, websocket.DEFAULT_GATEWAY
    route.BASE = f"{base_url}/api/v10"
    websocket.DEFAULT_GATEWAY = yarl.URL(f"{base_url.replace('http', 'ws', 1)}/gateway")
    try:
        yield
    finally:
        route.BASE, websocket.DEFAULT_GATEWAY = saved


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="the fake's base URL, http://127.0.0.1:PORT")
    parser.add_argument("-m", dest="module", required=True, help="module to run as __main__")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments for that module")
    options = parser.parse_args(argv)
    with redirect_discord(options.url):
        sys.argv = [options.module, *options.args]
        runpy.run_module(options.module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
