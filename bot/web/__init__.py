"""The web home: members' images and Explore, sign-in with Discord or a /web link, and the
owners' pages, served by the bot process itself with aiohttp (a front end beside bot/discord
and bot/console; it never imports discord.py).

`server.py` starts it; `context.py` is what every handler reaches; `sessions.py`, `csrf.py`,
`ratelimit.py` and `middleware.py` are the doors every request passes; `routes_*.py` hold the
pages, `templates/` and `static/` what they look like.
"""
