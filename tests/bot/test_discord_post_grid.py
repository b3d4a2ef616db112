"""After the grid, through the fake Discord with the real discord.py client and tiny engine:
U1–U4 separate an image for free with the next row of buttons, forms (Custom Zoom, Remix,
Vary (Region) with regions or a mask), Delete, /settings, /prefer and /info, and bad input that
is refused privately with nothing charged."""

from __future__ import annotations

import dataclasses
import io
import itertools
from pathlib import Path
from typing import Any

from PIL import Image

from tests.bot.conftest import GatedEngine
from tests.bot.helpers import (
    ALLOWANCE,
    JOB_TIMEOUT_S,
    assert_ledger_consistent,
    available,
    decode,
    has_cancel,
    imagined_grid,
    is_grid,
    job_id_of,
    make_bot,
)
from tests.fakediscord import FakeDiscord, Upload
from tests.fakediscord.model import Message


def labels(message: Message) -> list[str]:
    return [b.get("label") or b["emoji"]["name"] for b in message.buttons]


def png(size: tuple[int, int], colour: int = 255) -> bytes:
    out = io.BytesIO()
    Image.new("L", size, colour).save(out, format="PNG")
    return out.getvalue()


async def separated(fake: FakeDiscord, user: Any, grid: Message, index: int) -> Message:
    press = await fake.click(user, grid, label=f"U{index}")
    assert await press.wait_acked() == 6
    return await fake.wait_for_message(
        lambda m: (
            m.referenced is grid and len(m.attachments) == 1 and f"Image #{index}" in m.content
        )
    )


async def test_separate_is_free_owner_only_and_survives_a_restart(
    tmp_path: Path, bot_engine_settings: Any, shared_engine: Any
) -> None:
    async with FakeDiscord() as fake:
        alice = fake.add_user("alice")
        bob = fake.add_user("bob")
        data = tmp_path / "data"
        async with fake.run_bot(make_bot(fake, data, bot_engine_settings, shared_engine)) as bot:
            grid = await imagined_grid(fake, alice, "a red fox", seed=3)
            cell = decode(grid).size[0] // 2
            paid = await available(bot, alice.id)

            intruder = await fake.click(bob, grid, label="U1")
            refusal = await intruder.wait_followup(lambda m: m.ephemeral)
            assert "isn't your job" in refusal.content

            # Discord refusing the post (a 503) is said privately; pressing again works.
            fake.inject("POST", "/channels/*/messages", status=503, with_files=True, times=1)
            failed = await fake.click(alice, grid, label="U3")
            note = await failed.wait_followup(lambda m: m.ephemeral)
            assert "press U3 again" in note.content
            image = await separated(fake, alice, grid, 3)
            # The stored candidate itself, full size, and nothing was queued or charged.
            assert decode(image).size == (cell, cell)
            stored = await bot.core.jobs.require(job_id_of(grid))
            kept = Image.open(stored.image_path(bot.config.data_dir, 2))
            assert decode(image).tobytes() == kept.convert(decode(image).mode).tobytes()
            assert len(await bot.core.jobs.for_user(alice.id)) == 1
            assert await available(bot, alice.id) == paid
            shown = labels(image)
            assert {"Vary (Subtle)", "Vary (Strong)", "Vary (Region)", "Custom Zoom"} <= set(shown)
            assert "🗑️" in shown
            assert "Make Square" not in shown  # the image is already square
            assert all(c.endswith(":3") for c in image.custom_ids), image.custom_ids
            await assert_ledger_consistent(bot)

        # After a restart the reply's buttons still work: the form opens for the owner only.
        async with fake.run_bot(make_bot(fake, data, bot_engine_settings, shared_engine)) as bot:
            other = await fake.click(bob, image, label="Vary (Region)")
            note = await other.wait_for(lambda i: i.original or (i.followups and i.followups[0]))
            assert "isn't your job" in note.content and other.modal is None
            form = await fake.click(alice, image, label="Vary (Region)")
            assert await form.wait_acked() == 9
            assert form.modal is not None and form.modal["title"] == "Vary (Region)"

            # Delete: not for others, then gone for the owner; the files stay for retention.
            sneaky = await fake.click(bob, image, label="🗑️")
            assert "isn't your job" in (await sneaky.wait_followup(lambda m: m.ephemeral)).content
            assert not image.deleted
            delete = await fake.click(alice, image, label="🗑️")
            await delete.wait_followup(lambda m: m.ephemeral and "Deleted" in m.content)
            assert image.deleted
            assert stored.image_path(bot.config.data_dir, 2).exists()


