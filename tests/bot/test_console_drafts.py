"""The console speaks --draft, enhance N, /shorten and shorter N like Discord's buttons, on the
same app, scheduler and credits (the tiny models in this process)."""

from __future__ import annotations

import dataclasses
import io
import re
from pathlib import Path
from typing import Any

from bot.console.shell import run_shell
from bot.core import InProcessWorker
from tests.bot.conftest import bot_config


async def test_draft_enhance_shorten_and_shorter_in_the_console(
    tmp_path: Path, bot_engine_settings: Any, shared_engine: Any
) -> None:
    engine = dataclasses.replace(bot_engine_settings, draft_steps=2)
    config = bot_config(tmp_path / "data", engine)
    stdin = io.StringIO(
        "/imagine a red barn --draft --seed 5\n"
        "enhance 3\n"
        "enhance x\n"
        "/shorten a very beautiful red cat, on a mat\n"
        "shorter 1\n"
        "/shorten --ar 2:3\n"
    )
    out = io.StringIO()
    worker = InProcessWorker(config.engine, config.data_dir, lambda _settings: shared_engine)
    code = await run_shell(config, stdin=stdin, out=out, core_options={"workers": [worker]})
    text = out.getvalue()
    assert code == 0
    assert "Imagine (💨 draft)" in text and "a draft: enhance N renders image N" in text
    assert re.search(r"\*\*✨ Enhance of job 1 — `a red barn`\*\*", text), text
    assert "enhance: expected a number" in text
    assert "What CLIP notices" in text and "next: shorter N imagines" in text
    assert "/shorten: the prompt has no words to weigh" in text
    # The shorter prompt's job is an ordinary /imagine of it.
    imagined = re.findall(r"^\*\*Imagine — `([^`]+)`\*\*", text, re.MULTILINE)
    first = re.search(r"\*\*1\.\*\* `([^`]+)`", text)
    assert first is not None and imagined[-1] == first[1], (imagined, first)
    assert imagined[-1] != "a very beautiful red cat, on a mat"
