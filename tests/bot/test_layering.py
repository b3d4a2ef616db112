"""The layers of bot/: each imports only those below it, only the entry point imports the Discord
client, and delivery and the shared interaction helpers are given what they use."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

from bot.discord.delivery import Delivery
from tests.test_import_graph import import_graph

REPO = Path(__file__).resolve().parents[2]


def test_delivery_is_given_its_dependencies_instead_of_the_bot() -> None:
    tree = ast.parse((REPO / "bot" / "discord" / "delivery.py").read_text(encoding="utf-8"))
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert "bot.discord.client" not in imported
    parameters = inspect.signature(Delivery).parameters
    assert "bot" not in parameters
    assert {"scheduler", "jobs", "find_channel", "open_dm"} <= set(parameters)


# Each layer of bot/ and what it may import of the project (besides itself): the tree's layers,
# front ends on top, generation/ beside the bot.
LAYERS = {
    "generation": set(),
    "bot.config": {"generation"},
    "bot.core": {"bot.config", "generation"},
    "bot.app": {"bot.core", "bot.config", "generation"},
    "bot.discord": {"bot.app", "bot.core", "bot.config", "generation"},
    "bot.console": {"bot.app", "bot.core", "bot.config", "generation"},
    "bot.web": {"bot.app", "bot.core", "bot.config", "generation"},
}


def _layer(module: str) -> str | None:
    return next(
        (layer for layer in LAYERS if module == layer or module.startswith(f"{layer}.")), None
    )


def test_each_layer_imports_only_the_layers_below_it() -> None:
    wrong = [
        f"{module} imports {target} (line {edge.line})"
        for module, edges in import_graph(REPO).items()
        for target, edge in edges.items()
        if (layer := _layer(module)) is not None
        and (other := _layer(target)) not in (layer, None)
        and other not in LAYERS[layer]
    ]
    assert wrong == []


def test_only_the_entry_point_imports_the_discord_client() -> None:
    graph = import_graph(REPO)
    assert [m for m, edges in graph.items() if "bot.discord.client" in edges] == ["bot.__main__"]


def test_the_shared_interaction_helpers_reach_no_cog_and_no_client() -> None:
    graph = import_graph(REPO)
    for start in ("bot.discord.interactions", "bot.discord.actors", "bot.discord.status"):
        seen, todo = set(), [start]
        while todo:
            for target in graph[todo.pop()]:
                if target not in seen:
                    seen.add(target)
                    todo.append(target)
        reached = sorted(
            m for m in seen if m.startswith("bot.discord.cogs") or m.endswith("client")
        )
        assert reached == [], start