async def test_delete_from_the_message_menu_owner_or_admin(
    tmp_path: Path, bot_engine_settings: Any, shared_engine: Any
) -> None:
    async with FakeDiscord() as fake:
        alice = fake.add_user("alice")
        bob = fake.add_user("bob")
        bot = make_bot(fake, tmp_path / "data", bot_engine_settings, shared_engine)
        async with fake.run_bot(bot):
            grid = await imagined_grid(fake, alice, "a lighthouse")

            chatter = await fake.say(bob, "nice")
            wrong = await fake.message_command(alice, chatter, "Delete image")
            answer = await wrong.wait_followup(lambda m: bool(m.content))
            assert answer.ephemeral and "Only this bot's image messages" in answer.content

            refused = await fake.message_command(bob, grid, "Delete image")
            answer = await refused.wait_followup(lambda m: bool(m.content))
            assert "isn't your job" in answer.content
            assert not grid.deleted

            admin = await fake.message_command(fake.owner, grid, "Delete image")
            done = await admin.wait_followup(lambda m: "Deleted" in m.content)
            assert done.ephemeral and grid.deleted


async def test_settings_prefer_and_info_round_trip(
    tmp_path: Path, bot_engine_settings: Any, shared_engine: Any
) -> None:
    async with FakeDiscord() as fake:
        alice = fake.add_user("alice")
        bot = make_bot(fake, tmp_path / "data", bot_engine_settings, shared_engine)
        async with fake.run_bot(bot):
            opened = await fake.slash(alice, "settings")
            panel = await opened.wait_original()
            assert panel.ephemeral and "Previews while a job runs: **on**" in panel.content

            chosen = await fake.select(alice, panel, "settings:aspect", ["16:9"])
            assert await chosen.wait_acked() == 7  # the panel is edited in place
            assert "Aspect: **16:9**" in panel.content
            steps = await fake.select(alice, panel, "settings:steps", ["10"])
            await steps.wait_acked()
            remix = await fake.click(alice, panel, "settings:remix")
            await remix.wait_acked()
            previews = await fake.click(alice, panel, "settings:previews")
            await previews.wait_acked()
            assert (
                "Remix" in panel.content and "Previews while a job runs: **off**" in panel.content
            )
            prefs = await bot.app.preferences.get(alice.id)
            assert (prefs.aspect, prefs.steps, prefs.remix, prefs.previews) == (
                "16:9",
                10,
                True,
                False,
            )

            suffix = await fake.slash(alice, "prefer suffix", text="soft light")
            assert "soft light" in (await suffix.wait_original()).content
            shortcut = await fake.slash(
                alice, "prefer option set", name="mystyle", value="watercolour --no people"
            )
            assert "--mystyle" in (await shortcut.wait_original()).content
            listed = await fake.slash(alice, "prefer option list")
            assert "watercolour" in (await listed.wait_original()).content
            taken = await fake.slash(alice, "prefer option set", name="ar", value="--ar 1:1")
            refusal = await taken.wait_original()
            assert (
                refusal.ephemeral and "name: --ar is one of the bot's own flags" in refusal.content
            )

            # Defaults under typed flags: the aspect default applies, the typed --steps wins.
            grid = await imagined_grid(fake, alice, "a harbour --mystyle --steps 3")
            stored = await bot.core.jobs.require(job_id_of(grid))
            data = stored.request_data
            assert data["width"] > data["height"] and data["steps"] == 3
            assert "watercolour" in data["prompt"] and "soft light" in data["prompt"]
            assert "people" in data["negative_prompt"]

            info = await fake.slash(alice, "info")
            text = (await info.wait_original()).content
            assert "credits available" in text and "no queued or running jobs" in text
            assert "Aspect: **16:9**" in text and "`--mystyle`" in text

            unset = await fake.slash(alice, "prefer option unset", name="mystyle")
            await unset.wait_original()
            assert "mystyle" not in (await bot.app.preferences.get(alice.id)).options


