"""Typed access to one TOML table that remembers which keys were read, so that an unknown key
(a typo) is refused by name."""

from __future__ import annotations

import math
from typing import Any

from bot.config.sections import ConfigError


class Reader:
    """Typed access to one TOML table that remembers which keys were read."""

    def __init__(self, table: Any, prefix: str = "") -> None:
        if not isinstance(table, dict):
            raise ConfigError(f"{prefix.rstrip('.') or 'config'}: must be a table")
        self.table = table
        self.prefix = prefix
        self.seen: set[str] = set()

    def section(self, name: str) -> Reader:
        self.seen.add(name)
        return Reader(self.table.get(name, {}), f"{self.prefix}{name}.")

    def get(self, key: str, kind: type, default: Any = ...) -> Any:
        self.seen.add(key)
        if key not in self.table:
            if default is ...:
                raise ConfigError(f"{self.prefix}{key}: required")
            return default
        value = self.table[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ConfigError(
                f"{self.prefix}{key}: must be {kind.__name__}, got {type(value).__name__}"
            )
        # TOML spells inf and nan; no setting means anything by them, and a nan passes every
        # range check (all comparisons with it are false).
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{self.prefix}{key}: must be a finite number, got {value}")
        return value

    def positive(self, key: str, kind: type, default: Any) -> Any:
        value = self.get(key, kind, default)
        if value <= 0:
            raise ConfigError(f"{self.prefix}{key}: must be > 0, got {value}")
        return value

    def non_negative(self, key: str, default: int) -> int:
        value = self.get(key, int, default)
        if value < 0:
            raise ConfigError(f"{self.prefix}{key}: must be >= 0, got {value}")
        return value

    def choice(self, key: str, choices: tuple[str, ...], default: str) -> str:
        value = self.get(key, str, default)
        if value not in choices:
            raise ConfigError(f"{self.prefix}{key}: must be one of {', '.join(choices)}")
        return value

    def ids(self, key: str) -> list[int]:
        values = self.get(key, list, [])
        if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
            raise ConfigError(f"{self.prefix}{key}: must be a list of Discord ids (integers)")
        return values

    def id_map(self, key: str) -> dict[int, int]:
        table = self.get(key, dict, {})
        result = {}
        for raw_id, value in table.items():
            if not raw_id.isdigit() or not isinstance(value, int) or value < 0:
                raise ConfigError(
                    f"{self.prefix}{key}: keys must be Discord ids, values integers >= 0"
                )
            result[int(raw_id)] = value
        return result

    def reject_unknown(self) -> None:
        unknown = sorted(set(self.table) - self.seen)
        if unknown:
            raise ConfigError(f"{self.prefix}{unknown[0]}: unknown setting")
