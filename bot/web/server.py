"""The web home's aiohttp server, run in the bot's own process and event loop (one process,
one SQLite file): built from the services the Discord client opened, started when `[web]
enabled`, closed with the bot."""

from __future__ import annotations

import logging
from pathlib import Path

from aiohttp import web

from bot.app.companions import Services
from bot.core.gallery import Gallery
from bot.web import routes_admin, routes_explore, routes_images, routes_signin
from bot.web.context import CONTEXT, WebContext
from bot.web.middleware import doors, errors, security_headers
from bot.web.oauth import DiscordOAuth
from bot.web.ratelimit import RateLimiter
from bot.web.sessions import Sessions
from bot.web.templates import Templates
from bot.web.thumbnails import Thumbnails

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).with_name("static")
# Forms are small; nothing members send the web home is a file.
MAX_REQUEST_BYTES = 64 * 1024


def build_context(services: Services) -> WebContext:
    config = services.config.web
    key = services.signing_key
    return WebContext(
        services=services,
        config=config,
        key=key,
        store=services.web_store,
        gallery=Gallery(services.core.db),
        sessions=Sessions(services.web_store, config, key),
        templates=Templates(),
        thumbnails=Thumbnails(services.config.data_dir),
        ip_limits=RateLimiter(config.ip_requests_per_minute),
        member_limits=RateLimiter(config.member_requests_per_minute),
        sign_in_limits=RateLimiter(config.sign_in_per_minute),
        oauth=(
            DiscordOAuth(config, services.secrets, key) if services.secrets.oauth_enabled else None
        ),
    )


def build_app(ctx: WebContext) -> web.Application:
    """The application: the middlewares (outermost first), then every page's routes."""
    app = web.Application(
        middlewares=[security_headers, errors, doors], client_max_size=MAX_REQUEST_BYTES
    )
    app[CONTEXT] = ctx
    routes_signin.add_routes(app.router)
    routes_images.add_routes(app.router)
    routes_explore.add_routes(app.router)
    routes_admin.setup(app)
    app.router.add_static("/static/", STATIC_DIR)
    return app


class WebServer:
    def __init__(self, ctx: WebContext, app: web.Application) -> None:
        self.ctx = ctx
        self.app = app
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> None:
        config = self.ctx.config
        self._runner = web.AppRunner(
            self.app, handle_signals=False, access_log=None, shutdown_timeout=2.0
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, config.host, config.port)
        await site.start()
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else config.port
        log.info(
            "web home on http://%s:%d (public address %s)",
            config.host,
            self.port,
            config.base_url,
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def close(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        if self.ctx.oauth is not None:
            await self.ctx.oauth.close()


async def start_web(services: Services) -> WebServer | None:
    """The started web home when `[web] enabled`, else None."""
    if not services.config.web.enabled:
        return None
    ctx = build_context(services)
    server = WebServer(ctx, build_app(ctx))
    await server.start()
    return server
