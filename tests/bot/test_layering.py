"""The Discord layer's own structure: delivery is given what it uses, it doesn't look it up."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

from bot.discord.delivery import Delivery

REPO = Path(__file__).resolve().parents[2]


def test_delivery_is_given_its_dependencies_instead_of_the_bot() -> None:
    tree = ast.parse((REPO / "bot" / "discord" / "delivery.py").read_text(encoding="utf-8"))
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert "bot.discord.client" not in imported
    parameters = inspect.signature(Delivery).parameters
    assert "bot" not in parameters
    assert {"scheduler", "jobs", "find_channel", "open_dm"} <= set(parameters)
