"""Reading `config.toml` into a `Config`: every table but `[generation]` (bot/config/engine.py),
checked as it is read; a bad value raises `ConfigError` naming the key."""

from __future__ import annotations

import math
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from bot.config.engine import engine_settings
from bot.config.reader import Reader
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
from bot.config.web import WebConfig
from generation.prompt import MAX_JOBS


def load_config(path: str | Path) -> Config:
    path = Path(path)
    try:
        with path.open("rb") as handle:
            raw = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse_config(raw, base_dir=path.parent)


def parse_config(raw: dict[str, Any], base_dir: Path = Path(".")) -> Config:
    reader = Reader(raw)
    data_dir = base_dir / Path(reader.get("data_dir", str, "data"))
    log_level = reader.get("log_level", str, "INFO").upper()
    if log_level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        raise ConfigError(f"log_level: must be DEBUG, INFO, WARNING or ERROR, got {log_level!r}")

    config = Config(
        data_dir=data_dir,
        log_level=log_level,
        engine=engine_settings(reader.section("generation"), data_dir, base_dir),
        scheduler=_scheduler(reader.section("scheduler")),
        credits=_credits(reader.section("credits")),
        discord=_discord(reader.section("discord")),
        moderation=_moderation(reader.section("moderation")),
        storage=_storage(reader.section("storage")),
        metrics=_metrics(reader.section("metrics")),
        workers=_workers_backend(reader.section("workers")),
        images=_images(reader.section("images")),
        web=_web(reader.section("web")),
        modes=_modes(reader.section("modes")),
    )
    reader.reject_unknown()
    if config.workers.backend == "ray" and "workers" in reader.section("scheduler").table:
        # Silently ignoring it would leave an owner wondering why their count has no effect.
        raise ConfigError(
            'scheduler.workers: not used with [workers] backend = "ray", which runs one actor '
            "per GPU of the cluster; remove it"
        )
    return config


def _modes(section: Reader) -> ModesConfig:
    defaults = ModesConfig()
    config = ModesConfig(
        relax_enabled=section.get("relax_enabled", bool, defaults.relax_enabled),
        relax_cost_percent=section.non_negative("relax_cost_percent", defaults.relax_cost_percent),
        relax_max_queued_per_user=section.positive(
            "relax_max_queued_per_user", int, defaults.relax_max_queued_per_user
        ),
        relax_max_per_day=section.positive("relax_max_per_day", int, defaults.relax_max_per_day),
        turbo_cost_percent=section.non_negative("turbo_cost_percent", defaults.turbo_cost_percent),
        wait_estimate_run_s=section.positive(
            "wait_estimate_run_s", float, defaults.wait_estimate_run_s
        ),
    )
    if not math.isfinite(config.wait_estimate_run_s):
        # Every queued job's reply words the wait this gives: inf or nan can't be said.
        raise ConfigError(
            f"{section.prefix}wait_estimate_run_s: must be a finite number of seconds, got "
            f"{config.wait_estimate_run_s}"
        )
    if config.relax_cost_percent > 100:
        raise ConfigError(
            f"{section.prefix}relax_cost_percent: must be between 0 and 100 (a relax job never "
            f"costs more than a fast one), got {config.relax_cost_percent}"
        )
    if not 100 <= config.turbo_cost_percent <= 1000:
        raise ConfigError(
            f"{section.prefix}turbo_cost_percent: must be between 100 and 1000 (turbo never "
            f"costs less than fast), got {config.turbo_cost_percent}"
        )
    section.reject_unknown()
    return config


def _storage(section: Reader) -> StorageConfig:
    config = StorageConfig(
        image_retention_days=section.non_negative("image_retention_days", 30),
        job_retention_days=section.non_negative("job_retention_days", 90),
        audit_retention_days=section.non_negative("audit_retention_days", 90),
        prune_interval_s=section.positive("prune_interval_s", float, 3600.0),
    )
    section.reject_unknown()
    return config


def _metrics(section: Reader) -> MetricsConfig:
    config = MetricsConfig(
        enabled=section.get("enabled", bool, False),
        host=section.get("host", str, "127.0.0.1"),
        port=section.non_negative("port", 9464),
        ready_refresh_s=section.positive("ready_refresh_s", float, 10.0),
    )
    if not config.host.strip():
        raise ConfigError(f"{section.prefix}host: must not be empty")
    if config.port > 65535:
        raise ConfigError(f"{section.prefix}port: must be at most 65535, got {config.port}")
    section.reject_unknown()
    return config


