"""Pages rendered on the server with Jinja2 (templates/ in this package, autoescaped), with
what every page needs: the signed-in member, the CSRF token for its forms, the current path."""

from __future__ import annotations

import hashlib
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from aiohttp import web

from bot.web.csrf import FIELD

STATIC_DIR = Path(__file__).with_name("static")
# What the middleware leaves on each request for the pages (the member is a sessions.Member).
CSRF_REQUEST_KEY = web.RequestKey("imagine_csrf_token", str)
MEMBER_REQUEST_KEY = web.RequestKey("imagine_member", object)


def _when(moment: datetime | None) -> str:
    return "" if moment is None else moment.strftime("%Y-%m-%d %H:%M UTC")


class Templates:
    def __init__(self) -> None:
        self.env = jinja2.Environment(
            loader=jinja2.PackageLoader("bot.web", "templates"),
            autoescape=jinja2.select_autoescape(["html"]),
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.env.filters["when"] = _when
        # Static files are named with a hash of their content, so browsers may cache them.
        versions = {
            path.name: hashlib.sha256(path.read_bytes()).hexdigest()[:12]
            for path in STATIC_DIR.iterdir()
            if path.is_file()
        }
        self.env.globals["static"] = lambda name: f"/static/{name}?v={versions.get(name, '0')}"

    def render(
        self, request: web.Request, name: str, *, status: int = 200, **values: Any
    ) -> web.Response:
        values.setdefault("member", request.get(MEMBER_REQUEST_KEY))
        values.setdefault("csrf_token", request.get(CSRF_REQUEST_KEY, ""))
        values.setdefault("csrf_field", FIELD)
        values.setdefault("path", request.path)
        text = self.env.get_template(name).render(**values)
        return web.Response(text=text, status=status, content_type="text/html", charset="utf-8")
