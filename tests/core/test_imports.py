"""The bot must start fast and the core must stay front-end neutral."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_importing_the_core_loads_neither_torch_nor_discord() -> None:
    code = (
        "import sys, bot.core, bot.core.workers, bot.core.execute; "
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'discord') "
        "if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


def test_no_discord_imports_in_the_core_sources() -> None:
    for path in (REPO / "bot" / "core").glob("*.py"):
        text = path.read_text(encoding="utf-8")
        assert "import discord" not in text and "from discord" not in text, path