def _images(section: Reader) -> ImagesConfig:
    defaults = ImagesConfig()
    hosts = section.get("allowed_hosts", list, list(defaults.allowed_hosts))
    for host in hosts:
        if not isinstance(host, str) or not host.strip() or "/" in host or ":" in host:
            raise ConfigError(
                f"{section.prefix}allowed_hosts: host names only (no scheme, port or path), "
                f"got {host!r}"
            )
    config = ImagesConfig(
        allowed_hosts=tuple(host.strip().lower() for host in hosts),
        max_bytes=section.positive("max_bytes", int, defaults.max_bytes),
        max_pixels=section.positive("max_pixels", int, defaults.max_pixels),
        timeout_s=section.positive("timeout_s", float, defaults.timeout_s),
        max_fetches=section.positive("max_fetches", int, defaults.max_fetches),
        max_fetches_per_member=section.positive(
            "max_fetches_per_member", int, defaults.max_fetches_per_member
        ),
    )
    section.reject_unknown()
    return config


_RAY_ADDRESS = re.compile(r"^(?:ray://)?[A-Za-z0-9.\-\[\]:]+:\d{1,5}$")


def _workers_backend(section: Reader) -> WorkersConfig:
    backend = section.choice("backend", ("local", "ray"), "local")
    address = section.get("ray_address", str, "auto").strip()
    config = WorkersConfig(
        backend="ray" if backend == "ray" else "local",
        ray_address=address,
        ray_gpu_resource=section.get("ray_gpu_resource", str, "GPU").strip(),
        ray_watch_interval_s=section.positive("ray_watch_interval_s", float, 5.0),
        ray_cache_dir=section.get("ray_cache_dir", str, ""),
        ray_outage_grace_s=section.positive("ray_outage_grace_s", float, 25.0),
        ray_actor_cpus=section.get("ray_actor_cpus", float, 4.0),
    )
    if config.ray_outage_grace_s > 40:
        raise ConfigError(
            f"{section.prefix}ray_outage_grace_s: must be at most 40 (Ray's driver gives up "
            f"after 60 s without the head), got {config.ray_outage_grace_s:g}"
        )
    if config.ray_actor_cpus < 0:
        raise ConfigError(
            f"{section.prefix}ray_actor_cpus: must be >= 0, got {config.ray_actor_cpus:g}"
        )
    if address not in ("auto", "local") and not _RAY_ADDRESS.match(address):
        raise ConfigError(
            f'{section.prefix}ray_address: must be "auto", "local", "host:port" or '
            f'"ray://host:port", got {address!r}'
        )
    if not config.ray_gpu_resource:
        raise ConfigError(f"{section.prefix}ray_gpu_resource: must not be empty")
    section.reject_unknown()
    return config


def _workers(section: Reader) -> int | Literal["auto"]:
    value = section.table.get("workers", 1)
    if value == "auto":
        section.seen.add("workers")
        return "auto"
    if isinstance(value, str):
        raise ConfigError(f'{section.prefix}workers: must be an integer >= 1 or "auto"')
    workers: int = section.positive("workers", int, 1)
    return workers


def _scheduler(section: Reader) -> SchedulerConfig:
    config = SchedulerConfig(
        max_running_per_user=section.positive("max_running_per_user", int, 1),
        max_queued_per_user=section.positive("max_queued_per_user", int, 3),
        max_queue=section.positive("max_queue", int, 100),
        job_timeout_s=section.positive("job_timeout_s", float, 300.0),
        aging_s=section.positive("aging_s", float, 30.0),
        max_attempts=section.positive("max_attempts", int, 2),
        workers=_workers(section),
        user_tiers=section.id_map("user_tiers"),
        role_tiers=section.id_map("role_tiers"),
        cancel_grace_s=section.positive("cancel_grace_s", float, 15.0),
        worker_startup_timeout_s=section.positive("worker_startup_timeout_s", float, 600.0),
        drain_timeout_s=section.positive("drain_timeout_s", float, 30.0),
        max_jobs_per_prompt=section.get("max_jobs_per_prompt", int, MAX_JOBS),
    )
    if not 1 <= config.max_jobs_per_prompt <= MAX_JOBS:
        raise ConfigError(
            f"{section.prefix}max_jobs_per_prompt: must be between 1 and {MAX_JOBS}, "
            f"got {config.max_jobs_per_prompt}"
        )
    section.reject_unknown()
    return config


