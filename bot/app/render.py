"""Text both front ends show: job status lines, results, balances, help.

Plain strings with light Markdown (Discord renders it, a terminal shows it readably). User text
is passed through `quote_prompt`; pings are prevented by the Discord layer's allowed_mentions,
not by mangling the prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING

from bot.app.catalog import add_ons_text
from bot.app.modes import modes_help
from bot.app.personalize import PERSONALIZATION_HELP, taste_line
from bot.config import Config
from bot.core.credits import describe_wait
from bot.core.models import (
    ActiveJob,
    AuditEntry,
    Balance,
    Job,
    JobKind,
    JobState,
    LedgerEntry,
    QueueSnapshot,
)
from generation.conditioning import WEIGHT_HELP
from generation.contract import DDPM_CLEAN_STEPS, Sampler
from generation.flags import FLAGS, FlagSpec, Treatment
from generation.settings import EngineSettings

if TYPE_CHECKING:
    from bot.app.actions import MemberInfo
    from bot.core.preferences import Preferences
    from bot.core.service import WorkersView

_BAR_CELLS = 12
_PROMPT_PREVIEW_CHARS = 300


def quote_prompt(prompt: str, limit: int = _PROMPT_PREVIEW_CHARS) -> str:
    """The prompt as inline text that Markdown in it can't break out of."""
    text = " ".join(prompt.split())
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    # Backticks would close the code span early; a look-alike keeps the text readable.
    return "`" + text.replace("`", "ˋ") + "`" if text else "`(empty)`"


def progress_bar(fraction: float) -> str:
    filled = round(max(0.0, min(1.0, fraction)) * _BAR_CELLS)
    return "▰" * filled + "▱" * (_BAR_CELLS - filled)


def job_title(job: Job) -> str:
    titles = {
        JobKind.IMAGINE: "Imagine",
        JobKind.REROLL: "Reroll",
        JobKind.VARIATION: "Variations",
        JobKind.UPSCALE: "Upscale",
        "zoom": "Zoom Out",
        "pan": "Pan",
        "square": "Make Square",
        "region": "Vary (Region)",
        "enhance": "✨ Enhance",
        "shorten": "Shorten",
    }
    what = titles.get(job.kind, job.kind.value.replace("_", " ").capitalize())
    if job.request_data.get("draft"):
        what += " (💨 draft)"
    if job.parent_job_id is not None and job.parent_index is not None:
        what += f" of image {job.parent_index + 1} from job {job.parent_job_id}"
    elif job.parent_job_id is not None:
        what += f" of job {job.parent_job_id}"
    if not job.prompt.strip() and job.request_data.get("inputs"):
        # A /blend or a /describe: the pictures are what it is about.
        return f"{what} — {len(job.request_data['inputs'])} picture(s)"
    return f"{what} — {quote_prompt(job.prompt)}"


# How each picture role is shown, with the flag that set its weight.
_PICTURE_LABELS = {
    "image_prompt": ("image", "--iw"),
    "style": ("style", "--sw"),
    "object": ("object", "weight"),
}


def pictures_line(job: Job) -> str:
    """The member's pictures with their weights ("" when there are none). Links are wrapped
    in <> so Discord shows no preview of them."""
    parts = []
    for picture in job.request_data.get("inputs", ()):
        label = _PICTURE_LABELS.get(str(picture.get("role")))
        if label is None:
            continue
        shown = picture_source(str(picture.get("source", "")))
        parts.append(f"{label[0]} {shown} ({label[1]} {float(picture.get('weight', 1)):g})")
    return "🖼️ " + " · ".join(parts) if parts else ""


def picture_source(source: str) -> str:
    """Where a member's picture came from, for a message: an attachment's name, or its link in
    <> so Discord shows no preview of it (the picture itself is attached beside the result)."""
    if source.startswith("attachment:"):
        return "`" + source.removeprefix("attachment:").replace("`", "ˋ")[:60] + "`"
    return "<" + source.replace(">", "%3E")[:300] + ">"