async def test_bad_form_input_is_refused_privately_and_costs_nothing(
    tmp_path: Path, bot_engine_settings: Any, shared_engine: Any
) -> None:
    async with FakeDiscord() as fake:
        alice = fake.add_user("alice")
        bot = make_bot(fake, tmp_path / "data", bot_engine_settings, shared_engine)
        async with fake.run_bot(bot):
            grid = await imagined_grid(fake, alice, "a quiet bay", seed=5)
            image = await separated(fake, alice, grid, 1)
            before = await available(bot, alice.id)

            async def refused(label: str, values: dict[str, Any], expected: str) -> None:
                form = await fake.click(alice, image, label=label)
                assert await form.wait_acked() == 9
                submitted = await fake.submit_modal(form, values)
                note = await submitted.wait_followup(lambda m: m.ephemeral)
                assert expected in note.content, note.content

            await refused("Custom Zoom", {"prompt": "a bay", "factor": "3"}, "factor: expected")
            await refused("Custom Zoom", {"prompt": "a bay", "factor": "0.5"}, "factor:")
            await refused("Custom Zoom", {"prompt": "a bay", "factor": "wide"}, "factor:")
            await refused("Vary (Region)", {"prompt": "a boat"}, "regions: pick at least one")
            not_image = Upload("mask.png", b"this is not a picture")
            await refused("Vary (Region)", {"prompt": "a boat", "mask": not_image}, "not a picture")
            huge = Upload("mask.png", png((5000, 4000)))
            await refused("Vary (Region)", {"prompt": "a boat", "mask": huge}, "5000x4000")

            assert await available(bot, alice.id) == before
            assert len(await bot.core.jobs.for_user(alice.id)) == 1
            await assert_ledger_consistent(bot)
            assert ALLOWANCE >= before


async def finished_reply(fake: FakeDiscord, source: Message, seen: set[int]) -> Message:
    """The next status message replying to `source`, once it shows its result grid."""
    reply = await fake.wait_for_message(
        lambda m: m.referenced is source and m.id not in seen and m.custom_ids != []
    )
    seen.add(reply.id)
    await fake.wait_for(lambda: is_grid(reply) or None, timeout=JOB_TIMEOUT_S)
    return reply


