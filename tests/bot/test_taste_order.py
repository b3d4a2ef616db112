"""/imagine --p refits a member's taste only for a command that may go ahead: a banned member
(or one the queue or credits refuse) costs the bot no fit, however often their pairs change."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pytest

from bench.bench_taste import CANDIDATES
from bot.app.actions import Actor, UserError
from bot.core.taste import MIN_PAIRS, store_embeddings
from generation.taste import compact
from tests.bot.test_bad_input import _config
from tests.bot.test_modes_app import _app
from tests.core.test_taste import _job_row

ALICE = Actor(user_id=11, guild_id=1, channel_id=2)


async def test_a_refused_imagine_never_refits_the_members_taste(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    app = await _app(_config(tmp_path))
    try:
        core = app.core
        store = app.personal.store
        rng = np.random.default_rng(5)
        taste = rng.standard_normal(16)
        for _ in range(math.ceil(MIN_PAIRS / (CANDIDATES - 1))):
            embeds = rng.standard_normal((CANDIDATES, 16))
            job_id = await _job_row(core.db, ALICE.user_id, [0, 1, 2, 3])
            await core.db.transaction(
                lambda txn, j=job_id, e=embeds: store_embeddings(txn, j, compact(e, "s:16"))
            )
            await store.record_pick(ALICE.user_id, job_id, int(np.argmax(embeds @ taste)))
        assert (await store.profile(ALICE.user_id)).ready
        await core.db.transaction(lambda txn: core.credits.set_banned(txn, ALICE.user_id, True))

        caplog.set_level(logging.INFO, logger="bot.core.taste")
        with pytest.raises(UserError):
            await app.imagine(ALICE, "a red fox --p")
        assert "refitted" not in caplog.text
        assert (
            await core.db.read("SELECT weights FROM taste_profiles WHERE weights IS NOT NULL") == []
        )
    finally:
        await app.core.close()