def settings_line(job: Job) -> str:
    data = job.request_data
    width = job.result.width if job.result else data.get("width")
    height = job.result.height if job.result else data.get("height")
    sampler = Sampler(data.get("sampler", Sampler.DPMPP_2M_KARRAS.value)).a1111_name
    parts = [
        f"seed {job.seed}",
        f"{width}x{height}",
        f"{data.get('steps')} steps",
        sampler,
        f"CFG {data.get('guidance')}",
        f"model {data.get('model')}",
        add_ons_text(data),  # LoRAs and ControlNet with their weights, if any
        f"cost {job.cost} credit{'s' if job.cost != 1 else ''}",
    ]
    return " · ".join(str(p) for p in parts if p)


def queued_text(job: Job, position: int | None, notes: Sequence[str] = ()) -> str:
    where = f"position {position} in the queue" if position else "waiting for a free GPU"
    lines = [f"**{job_title(job)}**", f"⏳ Queued — {where}. Job {job.id}, {settings_line(job)}"]
    lines += [line for line in (pictures_line(job),) if line]
    lines += [f"ℹ️ {note}" for note in notes]
    return "\n".join(lines)


def batch_notes(jobs: Sequence[Job], index: int) -> tuple[str, ...]:
    """Where job `index` stands among the jobs one prompt made (none for a single job); the
    first one's message also says what they cost together."""
    count = len(jobs)
    if count == 1:
        return ()
    if index == 0:
        total = sum(job.cost for job in jobs)
        ids = f"jobs {jobs[0].id}–{jobs[-1].id}"
        return (
            f"this prompt made {count} jobs ({ids}), {total} credits in all; this is 1 of {count}",
        )
    return (f"job {index + 1} of {count} from one prompt (the first is job {jobs[0].id})",)


def running_text(job: Job, step: int, total: int, notes: Sequence[str] = ()) -> str:
    fraction = step / total if total else 0.0
    lines = [
        f"**{job_title(job)}**",
        f"🎨 {progress_bar(fraction)} {step}/{total} steps ({fraction:.0%}) — job {job.id}",
    ]
    lines += [f"ℹ️ {note}" for note in notes]
    return "\n".join(lines)


def result_text(job: Job, mention: str = "", notes: Sequence[str] = ()) -> str:
    """The caption under a finished job's image(s)."""
    lines = [f"**{job_title(job)}**" + (f" — {mention}" if mention else "")]
    lines.append(settings_line(job))
    result = job.result
    if result is not None and job.kind in (JobKind.IMAGINE, JobKind.REROLL, JobKind.VARIATION):
        candidates = job.request_data.get("num_candidates", len(result.image_paths))
        scores = ", ".join(f"{s:.1f}" for s in result.clip_scores)
        seeds = ", ".join(str(s) for s in result.seeds)
        kept = len(result.image_paths)
        lines.append(f"Best {kept} of {candidates} by CLIP (scores {scores}; seeds {seeds})")
    if result is not None and result.personalized:
        lines.append("🎯 Personalized: ranked by taste (`--p`) as well as by the prompt")
    lines += [line for line in (pictures_line(job),) if line]
    lines += [f"ℹ️ {note}" for note in notes]
    return "\n".join(lines)


def separated_text(job: Job, index: int, mention: str) -> str:
    """The caption of one image of a grid posted on its own (U1–U4)."""
    return f"**Image #{index}** of job {job.id} — {quote_prompt(job.prompt)} — {mention}"


def finished_marker(job: Job) -> str:
    """Text every no-image final message of a job carries (restart recovery looks for it)."""
    return f"(job {job.id})"