async def test_zoom_pan_region_and_remix_make_paid_jobs(
    tmp_path: Path, bot_engine_settings: Any, shared_engine: Any
) -> None:
    async with FakeDiscord() as fake:
        alice = fake.add_user("alice")
        engine = GatedEngine(shared_engine)
        engine.gate.set()
        bot = make_bot(fake, tmp_path / "data", bot_engine_settings, engine)
        async with fake.run_bot(bot):
            grid = await imagined_grid(fake, alice, "a red fox", seed=3)
            parent = await bot.core.jobs.require(job_id_of(grid))
            image = await separated(fake, alice, grid, 2)
            seen: set[int] = set()

            # Custom Zoom: the form's factor and prompt make a zoom job of image 2.
            form = await fake.click(alice, image, label="Custom Zoom")
            assert await form.wait_acked() == 9
            await fake.submit_modal(form, {"prompt": "a red fox, wide", "factor": "1.5"})
            zoomed = await finished_reply(fake, image, seen)
            zoom = await bot.core.jobs.require(job_id_of(zoomed))
            assert zoom.kind.value == "zoom" and zoom.parent_job_id == parent.id
            assert zoom.parent_index == 1 and zoom.request_data["zoom_factor"] == 1.5
            assert zoom.request_data["prompt"] == "a red fox, wide"
            assert decode(zoomed).size == decode(grid).size  # same output size, a new grid

            # Vary (Region) with two preset regions, then with an uploaded mask.
            form = await fake.click(alice, image, label="Vary (Region)")
            assert await form.wait_acked() == 9
            await fake.submit_modal(
                form, {"regions": ["left", "top_right"], "prompt": "a red fox, blue sky"}
            )
            region = await bot.core.jobs.require(job_id_of(await finished_reply(fake, image, seen)))
            assert region.kind.value == "region"
            assert set(region.request_data["regions"]) == {"left", "top_right"}
            half = Image.new("L", (64, 64), 0)
            half.paste(255, (0, 0, 32, 64))
            out = io.BytesIO()
            half.save(out, format="PNG")
            form = await fake.click(alice, image, label="Vary (Region)")
            assert await form.wait_acked() == 9
            await fake.submit_modal(
                form, {"mask": Upload("mask.png", out.getvalue()), "prompt": "a red fox"}
            )
            masked = await bot.core.jobs.require(job_id_of(await finished_reply(fake, image, seen)))
            assert masked.kind.value == "region" and masked.request_data["inputs"]

            # Remix on: a pan opens the prompt form first; the edited prompt is what runs.
            await bot.app.preferences.update(alice.id, remix=True)
            pan = await fake.click(alice, image, label="➡️")
            assert await pan.wait_acked() == 9
            await fake.submit_modal(pan, {"prompt": "a red fox by the sea --v 6"})
            panned_message = await finished_reply(fake, image, seen)
            panned = await bot.core.jobs.require(job_id_of(panned_message))
            assert panned.kind.value == "pan" and panned.request_data["pan_direction"] == "right"
            assert panned.request_data["prompt"] == "a red fox by the sea"
            # The edited prompt's notes reach the reply, as /imagine's do.
            assert "ℹ️ --v 6 ignored (Midjourney model version)" in panned_message.content
            assert decode(panned_message).size[0] > decode(grid).size[0]

            # Held while queued, refunded when cancelled, like every job.
            engine.gate.clear()
            before = await available(bot, alice.id)
            vary = await fake.click(alice, grid, label="V1")
            assert await vary.wait_acked() == 9
            await fake.submit_modal(vary, {"prompt": "a grey fox"})
            status = await fake.wait_for_message(
                lambda m: (
                    m.referenced is grid and any(c.startswith("imagine:X:") for c in m.custom_ids)
                )
            )
            held = await bot.core.jobs.require(job_id_of(status))
            assert held.cost > 0 and await available(bot, alice.id) == before - held.cost
            cancel = await fake.click(alice, status, label="Cancel")
            await cancel.wait_followup(lambda m: m.ephemeral)
            engine.gate.set()
            await fake.wait_for(lambda: "Cancelled" in status.content or None)
            assert await available(bot, alice.id) == before
            await assert_ledger_consistent(bot)


async def test_previews_ride_in_progress_edits_unless_turned_off(
    tmp_path: Path, bot_engine_settings: Any, shared_engine: Any
) -> None:
    async with FakeDiscord() as fake:
        alice = fake.add_user("alice")
        bob = fake.add_user("bob")
        bot = make_bot(fake, tmp_path / "data", bot_engine_settings, shared_engine)
        async with fake.run_bot(bot):
            await bot.app.preferences.update(bob.id, previews=False)
            shown = await fake.slash(alice, "imagine", prompt="a red fox", steps=6)
            with_previews = await shown.wait_original(is_grid, timeout=JOB_TIMEOUT_S)
            hidden = await fake.slash(bob, "imagine", prompt="a red fox", steps=6)
            without = await hidden.wait_original(is_grid, timeout=JOB_TIMEOUT_S)

            def preview_states(message: Message) -> list[Any]:
                return [
                    state
                    for state in message.states[:-1]
                    if any(a.filename == "preview.png" for a in state.attachments)
                ]

            previews = preview_states(with_previews)
            assert previews, [s.content for s in with_previews.states]
            first = previews[0].attachments[0]
            assert Image.open(io.BytesIO(first.data)).size[0] > 0
            assert preview_states(without) == []
            # Edits with or without an image are never closer than the configured interval.
            interval_s = bot.config.discord.progress_edit_interval_s
            route = f"/webhooks/*/{shown.token}/messages/@original"
            times = [r.at for r in fake.requests_matching("PATCH", route)][:-1]
            assert all(b - a >= interval_s * 0.9 for a, b in itertools.pairwise(times)), times


