"""The typed, immutable sections of `config.toml` (`Config` and one dataclass per table), and
`ConfigError`, which names the key that is wrong."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from bot.config.web import WebConfig
from generation.prompt import MAX_JOBS
from generation.settings import EngineSettings


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
    # --draft: a draft costs this many percent of the same job at full quality (rounded up, at
    # least 1 credit); Enhance is then an ordinary job at full price.
    cost_draft_percent: int = 25
    # /shorten: one CLIP text pass over a few dozen variants of the prompt, no diffusion
    # (milliseconds): free by default. Its buttons' jobs are ordinary /imagine jobs.
    cost_shorten: int = 0
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
class ModesConfig:
    """Relax, Fast and Turbo (`[modes]`): how each is charged and what caps relax."""

    # Relax where a server has not set its own switch (/admin relax), and in DMs.
    relax_enabled: bool = True
    # A relax job costs this percent of its fast cost, rounded down (0: free; at most 100).
    relax_cost_percent: int = 0
    # Relax jobs one member may have waiting at once (they count in max_queued_per_user too).
    relax_max_queued_per_user: int = 2
    # Relax jobs one member may queue per UTC day (failed and withheld ones don't count).
    relax_max_per_day: int = 30
    # Turbo: ahead of every fast job, at this percent of the fast cost, rounded up (>= 100).
    turbo_cost_percent: int = 200
    # The run time a queued job's expected wait assumes until jobs have run (seconds).
    wait_estimate_run_s: float = 30.0


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
    web: WebConfig = field(default_factory=WebConfig)
    modes: ModesConfig = field(default_factory=ModesConfig)

    @property
    def database_path(self) -> Path:
        return self.data_dir / "imagine-bot.sqlite3"

    @property
    def images_dir(self) -> Path:
        return self.data_dir / "images"
