"""Relax, Fast and Turbo under attack in the application: a speed flag in a Remix prompt is
honoured (the member pays the mode they asked for, never silently another), and a free job
can't buy turbo's place in line for nothing."""

from __future__ import annotations

from pathlib import Path

from bot.app.actions import Action
from bot.core import Mode
from tests.bot.test_modes_app import ALICE, _app, _finished, _with_modes


async def test_a_speed_flag_in_a_remix_prompt_sets_that_jobs_mode(tmp_path: Path) -> None:
    app = await _app(_with_modes(tmp_path, relax_max_queued_per_user=5))
    try:
        await app.modes.choose(ALICE, Mode.TURBO)
        (parent,) = await app.imagine(ALICE, "a fox")
        assert parent.job.mode is Mode.TURBO
        await _finished(app, parent.job.id)
        before = (await app.core.credits.balance(ALICE.user_id)).available
        # The member asked for relax in the edited prompt: relax it is, free, not turbo.
        reroll = await app.press(ALICE, parent.job.id, Action.REROLL, prompt="a fox --relax")
        assert reroll.job.mode is Mode.RELAX and reroll.job.cost == 0
        await _finished(app, reroll.job.id)
        vary = await app.press(ALICE, parent.job.id, Action.VARY_STRONG, 1, prompt="a fox --fast")
        assert vary.job.mode is Mode.FAST
        await _finished(app, vary.job.id)
        zoom = await app.custom_zoom(ALICE, parent.job.id, 1, prompt="a fox --relax", factor=1.5)
        assert zoom.job.mode is Mode.RELAX and zoom.job.cost == 0
        await _finished(app, zoom.job.id)
        after = (await app.core.credits.balance(ALICE.user_id)).available
        assert before - after == vary.job.cost
    finally:
        await app.core.close(drain_timeout_s=5.0)