def finished_text(job: Job) -> str:
    """A job that ended without images: why, and what happened to the credits."""
    refunded = f"your {job.cost} credit{'s were' if job.cost != 1 else ' was'} refunded"
    marker = finished_marker(job)
    if job.state is JobState.CANCELLED:
        return f"**{job_title(job)}**\n🚫 Cancelled {marker} — {refunded}."
    if job.state is JobState.REFUSED:
        reason = job.error or "Withheld by the safety filter"
        return f"**{job_title(job)}**\n⛔ {reason} {marker} — {refunded}."
    return (
        f"**{job_title(job)}**\n⚠️ Something went wrong {marker}: "
        f"{job.error or 'unknown error'} — {refunded}."
    )


def undelivered_text(job: Job, reason: str) -> str:
    """A job whose images can't be posted where it was asked for: why, and the refund."""
    if job.state is not JobState.SUCCEEDED:
        return finished_text(job)
    credits = f"your {job.cost} credit{'s were' if job.cost != 1 else ' was'} refunded"
    return (
        f"**{job_title(job)}**\n⚠️ Finished {finished_marker(job)}, but I can't post the "
        f"images in that channel ({reason}) — {credits}. A server admin can give me View "
        "Channel, Send Messages (Send Messages in Threads in a thread), Attach Files and "
        "Read Message History there."
    )


def done_ping(job: Job, mention: str) -> str:
    return f"{mention} your job {job.id} is done: {quote_prompt(job.prompt, 80)}"


def balance_text(
    balance: Balance, entries: Sequence[LedgerEntry], now: datetime, extra: Sequence[str] = ()
) -> str:
    """`extra`: more lines before the recent activity (the mode and relax use)."""
    lines = [
        f"**{balance.available} credits available**",
        f"• Free today: {balance.allowance_left} of {balance.allowance_level} "
        f"(resets in {describe_wait(balance.resets_at, now)}, at 00:00 UTC)",
        f"• Granted: {balance.granted}",
    ]
    if balance.held:
        lines.append(f"• Held by your queued/running jobs: {balance.held}")
    if balance.banned:
        lines.append("• ⛔ You are banned from using this bot.")
    lines += extra
    if entries:
        lines.append("Recent activity:")
        lines += [ledger_line(entry) for entry in entries]
    return "\n".join(lines)


def settings_text(prefs: Preferences, engine: EngineSettings) -> str:
    """A member's settings as /settings and /info show them."""

    def shown(value: object, default: object) -> str:
        return f"**{value}**" if value is not None else f"server default ({default})"

    sampler = Sampler(prefs.sampler).a1111_name if prefs.sampler else None
    lines = [
        f"• Aspect: {shown(prefs.aspect, '1:1')}",
        f"• Model: {shown(prefs.model, engine.model(None).name)}",
        f"• Sampler: {shown(sampler, engine.default_sampler.a1111_name)}",
        f"• Steps: {shown(prefs.steps, engine.default_steps)}",
        f"• Previews while a job runs: **{'on' if prefs.previews else 'off'}**",
        f"• Remix (edit the prompt before V, Vary, Zoom and Pan): "
        f"**{'on' if prefs.remix else 'off'}**",
        f"• `--p` by default (rank by your taste): **{'on' if prefs.personalize else 'off'}**",
        f"• Suffix: {quote_prompt(prefs.suffix) if prefs.suffix else 'none'} (/prefer suffix)",
        f"• Shortcuts: {', '.join(f'`--{n}`' for n in prefs.options) or 'none'} (/prefer option)",
    ]
    head = "**Your settings** — typed flags always win over these defaults."
    return "\n".join([head, *lines])


def options_text(prefs: Preferences) -> str:
    if not prefs.options:
        return "You have no shortcuts. Make one with `/prefer option set mystyle --ar 3:2 …`."
    lines = [f"• `--{name}` → {quote_prompt(value)}" for name, value in prefs.options.items()]
    return "**Your shortcuts**\n" + "\n".join(lines)


def info_text(info: MemberInfo, engine: EngineSettings, now: datetime) -> str:
    """/info: balance and allowance, queued and running jobs with positions, settings."""
    return "\n\n".join(
        [
            balance_text(info.balance, (), now),
            "**Your jobs**\n" + jobs_text(info.jobs),
            settings_text(info.preferences, engine),
            *([taste_line(info.taste)] if info.taste is not None else []),
        ]
    )


