"""`config.toml`, loaded once into one typed, validated, immutable object.

Secrets never live here: the Discord token comes only from the environment (`DISCORD_TOKEN`).
A bad value raises `ConfigError` naming the key, so start-up can print one clear line.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from generation.contract import MAX_LORA_WEIGHT, Sampler
from generation.prompt import MAX_JOBS
from generation.settings import (
    DTYPES,
    FAMILIES,
    SINGLE_FILE_SUFFIXES,
    TINY_SOURCES,
    ControlFit,
    ControlNetSpec,
    EngineSettings,
    IPAdapterSpec,
    LoraSpec,
    ModelSpec,
    Preprocessor,
)


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class SchedulerConfig:
    max_running_per_user: int = 1
    max_queued_per_user: int = 3
    max_queue: int = 100
    job_timeout_s: float = 300.0
    # A queued job gains one fairness "round" of priority per this many seconds of waiting.
    aging_s: float = 30.0
    max_attempts: int = 2
    # Worker processes, or "auto": one per visible CUDA device (one on a CPU-only box).
    workers: int | Literal["auto"] = 1
    # Priority tiers: a higher tier is served first among users with equal waiting credit.
    user_tiers: dict[int, int] = field(default_factory=dict)
    role_tiers: dict[int, int] = field(default_factory=dict)
    # A running job that ignores a cancel for this long has its worker killed.
    cancel_grace_s: float = 15.0
    # Loading the models in a fresh worker process; not counted in job_timeout_s.
    worker_startup_timeout_s: float = 600.0
    # On shutdown, running jobs get this long to finish before they are handed back to the queue.
    drain_timeout_s: float = 30.0
    # Jobs one /imagine may make with {…} permutations and --repeat (Midjourney allows 40).
    max_jobs_per_prompt: int = MAX_JOBS


@dataclass(frozen=True)
class CreditsConfig:
    daily_allowance: int = 20
    # Cost of a 512x512, 30-step job with the default candidate count; imagine scales from it.
    cost_imagine: int = 4
    cost_variation: int = 2
    cost_upscale: int = 3
    # Post-grid edits, each for a 512x512 canvas, 30 steps, 8 candidates (scaled like imagine).
    cost_zoom: int = 4
    cost_pan: int = 4
    cost_square: int = 4
    cost_region: int = 3
    # Upscale (Creative), for a 2x upscale to 1024x1024 (scaled like cost_upscale).
    cost_upscale_creative: int = 4
    # /describe: one CLIP pass over the picture and the phrase vocabulary, whatever its size.
    cost_describe: int = 1
    # A job steered by a ControlNet costs this many percent more: the ControlNet runs beside
    # the UNet at every step (about half a UNet's work again). LoRAs cost nothing extra.
    cost_controlnet_percent: int = 50
    role_allowances: dict[int, int] = field(default_factory=dict)


@dataclass(frozen=True)
class DiscordConfig:
    # The bot's owners: admins in every server it serves and in DMs, over every member's data.
    admin_user_ids: frozenset[int] = frozenset()
    # Admins of the one server each role belongs to (as Manage Server is), over that server only.
    admin_role_ids: frozenset[int] = frozenset()
    # The servers the bot serves (bot/app/access.py): commands sync to them, and an interaction from
    # any other server is refused. Empty: no server is served (`python -m bot` refuses to start).
    guild_ids: tuple[int, ...] = ()
    # Leave a server that is not in guild_ids when the bot joins it or finds itself in it at start.
    leave_other_guilds: bool = False
    progress_edit_interval_s: float = 2.0
    command_cooldown_s: float = 3.0
    # A member refused this many times within refusal_window_s is cooled down: every further
    # interaction is answered "slow down" (and counts again) until the window has room.
    refusal_limit: int = 6
    refusal_window_s: float = 60.0


@dataclass(frozen=True)
class ModerationConfig:
    banned_words: tuple[str, ...] = ()
    banned_patterns: tuple[str, ...] = ()
    nsfw_check: bool = True
    nsfw_threshold: float = 0.8
    # What happens to a flagged image outside age-restricted channels: "spoiler" or "withhold".
    nsfw_policy: str = "spoiler"


@dataclass(frozen=True)
class StorageConfig:
    # Result images of finished jobs are deleted this many days after the job ended (0: keep
    # them forever). The credits ledger is never pruned.
    image_retention_days: int = 30
    # A finished job's prompt, request, result and delivery records are erased this many days
    # after it ended (its images go too); the row keeps what the ledger needs (0: never).
    job_retention_days: int = 90
    # Audit rows (refusals, flags, bans) are deleted this many days after they were written,
    # except the ban of a member who is still banned (0: never).
    audit_retention_days: int = 90
    prune_interval_s: float = 3600.0


@dataclass(frozen=True)
class MetricsConfig:
    # Prometheus /metrics and the /healthz and /readyz probes, on one small HTTP server. Off
    # by default; localhost only unless told otherwise (the metrics are not secret, but they
    # are nobody else's business either). Port 0 picks a free port.
    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = 9464
    # /readyz answers from checks run this often in the background, never per request.
    ready_refresh_s: float = 10.0


@dataclass(frozen=True)
class ImagesConfig:
    # Members' pictures (image prompts, /blend, /describe, --sref/--oref/--cref links) are
    # fetched over https from these hosts only; by default Discord's attachment hosts. Private,
    # loopback and link-local addresses are refused whatever the list says.
    allowed_hosts: tuple[str, ...] = ("cdn.discordapp.com", "media.discordapp.net")
    max_bytes: int = 10 * 1024 * 1024
    # The pixels decoded, checked from the file's header first (decompression bombs never get
    # decoded). A picture is used at most at the largest canvas (2048x2048, 4.2 MP) and scaled
    # down to it on arrival, so 16 MP leaves room for a 4000x4000 picture and no more; a JPEG
    # is decoded at 1/2, 1/4 or 1/8 of its size where that still covers 2048 pixels, so its
    # header may say up to 64 times more.
    max_pixels: int = 16_000_000
    timeout_s: float = 10.0
    # Pictures fetched and decoded at the same time, by the whole bot and by one member (the
    # rest wait their turn): a burst of links can't fill the memory or the threads.
    max_fetches: int = 8
    max_fetches_per_member: int = 2


@dataclass(frozen=True)
class WorkersConfig:
    # "local": worker processes on this box ([scheduler] workers). "ray": one actor per GPU of
    # a Ray cluster, created as GPU nodes join and dropped as they leave (bot/core/ray_workers).
    backend: Literal["local", "ray"] = "local"
    # "auto": the cluster `ray start --head` runs on this box; "host:6379" its GCS address;
    # "ray://host:10001" a Ray client connection; "local": a private one-box cluster started
    # by the bot (to try the backend out).
    ray_address: str = "auto"
    # The cluster resource that stands for one GPU; each unit gets one actor.
    ray_gpu_resource: str = "GPU"
    # How often the cluster's nodes are looked at.
    ray_watch_interval_s: float = 5.0
    # Where the GPU boxes keep model files; empty: the [generation] cache_dir path.
    ray_cache_dir: str = ""
    # How long looks at the cluster may fail (at least 3 in a row) before the bot gives up on
    # its connection: running jobs are re-queued and every model reloads. At most 40 s: Ray's
    # driver ends itself after 60 s without the head.
    ray_outage_grace_s: float = 25.0
    # CPUs each actor asks Ray for (at most its node's CPUs divided among its GPUs). Ray sets
    # OMP_NUM_THREADS to this (1 below 1), so the CPU side of a job (PNG encoding, the
    # captioner, anything offloaded) uses as many threads. 0: take no CPU of the node.
    ray_actor_cpus: float = 4.0


@dataclass(frozen=True)
class Config:
    data_dir: Path = Path("data")
    log_level: str = "INFO"
    engine: EngineSettings = field(default_factory=EngineSettings)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    credits: CreditsConfig = field(default_factory=CreditsConfig)
    discord: DiscordConfig = field(default_factory=DiscordConfig)
    moderation: ModerationConfig = field(default_factory=ModerationConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    workers: WorkersConfig = field(default_factory=WorkersConfig)
    images: ImagesConfig = field(default_factory=ImagesConfig)

    @property
    def database_path(self) -> Path:
        return self.data_dir / "imagine-bot.sqlite3"

    @property
    def images_dir(self) -> Path:
        return self.data_dir / "images"


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
    reader = _Reader(raw)
    data_dir = base_dir / Path(reader.get("data_dir", str, "data"))
    log_level = reader.get("log_level", str, "INFO").upper()
    if log_level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        raise ConfigError(f"log_level: must be DEBUG, INFO, WARNING or ERROR, got {log_level!r}")

    config = Config(
        data_dir=data_dir,
        log_level=log_level,
        engine=_engine(reader.section("generation"), data_dir, base_dir),
        scheduler=_scheduler(reader.section("scheduler")),
        credits=_credits(reader.section("credits")),
        discord=_discord(reader.section("discord")),
        moderation=_moderation(reader.section("moderation")),
        storage=_storage(reader.section("storage")),
        metrics=_metrics(reader.section("metrics")),
        workers=_workers_backend(reader.section("workers")),
        images=_images(reader.section("images")),
    )
    reader.reject_unknown()
    if config.workers.backend == "ray" and "workers" in reader.section("scheduler").table:
        # Silently ignoring it would leave an owner wondering why their count has no effect.
        raise ConfigError(
            'scheduler.workers: not used with [workers] backend = "ray", which runs one actor '
            "per GPU of the cluster; remove it"
        )
    return config


def _engine(section: _Reader, data_dir: Path, base_dir: Path) -> EngineSettings:
    defaults = EngineSettings()
    models = []
    for index, raw_model in enumerate(section.get("models", list, [])):
        model = _Reader(raw_model, f"{section.prefix}models[{index}].")
        spec = ModelSpec(
            name=model.get("name", str),
            source=_weights_path(model.get("source", str), base_dir),
            base_resolution=model.get("base_resolution", int, 512),
            family=model.get("family", str, "sd"),
            vae=model.get("vae", str, ""),
            dtype=model.choice("dtype", ("", *DTYPES), ""),
            inpaint_source=_weights_path(model.get("inpaint_source", str, ""), base_dir),
            preview_decoder=_weights_path(model.get("preview_decoder", str, ""), base_dir),
            config=_weights_path(model.get("config", str, ""), base_dir),
            allow_pickle=model.get("allow_pickle", bool, False),
            description=_description(model),
        )
        if spec.base_resolution % 64 or not 64 <= spec.base_resolution <= 2048:
            raise ConfigError(f"{model.prefix}base_resolution: a multiple of 64 in 64..2048")
        if spec.family not in {"sd", "sdxl"}:
            raise ConfigError(f"{model.prefix}family: must be 'sd' or 'sdxl'")
        model.reject_unknown()
        models.append(spec)
    if not models:
        models = list(defaults.models)
    if len({m.name for m in models}) != len(models):
        raise ConfigError(f"{section.prefix}models: model names must be unique")
    default_model = section.get("default_model", str, models[0].name)
    if default_model not in {m.name for m in models}:
        raise ConfigError(f"{section.prefix}default_model: {default_model!r} is not configured")
    try:
        sampler = Sampler.parse(section.get("default_sampler", str, defaults.default_sampler.value))
    except ValueError as exc:
        raise ConfigError(f"{section.prefix}default_{exc}") from None
    settings = EngineSettings(
        models=tuple(models),
        default_model=default_model,
        clip_model=section.get("clip_model", str, defaults.clip_model),
        caption_model=section.get("caption_model", str, defaults.caption_model),
        cache_dir=data_dir / section.get("cache_dir", str, "models"),
        device=section.choice("device", ("auto", "cuda", "cpu", "mps"), defaults.device),
        dtype=section.choice("dtype", ("auto", "float16", "bfloat16", "float32"), defaults.dtype),
        default_steps=section.get("default_steps", int, defaults.default_steps),
        default_guidance=section.get("default_guidance", float, defaults.default_guidance),
        default_sampler=sampler,
        num_candidates=section.get("candidates", int, defaults.num_candidates),
        num_kept=section.get("kept", int, defaults.num_kept),
        max_pixels=section.get("max_pixels", int, defaults.max_pixels),
        max_steps=section.get("max_steps", int, defaults.max_steps),
        variation_strength_subtle=section.get(
            "variation_strength_subtle", float, defaults.variation_strength_subtle
        ),
        variation_strength_strong=section.get(
            "variation_strength_strong", float, defaults.variation_strength_strong
        ),
        upscale_strength=section.get("upscale_strength", float, defaults.upscale_strength),
        upscale_strength_creative=section.get(
            "upscale_strength_creative", float, defaults.upscale_strength_creative
        ),
        edit_strength=section.get("edit_strength", float, defaults.edit_strength),
        preview_interval_s=section.get("preview_interval_s", float, defaults.preview_interval_s),
        upscaler=section.choice("upscaler", ("auto", "hires", "realesrgan"), defaults.upscaler),
        local_files_only=section.get("local_files_only", bool, defaults.local_files_only),
        cpu_offload=section.get("cpu_offload", bool, defaults.cpu_offload),
        vae_tiling=section.get("vae_tiling", bool, defaults.vae_tiling),
        max_loaded_models=section.positive("max_loaded_models", int, defaults.max_loaded_models),
        max_loaded_loras=section.positive("max_loaded_loras", int, defaults.max_loaded_loras),
        controlnet_fit=ControlFit(
            section.choice(
                "controlnet_fit", tuple(f.value for f in ControlFit), defaults.controlnet_fit
            )
        ),
        loras=_loras(section, base_dir),
        controlnets=_controlnets(section, base_dir),
        ip_adapters=_ip_adapters(section, base_dir, defaults.ip_adapters),
    )
    try:
        settings.validate()
    except ValueError as exc:
        raise ConfigError(f"{section.prefix}{exc}") from None
    if not 1 <= settings.num_kept <= settings.num_candidates <= 16:
        raise ConfigError(f"{section.prefix}kept/candidates: need 1 <= kept <= candidates <= 16")
    if not 1 <= settings.default_steps <= settings.max_steps <= 150:
        raise ConfigError(
            f"{section.prefix}default_steps/max_steps: need 1 <= default <= max <= 150"
        )
    if not 64 * 64 <= settings.max_pixels <= 2048 * 2048:
        raise ConfigError(f"{section.prefix}max_pixels: must be between 4096 and 4194304")
    strengths = (
        "variation_strength_subtle",
        "variation_strength_strong",
        "upscale_strength",
        "upscale_strength_creative",
        "edit_strength",
    )
    for name in strengths:
        if not 0.0 < getattr(settings, name) <= 1.0:
            raise ConfigError(f"{section.prefix}{name}: must be in (0, 1]")
    section.reject_unknown()
    return settings


# A LoRA or ControlNet name is typed after --lora/--cn, where commas and spaces separate several
# and a colon starts the weight; Discord shows at most 100 characters of a choice.
_ADD_ON_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,39}")
_MAX_DESCRIPTION_CHARS = 200


def _loras(section: _Reader, base_dir: Path) -> tuple[LoraSpec, ...]:
    specs: list[LoraSpec] = []
    for index, raw in enumerate(section.get("loras", list, [])):
        table = _Reader(raw, f"{section.prefix}loras[{index}].")
        spec = LoraSpec(
            name=_add_on_name(table, specs),
            source=_weights_path(table.get("source", str), base_dir),
            family=table.choice("family", FAMILIES, "sd"),
            default_weight=table.get("default_weight", float, 1.0),
            trigger_words=_trigger_words(table),
            description=_description(table),
        )
        if not 0.0 <= spec.default_weight <= MAX_LORA_WEIGHT:
            raise ConfigError(
                f"{table.prefix}default_weight: must be between 0 and {MAX_LORA_WEIGHT:g}, "
                f"got {spec.default_weight:g}"
            )
        table.reject_unknown()
        specs.append(spec)
    return tuple(specs)


def _ip_adapters(
    section: _Reader, base_dir: Path, defaults: tuple[IPAdapterSpec, ...]
) -> tuple[IPAdapterSpec, ...]:
    """[[generation.ip_adapters]]: one image adapter per family; the tiny ones stay for the
    tiny models unless a table replaces them."""
    specs: list[IPAdapterSpec] = []
    for index, raw in enumerate(section.get("ip_adapters", list, [])):
        table = _Reader(raw, f"{section.prefix}ip_adapters[{index}].")
        base = IPAdapterSpec()
        layers = table.get("style_layers", dict, {})
        style: list[tuple[str, tuple[float, ...]]] = []
        for layer, scales in layers.items():
            values = scales if isinstance(scales, list) else [scales]
            if not values or not all(
                isinstance(v, int | float) and not isinstance(v, bool) for v in values
            ):
                raise ConfigError(
                    f"{table.prefix}style_layers: {layer!r} needs a number or a list of numbers"
                )
            style.append((str(layer), tuple(float(v) for v in values)))
        specs.append(
            IPAdapterSpec(
                family=table.choice("family", FAMILIES, "sd"),
                source=_weights_path(table.get("source", str), base_dir),
                subfolder=table.get("subfolder", str, base.subfolder),
                weight_name=table.get("weight_name", str, base.weight_name),
                image_encoder_folder=table.get(
                    "image_encoder_folder", str, base.image_encoder_folder
                ),
                style_layers=tuple(style),
            )
        )
        table.reject_unknown()
    given = {(spec.family, spec.tiny) for spec in specs}
    specs += [spec for spec in defaults if (spec.family, spec.tiny) not in given]
    return tuple(specs)


def _controlnets(section: _Reader, base_dir: Path) -> tuple[ControlNetSpec, ...]:
    specs: list[ControlNetSpec] = []
    for index, raw in enumerate(section.get("controlnets", list, [])):
        table = _Reader(raw, f"{section.prefix}controlnets[{index}].")
        name = _add_on_name(table, specs)
        source = _weights_path(table.get("source", str), base_dir)
        family = table.choice("family", FAMILIES, "sd")
        # Required: a ControlNet fed the wrong kind of map draws nonsense without any error.
        kinds = tuple(p.value for p in Preprocessor)
        wanted = table.get("preprocessor", str)
        if wanted not in kinds:
            raise ConfigError(f"{table.prefix}preprocessor: must be one of {', '.join(kinds)}")
        preprocessor = Preprocessor(wanted)
        depth_model = table.get("preprocessor_model", str, "")
        if depth_model and preprocessor is not Preprocessor.DEPTH:
            raise ConfigError(
                f"{table.prefix}preprocessor_model: only a depth preprocessor uses a model"
            )
        specs.append(
            ControlNetSpec(
                name=name,
                source=source,
                family=family,
                preprocessor=preprocessor,
                description=_description(table),
                preprocessor_model=_weights_path(depth_model, base_dir),
            )
        )
        table.reject_unknown()
    return tuple(specs)


def _add_on_name(table: _Reader, earlier: Sequence[LoraSpec | ControlNetSpec]) -> str:
    name: str = table.get("name", str)
    if not _ADD_ON_NAME.fullmatch(name):
        raise ConfigError(
            f"{table.prefix}name: letters, digits and _ . + - only (no spaces, commas or "
            f"colons: they separate names and weights after --lora), at most 40; got {name!r}"
        )
    if any(spec.name.casefold() == name.casefold() for spec in earlier):
        # Members type names in any case, so two that differ only by case would be ambiguous.
        raise ConfigError(f"{table.prefix}name: {name!r} is given twice")
    return name


def _trigger_words(table: _Reader) -> tuple[str, ...]:
    words = table.get("trigger_words", list, [])
    if not all(isinstance(word, str) and word.strip() for word in words):
        raise ConfigError(f"{table.prefix}trigger_words: must be a list of non-empty strings")
    return tuple(word.strip() for word in words)


def _description(table: _Reader) -> str:
    text: str = " ".join(table.get("description", str, "").split())
    if len(text) > _MAX_DESCRIPTION_CHARS:
        raise ConfigError(
            f"{table.prefix}description: at most {_MAX_DESCRIPTION_CHARS} characters, "
            f"got {len(text)}"
        )
    return text


def _weights_path(value: str, base_dir: Path) -> str:
    """A weights file, or a folder written as ./x or ../x, relative to the config file (as
    data_dir is); anything else is a hub id or a folder name left as written."""
    if not value or value in TINY_SOURCES:
        return value
    path = Path(value).expanduser()
    relative = value.startswith(("./", "../")) or value.lower().endswith(SINGLE_FILE_SUFFIXES)
    if path.is_absolute() or not relative:
        return str(path) if value.startswith("~") else value
    return str(base_dir / path)


def _storage(section: _Reader) -> StorageConfig:
    config = StorageConfig(
        image_retention_days=section.non_negative("image_retention_days", 30),
        job_retention_days=section.non_negative("job_retention_days", 90),
        audit_retention_days=section.non_negative("audit_retention_days", 90),
        prune_interval_s=section.positive("prune_interval_s", float, 3600.0),
    )
    section.reject_unknown()
    return config


def _metrics(section: _Reader) -> MetricsConfig:
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


def _images(section: _Reader) -> ImagesConfig:
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


def _workers_backend(section: _Reader) -> WorkersConfig:
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


def _workers(section: _Reader) -> int | Literal["auto"]:
    value = section.table.get("workers", 1)
    if value == "auto":
        section.seen.add("workers")
        return "auto"
    if isinstance(value, str):
        raise ConfigError(f'{section.prefix}workers: must be an integer >= 1 or "auto"')
    workers: int = section.positive("workers", int, 1)
    return workers


def _scheduler(section: _Reader) -> SchedulerConfig:
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


def _credits(section: _Reader) -> CreditsConfig:
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
        cost_controlnet_percent=section.non_negative("cost_controlnet_percent", 50),
        role_allowances=section.id_map("role_allowances"),
    )
    section.reject_unknown()
    return config


def _discord(section: _Reader) -> DiscordConfig:
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


def _moderation(section: _Reader) -> ModerationConfig:
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


class _Reader:
    """Typed access to one TOML table that remembers which keys were read."""

    def __init__(self, table: Any, prefix: str = "") -> None:
        if not isinstance(table, dict):
            raise ConfigError(f"{prefix.rstrip('.') or 'config'}: must be a table")
        self.table = table
        self.prefix = prefix
        self.seen: set[str] = set()

    def section(self, name: str) -> _Reader:
        self.seen.add(name)
        return _Reader(self.table.get(name, {}), f"{self.prefix}{name}.")

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