async def test_forms_opened_before_a_restart_are_still_answered(
    tmp_path: Path, bot_engine_settings: Any, shared_engine: Any
) -> None:
    """A form's custom_id names its job, image and action: submitted after the bot restarted
    (no live form behind it any more) it still makes its job, or a refusal, never silence."""
    async with FakeDiscord() as fake:
        alice = fake.add_user("alice")
        data = tmp_path / "data"
        async with fake.run_bot(make_bot(fake, data, bot_engine_settings, shared_engine)) as bot:
            job = await fake.slash(alice, "imagine", prompt="a red fox", seed=3)
            grid = await job.wait_original(is_grid, timeout=JOB_TIMEOUT_S)
            image = await separated(fake, alice, grid, 2)
            zoom_form = await fake.click(alice, image, label="Custom Zoom")
            bad_form = await fake.click(alice, image, label="Custom Zoom")
            await bot.app.preferences.update(alice.id, remix=True)
            remix_form = await fake.click(alice, image, label="⬅️")
            for form in (zoom_form, bad_form, remix_form):
                assert await form.wait_acked() == 9
            assert remix_form.modal is not None
            assert remix_form.modal["custom_id"] == f"imagine-form:RX-PL:{grid_id(grid)}:2"

        async with fake.run_bot(make_bot(fake, data, bot_engine_settings, shared_engine)) as bot:
            before = await available(bot, alice.id)
            refused = await fake.submit_modal(bad_form, {"prompt": "a fox", "factor": "7"})
            note = await refused.wait_followup(lambda m: m.ephemeral)
            assert "factor: expected a number from 1.0 to 2" in note.content

            seen: set[int] = set()
            await fake.submit_modal(zoom_form, {"prompt": "a red fox, far away", "factor": "1.5"})
            zoom = await bot.core.jobs.require(job_id_of(await finished_reply(fake, image, seen)))
            assert zoom.kind.value == "zoom" and zoom.request_data["zoom_factor"] == 1.5
            assert zoom.request_data["prompt"] == "a red fox, far away"
            assert (zoom.parent_job_id, zoom.parent_index) == (grid_id(grid), 1)

            # A form of a button this version no longer has: a private note, not silence.
            assert bad_form.modal is not None
            bad_form.modal["custom_id"] = f"imagine-form:RX-ZZ:{grid_id(grid)}:2"
            stale = await fake.submit_modal(bad_form, {"prompt": "a fox", "factor": "2"})
            note = await stale.wait_for(lambda i: i.original or None)
            assert note.ephemeral and "This form has expired" in note.content

            await fake.submit_modal(remix_form, {"prompt": "a red fox in snow"})
            pan = await bot.core.jobs.require(job_id_of(await finished_reply(fake, image, seen)))
            assert pan.kind.value == "pan" and pan.request_data["pan_direction"] == "left"
            assert pan.request_data["prompt"] == "a red fox in snow"
            assert await available(bot, alice.id) == before - zoom.cost - pan.cost
            await assert_ledger_consistent(bot)


def grid_id(grid: Message) -> int:
    return job_id_of(grid)


async def test_an_edit_the_engine_fails_is_refunded_exactly(
    tmp_path: Path, bot_engine_settings: Any
) -> None:
    """A zoom whose inpainting checkpoint can't be loaded fails in the real engine: its credits
    were held while it ran and come back to the credit, with the ledger adding up."""
    from generation.engine import create_engine

    broken = dataclasses.replace(
        bot_engine_settings,
        models=tuple(
            dataclasses.replace(m, inpaint_source=str(tmp_path / "no-such-inpainting-model"))
            for m in bot_engine_settings.models
        ),
    )
    engine = GatedEngine(create_engine(broken))
    engine.gate.set()
    async with FakeDiscord() as fake:
        alice = fake.add_user("alice")
        bot = make_bot(fake, tmp_path / "data", broken, engine)
        async with fake.run_bot(bot):
            job = await fake.slash(alice, "imagine", prompt="a red fox", seed=3)
            grid = await job.wait_original(is_grid, timeout=JOB_TIMEOUT_S)
            image = await separated(fake, alice, grid, 1)
            before = await available(bot, alice.id)

            engine.gate.clear()
            engine.entered.clear()
            zoom = await fake.click(alice, image, label="Zoom Out 2x")
            status = await fake.wait_for_message(
                lambda m: (
                    m.referenced is image and any(c.startswith("imagine:X:") for c in m.custom_ids)
                )
            )
            held = await bot.core.jobs.require(job_id_of(status))
            assert held.kind.value == "zoom" and held.cost > 0
            await fake.wait_for(lambda: engine.entered.is_set() or None)
            assert await available(bot, alice.id) == before - held.cost
            engine.gate.set()

            await fake.wait_for(lambda: "refunded" in status.content or None, timeout=JOB_TIMEOUT_S)
            assert f"your {held.cost} credit" in status.content
            failed = await bot.core.jobs.require(held.id)
            assert failed.state.value == "failed"
            assert await available(bot, alice.id) == before
            assert await zoom.wait_acked() == 6
            await assert_ledger_consistent(bot)


