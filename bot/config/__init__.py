"""`config.toml`, loaded once into one typed, validated, immutable object, used by every layer.

Secrets never live here: the Discord token comes only from the environment (`DISCORD_TOKEN`).
A bad value raises `ConfigError` naming the key, so start-up can print one clear line.
`sections.py` holds the types, `load.py` reads the file, `engine.py` the `[generation]` table,
`reader.py` the typed access to a table.
"""

from bot.config.load import load_config, parse_config
from bot.config.sections import (
    Config,
    ConfigError,
    CreditsConfig,
    DiscordConfig,
    ImagesConfig,
    MetricsConfig,
    ModerationConfig,
    ModesConfig,
    SchedulerConfig,
    StorageConfig,
    WorkersConfig,
)

__all__ = [
    "Config",
    "ConfigError",
    "CreditsConfig",
    "DiscordConfig",
    "ImagesConfig",
    "MetricsConfig",
    "ModerationConfig",
    "ModesConfig",
    "SchedulerConfig",
    "StorageConfig",
    "WorkersConfig",
    "load_config",
    "parse_config",
]
