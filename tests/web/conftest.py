"""The web home's tests use the front-end tests' tiny engine (built once per run)."""

from tests.bot.conftest import bot_engine_settings, shared_engine

__all__ = ["bot_engine_settings", "shared_engine"]
