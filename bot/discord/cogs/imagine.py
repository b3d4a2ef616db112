"""/imagine: a prompt (Midjourney-style flags, pictures, a model and LoRAs) into jobs, and the
suggestions of its `model` and `lora` options."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import discord
from discord import app_commands
from discord.ext import commands

from bot.app import catalog, render
from bot.app.actions import UserError
from bot.app.application import ImagineApp
from bot.config import Config
from bot.discord.actors import Actors
from bot.discord.delivery import Delivery, JobMessage
from bot.discord.interactions import clip
from bot.discord.permissions import missing_for_delivery, refusal_text
from bot.discord.status import StatusMessages
from bot.discord.views.buttons import cancel_view
from generation.contract import MAX_SEED, Sampler
from generation.prompt import MAX_INPUT_CHARS, ImagineOptions
from generation.references import LINK

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])

# What each option of /imagine says in Discord.
IMAGINE_OPTIONS = dict(
    prompt="What to draw; Midjourney-style flags like --ar 3:2 --seed 7 --no text work too",
    negative="What to keep out of the image (same as --no)",
    aspect="Aspect ratio (same as --ar)",
    seed="Seed for reproducible results (same as --seed)",
    steps="Denoising steps: more is slower and finer (same as --steps)",
    guidance="How closely to follow the prompt, CFG scale (same as --cfg)",
    sampler="Sampling method (same as --sampler)",
    model="Which model to use (see /models; same as --model)",
    lora="LoRAs to add: NAME or NAME:0.8, several with commas (same as --lora; see /models)",
    control_image="The picture a --cn ControlNet follows (its edges, depth …)",
    image="A picture to start from (an image prompt; --iw 0-3 sets how strongly it steers)",
    image2="A second image prompt",
)
ASPECT_CHOICES = ["1:1", "3:2", "2:3", "4:3", "3:4", "16:9", "9:16", "21:9", "9:21"]


class ImagineCog(commands.Cog, name="Imagine"):
    def __init__(
        self,
        config: Config,
        app: ImagineApp,
        actors: Actors,
        delivery: Delivery,
        status: StatusMessages,
    ) -> None:
        self.config = config
        self.app = app
        self.actors = actors
        self.delivery = delivery
        self.status = status
        # Built here, not in the class body: its `steps` range is the server's configured
        # maximum, known only once the config is loaded.
        self.imagine = self._imagine_command()
        self.__cog_app_commands__ = [*self.__cog_app_commands__, self.imagine]

    def _imagine_command(self) -> app_commands.Command[Any, ..., None]:
        cog = self

        @app_commands.command(name="imagine", description="Make images from a text prompt")
        @app_commands.describe(**IMAGINE_OPTIONS)
        @app_commands.choices(
            aspect=[app_commands.Choice(name=a, value=a) for a in ASPECT_CHOICES],
            sampler=[app_commands.Choice(name=s.a1111_name, value=s.value) for s in Sampler],
        )
        # The server's configured maximum, so Discord's client refuses more before anyone waits.
        @_annotate(steps=app_commands.Range[int, 1, self.config.engine.max_steps] | None)
        async def imagine(
            interaction: discord.Interaction[Any],
            prompt: app_commands.Range[str, 1, MAX_INPUT_CHARS],
            negative: app_commands.Range[str, 1, 1000] | None = None,
            aspect: str | None = None,
            seed: app_commands.Range[int, 0, MAX_SEED] | None = None,
            steps: int | None = None,
            guidance: app_commands.Range[float, 0.0, 30.0] | None = None,
            sampler: str | None = None,
            model: str | None = None,
            lora: app_commands.Range[str, 1, 200] | None = None,
            control_image: discord.Attachment | None = None,
            image: discord.Attachment | None = None,
            image2: discord.Attachment | None = None,
        ) -> None:
            options = ImagineOptions(negative, aspect, seed, steps, guidance, sampler, lora)
            await cog.run_imagine(
                interaction, prompt, options, model, (image, image2), control_image
            )

        @imagine.autocomplete("model")
        async def model_autocomplete(
            interaction: discord.Interaction[Any], current: str
        ) -> list[app_commands.Choice[str]]:
            return _choices(catalog.model_choices(cog.config, current))

        @imagine.autocomplete("lora")
        async def lora_autocomplete(
            interaction: discord.Interaction[Any], current: str
        ) -> list[app_commands.Choice[str]]:
            return await cog.lora_choices(interaction, current)

        return imagine

    async def run_imagine(
        self,
        interaction: discord.Interaction[Any],
        prompt: str,
        options: ImagineOptions,
        model: str | None,
        attachments: Sequence[discord.Attachment | None],
        control_image: discord.Attachment | None,
    ) -> None:
        missing = missing_for_delivery(interaction)
        if missing:
            raise UserError(refusal_text(missing))
        if wants_pictures(prompt, *attachments, control_image):
            # Fetching may outlast Discord's 3 s: acknowledged first, privately.
            await interaction.response.defer(ephemeral=True, thinking=True)
            await self.imagine_with_pictures(
                interaction, prompt, options, model, attachments, control_image
            )
            return
        actor = self.actors.actor(interaction)
        batch = await self.app.imagine(actor, prompt, options, model)
        first = batch[0]
        message_id = await self.status.acknowledge(interaction, [s.job for s in batch], actor)
        target = JobMessage(
            first.job,
            first.notes,
            interaction=interaction,
            message=self.delivery.status_message(first.job, message_id),
        )
        answered = False
        try:
            await interaction.edit_original_response(
                content=clip(render.queued_text(first.job, first.position, first.notes)),
                view=cancel_view(first.job.id),
            )
            target.shown_position = first.position
            answered = True
        except discord.HTTPException as exc:
            log.info("job %s: first edit refused (%s)", first.job.id, exc)
        target.last_edit = time.monotonic()
        await self.delivery.remember(target)
        self.delivery.track(target)
        # Each further job of a permutation or --repeat prompt gets a message of its own. While
        # the response still shows "thinking…", Discord would turn the first follow-up into it,
        # so then they go without one: their results are posted to the channel.
        for submitted in batch[1:]:
            if answered:
                await self.status.follow_up(interaction, submitted)
            else:
                self.delivery.track(JobMessage(submitted.job, submitted.notes))

    async def imagine_with_pictures(
        self,
        interaction: discord.Interaction[Any],
        prompt: str,
        options: ImagineOptions,
        model: str | None,
        attachments: Sequence[discord.Attachment | None],
        control_image: discord.Attachment | None = None,
    ) -> None:
        """/imagine with pictures, acknowledged (privately) already. The app fetches them only
        once the command may go ahead (cooldown, prompt, queue and credits checked); a refusal
        (a link from a host that isn't allowed, a file that is no image, a flagged picture)
        then stays private, and each job's status message is a public follow-up."""
        batch = await self.app.imagine(
            self.actors.actor(interaction),
            prompt,
            options,
            model,
            attachments=[a for a in attachments if a is not None],
            control_image=control_image,
        )
        await self.status.announce(interaction, batch)

    async def lora_choices(
        self, interaction: discord.Interaction[Any], current: str
    ) -> list[app_commands.Choice[str]]:
        # The LoRAs that fit the model picked in the same command, else the member's default
        # model (/settings), else the server's.
        model = getattr(interaction.namespace, "model", None)
        if not model:
            preferences = await self.app.preferences.get(interaction.user.id)
            model = preferences.prompt_defaults(self.config.engine).model
        return _choices(catalog.lora_choices(self.config, current, model))


def wants_pictures(prompt: str, *attachments: discord.Attachment | None) -> bool:
    """Whether /imagine has pictures to fetch (attachments, or links anywhere in the prompt)."""
    return any(a is not None for a in attachments) or LINK.search(prompt) is not None


def _choices(choices: list[catalog.Choice]) -> list[app_commands.Choice[str]]:
    return [app_commands.Choice(name=choice.name, value=choice.value) for choice in choices]


def _annotate(**annotations: Any) -> Callable[[F], F]:
    """Give parameters annotations known only once the config is loaded (discord.py reads
    them when the command is built, so they can't be written in the signature)."""

    def apply(function: F) -> F:
        function.__annotations__.update(annotations)
        return function

    return apply
