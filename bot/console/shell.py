"""The console front end: the bot's commands in a terminal, on the same app, scheduler and
credits as the Discord bot (in the spirit of Hubot's shell adapter).

    /imagine a red fox --ar 3:2      queue a job; progress prints in place
    /imagine a {red, blue} fox --r 2 several jobs (permutations, --repeat), all or none
    U2  V3  🔄 (or reroll)            press a button of the last finished job
    U2 17                            …or of job 17
    /balance  /jobs  /help  /models  /cancel [job]  /grant N  /workers  /quit
    /fast  /relax  /turbo            your speed mode (--fast/--relax/--turbo: one prompt's)
    enhance 2 [job]                  image 2 of a draft (--draft) at full quality
    /shorten a prompt …              which words CLIP notices; shorter N imagines prompt N

U1–U4 pick an image (free, no job: its path is printed) and make it the current image, as does
a finished upscale; what is under an image on Discord then works on it:

    upscale [subtle|creative]        vary subtle|strong
    zoom 2 | zoom 1.5 | zoom 1.2 [new prompt]    pan left|right|up|down    square
    region centre,top_left [new prompt]          (regions as in Vary (Region))

The console user is the machine's owner, so they are an admin. Image paths are printed; the
files live under the data folder. Commands may also come from a pipe; at the end of input the
shell waits for queued jobs to finish before it exits.
"""

from __future__ import annotations

import asyncio
import logging
import re
import signal
import sys
from typing import Any, TextIO

from bot.app import catalog, render
from bot.app.actions import Action, Actor, Submitted, UserError
from bot.app.application import ImagineApp, open_core
from bot.app.drafts import is_draft
from bot.app.shorten import shorten_text
from bot.config import Config
from bot.core.clock import system_clock
from bot.core.models import (
    Finished,
    Job,
    JobKind,
    JobState,
    Mode,
    ProgressUpdate,
    Queued,
    Started,
)
from bot.core.service import Core
from generation.contract import Region

log = logging.getLogger(__name__)

SHELL_USER_ID = 1
_BUTTON = re.compile(
    r"^(?:(?P<action>[UV])(?P<index>[1-4])|(?P<reroll>🔄|reroll|r))(?:\s+(?P<job>\d+))?$", re.I
)
_VARY = {"subtle": Action.VARY_SUBTLE, "strong": Action.VARY_STRONG}
_UPSCALE = {"subtle": Action.UPSCALE_SUBTLE, "creative": Action.UPSCALE_CREATIVE}
_ZOOM = {"2": Action.ZOOM_OUT_2, "1.5": Action.ZOOM_OUT_1_5}
_PAN = {
    "left": Action.PAN_LEFT,
    "right": Action.PAN_RIGHT,
    "up": Action.PAN_UP,
    "down": Action.PAN_DOWN,
}
NO_IMAGE = "No image picked — pick one with U1–U4 first."