def ledger_line(entry: LedgerEntry) -> str:
    when = entry.created_at.strftime("%Y-%m-%d %H:%M")
    job = f" job {entry.job_id}" if entry.job_id is not None else ""
    reason = f" — {entry.reason}" if entry.reason else ""
    return f"`{when}` {entry.amount:+d} {entry.kind.value}{job}{reason}"


def jobs_text(active: Sequence[ActiveJob]) -> str:
    if not active:
        return "You have no queued or running jobs."
    lines = []
    for item in active:
        where = "running" if item.position is None else f"queued, position {item.position}"
        prompt = quote_prompt(item.job.prompt, 80)
        lines.append(f"• Job {item.job.id} ({item.job.kind.value}, {where}): {prompt}")
    return "\n".join(lines)


def queue_text(snapshot: QueueSnapshot) -> str:
    head = "⏸️ The queue is **paused**." if snapshot.paused else "▶️ The queue is running."
    lines = [
        f"{head} {len(snapshot.running)} running, {len(snapshot.queued)} queued, "
        f"{snapshot.worker_slots} worker slot(s)."
    ]
    for item in [*snapshot.running, *snapshot.queued][:20]:
        where = "running" if item.position is None else f"#{item.position}"
        lines.append(
            f"• {where} job {item.job.id} by <@{item.job.owner.user_id}> "
            f"({item.job.kind.value}, {item.job.cost} cr)"
        )
    return "\n".join(lines)


def workers_text(view: WorkersView) -> str:
    """`/admin workers`: where each worker runs, what it holds and what it is doing."""
    lines = [f"{view.backend}; {len(view.workers)} worker(s)."]
    if not view.workers:
        lines.append("No worker: jobs wait in the queue until one is ready.")
    for worker in view.workers[:25]:
        where = worker.node + (f" · {worker.device}" if worker.device else "")
        doing = ", ".join(f"job {job_id}" for job_id in worker.jobs) or "idle"
        state = doing if worker.ready else f"starting ({doing})" if worker.jobs else "starting"
        models = ", ".join(worker.models) or "none yet"
        memory = (
            f" · {worker.gpu_memory_bytes / 2**30:.1f} GiB"
            if worker.gpu_memory_bytes is not None
            else ""
        )
        lines.append(f"• `{worker.name}` on {where}: {state} · models: {models}{memory}")
    return "\n".join(lines)


def audit_text(entries: Sequence[AuditEntry]) -> str:
    if not entries:
        return "The audit log is empty."
    lines = []
    for entry in entries:
        when = entry.created_at.strftime("%Y-%m-%d %H:%M")
        who = f"<@{entry.user_id}>" if entry.user_id else "-"
        job = f" job {entry.job_id}" if entry.job_id else ""
        lines.append(f"`{when}` {entry.kind} {who}{job}: {entry.reason}")
    return "\n".join(lines)