def _credits(section: Reader) -> CreditsConfig:
    config = CreditsConfig(
        daily_allowance=section.non_negative("daily_allowance", 20),
        cost_imagine=section.non_negative("cost_imagine", 4),
        cost_variation=section.non_negative("cost_variation", 2),
        cost_upscale=section.non_negative("cost_upscale", 3),
        cost_zoom=section.non_negative("cost_zoom", 4),
        cost_pan=section.non_negative("cost_pan", 4),
        cost_square=section.non_negative("cost_square", 4),
        cost_region=section.non_negative("cost_region", 3),
        cost_upscale_creative=section.non_negative("cost_upscale_creative", 4),
        cost_describe=section.non_negative("cost_describe", 1),
        cost_draft_percent=section.non_negative("cost_draft_percent", 25),
        cost_shorten=section.non_negative("cost_shorten", 0),
        cost_controlnet_percent=section.non_negative("cost_controlnet_percent", 50),
        role_allowances=section.id_map("role_allowances"),
    )
    if config.cost_draft_percent > 100:
        raise ConfigError(
            f"{section.prefix}cost_draft_percent: at most 100 (a draft never costs more than "
            f"the full render), got {config.cost_draft_percent}"
        )
    section.reject_unknown()
    return config


def _discord(section: Reader) -> DiscordConfig:
    config = DiscordConfig(
        admin_user_ids=frozenset(section.ids("admin_user_ids")),
        admin_role_ids=frozenset(section.ids("admin_role_ids")),
        guild_ids=tuple(dict.fromkeys(section.ids("guild_ids"))),
        leave_other_guilds=section.get("leave_other_guilds", bool, False),
        progress_edit_interval_s=section.positive("progress_edit_interval_s", float, 2.0),
        command_cooldown_s=section.get("command_cooldown_s", float, 3.0),
        refusal_limit=section.positive("refusal_limit", int, 6),
        refusal_window_s=section.positive("refusal_window_s", float, 60.0),
    )
    if config.command_cooldown_s < 0:
        raise ConfigError(f"{section.prefix}command_cooldown_s: must be >= 0")
    section.reject_unknown()
    return config


def _moderation(section: Reader) -> ModerationConfig:
    import re

    patterns = tuple(str(p) for p in section.get("banned_patterns", list, []))
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ConfigError(f"{section.prefix}banned_patterns: {pattern!r}: {exc}") from None
    config = ModerationConfig(
        banned_words=tuple(str(w) for w in section.get("banned_words", list, [])),
        banned_patterns=patterns,
        nsfw_check=section.get("nsfw_check", bool, True),
        nsfw_threshold=section.get("nsfw_threshold", float, 0.8),
        nsfw_policy=section.choice("nsfw_policy", ("spoiler", "withhold"), "spoiler"),
    )
    if not 0.0 < config.nsfw_threshold <= 1.0:
        raise ConfigError(f"{section.prefix}nsfw_threshold: must be in (0, 1]")
    section.reject_unknown()
    return config


def _web(section: Reader) -> WebConfig:
    config = WebConfig(
        enabled=section.get("enabled", bool, False),
        host=section.get("host", str, "127.0.0.1"),
        port=section.get("port", int, 8080),
        public_url=section.get("public_url", str, "").rstrip("/"),
        discord_url=section.get("discord_url", str, "https://discord.com").rstrip("/"),
        link_ttl_s=section.positive("link_ttl_s", float, 600.0),
        session_ttl_s=section.positive("session_ttl_s", float, 7 * 24 * 3600.0),
        ip_requests_per_minute=section.positive("ip_requests_per_minute", int, 600),
        member_requests_per_minute=section.positive("member_requests_per_minute", int, 300),
        sign_in_per_minute=section.positive("sign_in_per_minute", int, 20),
        trust_proxy=section.get("trust_proxy", bool, False),
        page_size=section.positive("page_size", int, 48),
    )
    if not 1 <= config.port <= 65535:
        raise ConfigError(f"{section.prefix}port: must be between 1 and 65535")
    for key in ("public_url", "discord_url"):
        url = getattr(config, key)
        if url and not re.fullmatch(r"https?://[^\s/?#]+(/[^\s?#]*)?", url):
            raise ConfigError(f"{section.prefix}{key}: must be an http:// or https:// address")
    if config.page_size > 200:
        raise ConfigError(f"{section.prefix}page_size: at most 200")
    section.reject_unknown()
    return config