class Shell:
    def __init__(self, config: Config, core: Core, out: TextIO = sys.stdout) -> None:
        self.config = config
        self.core = core
        self.app = ImagineApp(config, core)
        self.out = out
        self.actor = Actor(user_id=SHELL_USER_ID, is_admin=True, is_owner=True)
        self.last_job: int | None = None
        self.following: set[asyncio.Task[None]] = set()
        self.newest: asyncio.Task[None] | None = None
        self.newest_id: int | None = None
        # The image the edit commands work on: (job, 1-based index; 0 = a one-image job's).
        self.image: tuple[int, int] | None = None

    def say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    async def handle(self, line: str) -> bool:
        """Run one command line; False means quit."""
        line = line.strip()
        if not line:
            return True
        try:
            return await self._dispatch(line)
        except UserError as exc:
            self.say(f"✖ {exc}")
        except ValueError as exc:
            self.say(f"✖ {exc}")
        return True

    async def _dispatch(self, line: str) -> bool:
        command, _, rest = line.partition(" ")
        command = command.lower()
        if command in ("/quit", "/exit"):
            return False
        if command == "/imagine":
            text = rest.removeprefix("prompt:").strip()
            for submitted in await self.app.imagine(self.actor, text):
                self.say(render.queued_text(submitted.job, submitted.position, submitted.notes))
                self._follow(submitted.job)
        elif command == "/shorten":
            self._queued(await self.app.shorten(self.actor, rest.removeprefix("prompt:").strip()))
        elif command in ("enhance", "shorter"):
            # "enhance 2": image 2 of the newest draft at full quality; "shorter 1": the
            # newest /shorten's first shorter prompt, imagined.
            number, _, job_text = rest.strip().partition(" ")
            if not number.isdigit():
                raise UserError(f"{command}: expected a number, such as {command} 1")
            if command == "enhance":
                await self._press(Action.ENHANCE, int(number), job_text)
            else:
                job_id = await self._job_id(job_text)
                for submitted in await self.app.imagine_shortened(self.actor, job_id, int(number)):
                    self._queued(submitted)
        elif command == "/balance":
            balance = await self.core.credits.balance(SHELL_USER_ID)
            entries = await self.core.credits.ledger(SHELL_USER_ID, 5)
            modes = await self.app.modes.balance_lines(self.actor)
            self.say(render.balance_text(balance, entries, system_clock(), modes))
        elif command in ("/fast", "/relax", "/turbo"):
            self.say(await self.app.modes.choose(self.actor, Mode(command[1:])))
        elif command == "/jobs":
            self.say(render.jobs_text(await self.core.scheduler.user_jobs(SHELL_USER_ID)))
        elif command == "/help":
            self.say(render.help_text(self.config))
        elif command == "/models":
            sections = catalog.catalog_sections(self.config)
            self.say("\n".join(f"**{title}**\n{text}" for title, text in sections))
        elif command == "/grant":
            amount = int(rest) if rest.strip().isdigit() else 0
            balance = await self.core.admin.grant(SHELL_USER_ID, amount, SHELL_USER_ID, "shell")
            self.say(f"Granted {amount}; granted balance now {balance.granted}.")
        elif command == "/workers":
            self.say(render.workers_text(self.core.admin.workers()))
        elif command == "/cancel":
            job = await self.app.cancel(self.actor, await self._job_id_now(rest))
            self.say(f"Cancelling job {job.id}.")
        elif command == "vary" and rest.split()[0:1] and rest.split()[0].lower() in _VARY:
            await self._on_image(_VARY[rest.split()[0].lower()])
        elif command in ("upscale", "up"):
            mode = rest.strip().lower() or "subtle"
            if mode not in _UPSCALE:
                raise UserError(f"mode: expected subtle or creative, got {mode!r}")
            await self._on_image(_UPSCALE[mode])
        elif command == "zoom":
            await self._zoom(rest)
        elif command == "pan":
            direction = rest.strip().lower()
            if direction not in _PAN:
                raise UserError(f"direction: expected left, right, up or down, got {direction!r}")
            await self._on_image(_PAN[direction])
        elif command == "square":
            await self._on_image(Action.MAKE_SQUARE)
        elif command == "region":
            await self._region(rest)
        elif match := _BUTTON.match(line):
            if match["reroll"]:
                await self._press(Action.REROLL, 0, match["job"] or "")
            elif match["action"].upper() == "U":
                await self._separate(int(match["index"]), match["job"] or "")
            else:
                await self._press(Action.VARY, int(match["index"]), match["job"] or "")
        else:
            self.say(
                f"✖ Unknown command {command!r}. Try /help, /imagine …, U1–U4, V1–V4, 🔄, "
                "upscale, vary, zoom, pan, square, region."
            )
        return True

    async def _separate(self, index: int, job_text: str) -> None:
        """U1–U4: no job, nothing charged; the image becomes the one the edits work on."""
        job_id = await self._job_id(job_text)
        path = await self.app.separate(self.actor, job_id, index)
        self.image = (job_id, index)
        self.say(f"Image #{index} of job {job_id}: {path}")
        self.say("  next: upscale · vary · zoom · pan · square · region")

    async def _current_image(self) -> tuple[int, int]:
        if self.newest is not None:  # an upscale still running becomes the current image
            await asyncio.gather(self.newest, return_exceptions=True)
        if self.image is None:
            raise UserError(NO_IMAGE)
        return self.image

    async def _on_image(self, action: Action) -> None:
        job_id, index = await self._current_image()
        self._queued(await self.app.press(self.actor, job_id, action, index))

    async def _zoom(self, rest: str) -> None:
        factor, _, prompt = rest.strip().partition(" ")
        if factor in _ZOOM and not prompt:
            await self._on_image(_ZOOM[factor])
            return
        job_id, index = await self._current_image()
        if not prompt:
            prompt = (await self.app.job(self.actor, job_id)).prompt
        self._queued(
            await self.app.custom_zoom(self.actor, job_id, index, prompt=prompt, factor=factor)
        )

    async def _region(self, rest: str) -> None:
        names, _, prompt = rest.strip().partition(" ")
        if not names:
            known = ", ".join(r.value for r in Region)
            raise UserError(f"regions: name one or more, comma-separated ({known})")
        job_id, index = await self._current_image()
        regions = [name.strip().lower() for name in names.split(",") if name.strip()]
        self._queued(
            await self.app.vary_region(
                self.actor, job_id, index, prompt=prompt.strip() or None, regions=regions
            )
        )

    async def _job_id(self, text: str) -> int:
        text = text.strip()
        if text:
            if not text.isdigit():
                raise UserError(f"job: expected a job number, got {text!r}")
            return int(text)
        # "U2" means the newest grid: when commands arrive faster than jobs finish (typed
        # ahead, or piped in), wait for the newest job instead of acting on an older one.
        if self.newest is not None:
            await asyncio.gather(self.newest, return_exceptions=True)
        if self.last_job is None:
            raise UserError("No job yet — start one with /imagine.")
        return self.last_job

    async def _press(self, action: Action, index: int, job_text: str) -> None:
        self._queued(await self.app.press(self.actor, await self._job_id(job_text), action, index))

    def _queued(self, submitted: Submitted) -> None:
        self.say(render.queued_text(submitted.job, submitted.position))
        self._follow(submitted.job)

    async def _job_id_now(self, text: str) -> int:
        """A job that may still be running (for /cancel): never waits."""
        if text.strip() or self.newest is None:
            return await self._job_id(text)
        return self.newest_id  # type: ignore[return-value]

    def _follow(self, job: Job) -> None:
        task = asyncio.create_task(self._follow_job(job))
        self.newest, self.newest_id = task, job.id
        self.following.add(task)
        task.add_done_callback(self.following.discard)

    async def _follow_job(self, job: Job) -> None:
        async with self.core.scheduler.subscribe(job.id) as events:
            async for event in events:
                if isinstance(event, Queued):
                    self._status(f"job {job.id}: queued, position {event.position}")
                elif isinstance(event, Started):
                    self._status(f"job {job.id}: started")
                elif isinstance(event, ProgressUpdate):
                    self._status(
                        f"job {job.id}: {render.progress_bar(event.fraction)} "
                        f"{event.step}/{event.total} ({event.fraction:.0%})"
                    )
                elif isinstance(event, Finished):
                    self._finished(event.job)

    def _status(self, text: str) -> None:
        # In place on a terminal; one line per update when piped to a file.
        if self.out.isatty():
            self.out.write("\r\033[K" + text)
            self.out.flush()
        else:
            self.say(text)

    def _finished(self, job: Job) -> None:
        if self.out.isatty():
            self.out.write("\r\033[K")
        if job.state is not JobState.SUCCEEDED or job.result is None:
            self.say(render.finished_text(job))
            return
        self.last_job = job.id
        if job.kind is JobKind.SHORTEN:
            self.say(
                shorten_text(job, refused=lambda t: self.app.prompt_filter.check(t) is not None)
            )
            self.say("  next: shorter N imagines shorter prompt N")
            return
        self.say(render.result_text(job))
        data_dir = self.config.data_dir
        grid = job.grid_file(data_dir)
        if grid is not None and len(job.result.image_paths) > 1:
            self.say(f"  grid: {grid}")
        for index in range(len(job.result.image_paths)):
            self.say(f"  image {index + 1}: {job.image_path(data_dir, index)}")
        if len(job.result.image_paths) > 1:
            self.say("  next: U1–U4 pick an image · V1–V4 vary · 🔄 reroll")
            if is_draft(job):
                self.say("  a draft: enhance N renders image N at full quality")
        else:
            self.image = (job.id, 0)
            self.say("  next: upscale · vary · zoom · pan · square · region")

    async def wait_for_jobs(self) -> None:
        while self.following:
            await asyncio.gather(*list(self.following), return_exceptions=True)


async def run_shell(
    config: Config,
    *,
    stdin: TextIO = sys.stdin,
    out: TextIO = sys.stdout,
    core_options: dict[str, Any] | None = None,
) -> int:
    # The console has no age-restricted channels: the safety check applies to everything.
    core = await open_core(config, lambda _channel: False, **(core_options or {}))
    shell = Shell(config, core, out)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(signum, stop.set)
        except (NotImplementedError, RuntimeError):
            pass
    shell.say(f"imagine-bot console — model {config.engine.default_model}. Type /help.")
    try:
        while not stop.is_set():
            if stdin.isatty():
                out.write("> ")
                out.flush()
            reader = asyncio.ensure_future(asyncio.to_thread(stdin.readline))
            stopper = asyncio.ensure_future(stop.wait())
            done, _ = await asyncio.wait({reader, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if stopper in done:
                reader.cancel()
                break
            stopper.cancel()
            line = reader.result()
            if line == "":
                await shell.wait_for_jobs()
                break
            if not await shell.handle(line):
                break
    finally:
        await core.close()
    return 0
