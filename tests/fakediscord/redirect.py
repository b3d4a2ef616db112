"""Point an unmodified discord.py at the fake: two class attributes, nothing else.

In-process, ``FakeDiscord`` applies :func:`redirect_discord` itself; for a bot in its own
process, see ``launch.py``.
"""

from __future__ import annotations

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