def help_text(config: Config) -> str:
    credits = config.credits
    engine = config.engine
    honoured = [f for f in FLAGS if f.treatment is Treatment.HONOURED]
    mapped = [f for f in FLAGS if f.treatment is Treatment.MAPPED]
    ignored = [f for f in FLAGS if f.treatment is Treatment.IGNORED]

    def flag(spec: FlagSpec) -> str:
        hint = f" {spec.value_hint}" if spec.value_hint else ""
        return f"`--{spec.name}{hint}` {spec.meaning}"

    models = ", ".join(f"`{m.name}`" for m in engine.models)
    return "\n".join(
        [
            "**imagine-bot** makes images with Stable Diffusion: each job draws "
            f"{engine.num_candidates} candidates, ranks them with CLIP against your prompt and "
            f"shows the best {engine.num_kept} in a grid.",
            "**Commands**: `/imagine prompt` (options: negative, aspect, seed, steps, guidance, "
            "sampler, model, lora, control_image, image, image2), `/blend`, `/describe`, "
            "`/models` (the models, LoRAs and ControlNets offered here), `/balance`, `/jobs`, "
            "`/fast`, `/relax`, `/turbo`, `/shorten`, `/rank`, `/help`.",
            "**Buttons**: U1–U4 upscale an image 2x · V1–V4 make variations · 🔄 rerolls with a "
            "new seed · Cancel stops a waiting or running job (refunded).",
            "**Flags you can type in the prompt**:",
            *[f"• {flag(spec)}" for spec in honoured],
            "**Midjourney flags mapped to Stable Diffusion**:",
            *[f"• {flag(spec)}" for spec in mapped],
            "• `a::2 b::1` weighs parts of the prompt against each other",
            "**Several jobs from one prompt**: `a {red, blue} bird --ar {1:1, 2:3}` makes one job "
            "per combination (here 4; braces nest, `\\,` is a comma inside an option) and "
            "`--r N` (`--repeat N`) makes N jobs with different seeds; at most "
            f"{config.scheduler.max_jobs_per_prompt} jobs per prompt, and no more than your "
            f"queue has room for ({config.scheduler.max_queued_per_user}). Each job gets its own "
            "message, grid and buttons; all of them are charged together, or none is.",
            "**Pictures**: image links at the start of the prompt, or /imagine's `image` and "
            "`image2`, are image prompts (one needs words beside it; two or more alone are "
            "blended); `/blend` mixes 2–5 pictures (shape portrait, square "
            "or landscape); `/describe` suggests four prompts for a picture (buttons 1–4 "
            "imagine one, 🔄 suggests others). Pictures come as Discord attachments or links to "
            f"them ({', '.join(config.images.allowed_hosts)}), at most "
            f"{config.images.max_bytes // (1024 * 1024)} MB, PNG, JPEG, WebP or GIF.",
            *[f"• {line}" for line in WEIGHT_HELP.splitlines()],
            PERSONALIZATION_HELP,
            f"**Drafts**: `--draft` renders a fast, cheap draft ({engine.draft_steps} steps with "
            f"{engine.draft_sampler.a1111_name}) for {credits.cost_draft_percent} % of the job's "
            "price; ✨ Enhance under a draft image renders that image at full quality from the "
            "same seed and prompt (an ordinary job at the full price). Upscales and edits "
            "(Zoom, Pan, Make Square, Vary (Region)) work on the enhanced image, not the draft. "
            "A draft needs a sampler that adds no noise (not euler_a, DDPM or SDE).",
            "**/shorten** `prompt` shows which words CLIP notices (bold) and barely notices "
            "(struck), and up to five shorter prompts; buttons 1–5 imagine one (charged as "
            f"/imagine). /shorten itself costs {credits.cost_shorten} credit"
            + ("s." if credits.cost_shorten != 1 else "."),
            "**Accepted and ignored** (no equivalent here): "
            + ", ".join(f"`--{spec.name}`" for spec in ignored),
            f"**Models**: {models}. Samplers: "
            + ", ".join(f"`{s.value}`" for s in Sampler)
            + f" (`ddpm`, the original ancestral sampler, needs about {DDPM_CLEAN_STEPS} steps "
            "for a clean image, more than this server allows: expect noise; `ddim` draws the "
            "same model's picture in 20–50).",
            f"**Costs**: /imagine {credits.cost_imagine} credits at 512x512, 30 steps, "
            f"{engine.num_candidates} candidates (bigger or longer jobs cost more; Heun, DPM2 and "
            "DPM++ SDE run the model twice a step and cost twice) · variations "
            f"{credits.cost_variation} · upscale {credits.cost_upscale} per 1024² of output · "
            f"reroll as its original. Free allowance: {credits.daily_allowance} credits a day "
            "(UTC); failed, cancelled or refused jobs are refunded in full.",
            modes_help(config.modes),
        ]
    )