async def test_every_button_under_an_image_makes_its_job(
    tmp_path: Path, bot_engine_settings: Any, shared_engine: Any
) -> None:
    """Upscale (Subtle)/(Creative), Vary (Subtle)/(Strong), Zoom Out 1.5x, the pans and, on the
    wide image a pan made, Make Square: each press makes its kind of job on that image."""
    async with FakeDiscord() as fake:
        alice = fake.add_user("alice")
        bot = make_bot(
            fake,
            tmp_path / "data",
            bot_engine_settings,
            shared_engine,
            scheduler={"max_queued_per_user": 10},
        )
        async with fake.run_bot(bot):
            job = await fake.slash(alice, "imagine", prompt="a red fox", seed=3)
            grid = await job.wait_original(is_grid, timeout=JOB_TIMEOUT_S)
            image = await separated(fake, alice, grid, 1)
            size = decode(image).size
            buttons = [
                "Upscale (Subtle)",
                "Upscale (Creative)",
                "Vary (Subtle)",
                "Vary (Strong)",
                "Zoom Out 1.5x",
                "⬅️",
                "⬆️",
                "⬇️",
            ]
            seen: set[int] = set()
            made: dict[str, Any] = {}
            for label in buttons:
                press = await fake.click(alice, image, label=label)
                assert await press.wait_acked() == 6, label
                reply = await fake.wait_for_message(
                    lambda m: m.referenced is image and m.id not in seen and m.custom_ids != []
                )
                seen.add(reply.id)
                # Done: the result's picture in place of the progress and Cancel button.
                await fake.wait_for(
                    lambda r=reply: (r.attachments and not has_cancel(r)) or None,
                    timeout=JOB_TIMEOUT_S,
                )
                made[label] = (await bot.core.jobs.require(job_id_of(reply)), decode(reply).size)
            kinds = {label: (job.kind.value, job.parent_index) for label, (job, _) in made.items()}
            assert kinds == {
                "Upscale (Subtle)": ("upscale", 0),
                "Upscale (Creative)": ("upscale", 0),
                "Vary (Subtle)": ("variation", 0),
                "Vary (Strong)": ("variation", 0),
                "Zoom Out 1.5x": ("zoom", 0),
                "⬅️": ("pan", 0),
                "⬆️": ("pan", 0),
                "⬇️": ("pan", 0),
            }
            data = {label: job.request_data for label, (job, _) in made.items()}
            assert data["Upscale (Subtle)"]["upscale_mode"] == "subtle"
            assert data["Upscale (Creative)"]["upscale_mode"] == "creative"
            assert data["Vary (Strong)"]["strength"] > data["Vary (Subtle)"]["strength"]
            assert data["Zoom Out 1.5x"]["zoom_factor"] == 1.5
            assert [data[p]["pan_direction"] for p in ("⬅️", "⬆️", "⬇️")] == ["left", "up", "down"]
            assert made["Upscale (Subtle)"][1] == (2 * size[0], 2 * size[1])  # one image, 2x
            wide_grid = made["⬅️"][1]
            assert wide_grid[0] > wide_grid[1]

            # Make Square: only under a picture that is not square, and it paints it out to 1:1.
            wide_message = next(
                m
                for m in fake.messages
                if m.id in seen and job_id_of(m) == made["⬅️"][0].id and m.attachments
            )
            wide = await separated(fake, alice, wide_message, 1)
            assert "Make Square" in labels(wide)
            square = await fake.click(alice, wide, label="Make Square")
            assert await square.wait_acked() == 6
            squared = await finished_reply(fake, wide, seen)
            squared_job = await bot.core.jobs.require(job_id_of(squared))
            assert squared_job.kind.value == "square"
            cell = decode(squared).size
            assert cell[0] == cell[1]
            await assert_ledger_consistent(bot)
