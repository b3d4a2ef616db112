"""What a front end started beside the Discord client (the web home) is given: the services
the client opened, so it shares one core, one database and one signing key with it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import Protocol

from bot.app.admin import GuildRoles
from bot.app.application import ImagineApp
from bot.app.sign_in import SignInLinks, signing_key
from bot.config import Config
from bot.config.web import WebSecrets
from bot.core.clock import Clock
from bot.core.service import Core
from bot.core.web_store import WebStore


@dataclass(frozen=True)
class Services:
    config: Config
    core: Core
    app: ImagineApp
    clock: Clock
    web_store: WebStore
    # None when the web home is off.
    sign_in: SignInLinks | None
    secrets: WebSecrets
    # Cookies and links are signed with it.
    signing_key: bytes
    # The owners (admin_user_ids and the application's owner, once known).
    owner_ids: Callable[[], Collection[int]]
    # Who is an admin of which server, as the front end in the servers sees it (the Discord
    # client); None: only the owners use the dashboard.
    guild_roles: GuildRoles | None = None


class Companion(Protocol):
    async def close(self) -> None: ...


# Started once the client's services are open; None when it has nothing to run.
StartCompanion = Callable[[Services], Awaitable[Companion | None]]


def open_services(
    config: Config,
    core: Core,
    app: ImagineApp,
    clock: Clock,
    web_secrets: WebSecrets | None,
    owner_ids: Callable[[], Collection[int]],
    guild_roles: GuildRoles | None = None,
) -> Services:
    """The services a companion gets, with the web home's store, signing key and sign-in
    links (these only when `[web] enabled`)."""
    secrets_ = web_secrets or WebSecrets()
    store = WebStore(core.db, clock)
    enabled = config.web.enabled
    key = signing_key(secrets_) if enabled else b""
    return Services(
        config=config,
        core=core,
        app=app,
        clock=clock,
        web_store=store,
        sign_in=SignInLinks(store, config.web, key) if enabled else None,
        secrets=secrets_,
        signing_key=key,
        owner_ids=owner_ids,
        guild_roles=guild_roles,
    )
