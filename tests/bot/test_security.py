"""Secrets stay out of logs, SQL is parameterised, and users are rate-limited politely."""

from __future__ import annotations

import ast
import asyncio
import dataclasses
import logging
from pathlib import Path

import pytest

from bot.app.actions import Actor, UserError
from bot.app.application import ImagineApp, open_core
from bot.core import InProcessWorker
from tests.bot.helpers import log_to_stream
from tests.bot.test_bad_input import _config
from tests.core.fakes import create_fake_engine

REPO = Path(__file__).resolve().parents[2]
TOKEN = "MTIzNDU2Nzg5.secret.token-value"


def test_the_token_never_reaches_the_log(
    monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    stream = log_to_stream(monkeypatch, request, [TOKEN])
    log = logging.getLogger("imagine-bot.test")
    log.info("connecting with %s", TOKEN)
    try:
        raise RuntimeError(f"login failed for Bot {TOKEN}")
    except RuntimeError:
        log.exception("start-up failed")
    logging.getLogger().handlers.clear()
    text = stream.getvalue()
    assert "connecting with [redacted]" in text and "login failed" in text
    assert TOKEN not in text


def _sql_calls(tree: ast.AST) -> list[ast.Call]:
    calls = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if (
                node.func.attr
                in {
                    "execute",
                    "executemany",
                    "insert",
                    "fetchone",
                    "fetchall",
                    "read",
                    "read_one",
                    "executescript",
                }
                and node.args
            ):
                calls.append(node)
    return calls


def _placeholder_names(tree: ast.AST) -> set[str]:
    """Names assigned `", ".join("?" for ...)`: a run of placeholders, never a value."""
    names = set()
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Assign)
            and isinstance(node.value, ast.Call)
            and isinstance(node.value.func, ast.Attribute)
            and node.value.func.attr == "join"
            and node.value.args
            and isinstance(node.value.args[0], ast.GeneratorExp)
            and isinstance(node.value.args[0].elt, ast.Constant)
            and node.value.args[0].elt.value == "?"
        ):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    return names


def _constant_names(tree: ast.Module) -> set[str]:
    """Module-level names bound once to a string literal: SQL fragments, never a value."""
    return {
        target.id
        for node in tree.body
        if isinstance(node, ast.Assign)
        and isinstance(node.value, ast.Constant)
        and isinstance(node.value.value, str)
        for target in node.targets
        if isinstance(target, ast.Name)
    }


def _only_placeholders(statement: ast.JoinedStr, placeholders: set[str]) -> bool:
    return all(
        isinstance(part, ast.Constant)
        or (isinstance(part.value, ast.Name) and part.value.id in placeholders)
        for part in statement.values
    )


def test_every_sql_statement_is_a_constant_with_parameters() -> None:
    """No SQL text is built from values: the statement is a literal (at most with a run of
    `?` placeholders spliced in), and values go in the parameters."""
    offenders = []
    checked = 0
    for path in sorted((REPO / "bot").rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        placeholders = _placeholder_names(tree) | _constant_names(tree)
        for call in _sql_calls(tree):
            statement = call.args[0]
            if isinstance(statement, ast.Constant) and isinstance(statement.value, str):
                checked += 1
                continue
            if isinstance(statement, ast.JoinedStr) and _only_placeholders(statement, placeholders):
                continue
            if isinstance(statement, ast.JoinedStr | ast.BinOp) or (
                isinstance(statement, ast.Call)
                and isinstance(statement.func, ast.Attribute)
                and statement.func.attr == "format"
            ):
                offenders.append(f"{path.relative_to(REPO)}:{call.lineno}")
    assert checked >= 20
    assert offenders == []


async def test_cooldown_is_friendly_and_only_counts_accepted_jobs(tmp_path: Path) -> None:
    config = _config(tmp_path)
    config = dataclasses.replace(
        config, discord=dataclasses.replace(config.discord, command_cooldown_s=3.0)
    )
    now = [100.0]
    worker = InProcessWorker(config.engine, config.data_dir, create_fake_engine)
    core = await open_core(config, lambda _c: False, workers=[worker])
    try:
        app = ImagineApp(config, core, monotonic=lambda: now[0])
        user = Actor(user_id=5)
        with pytest.raises(UserError):
            await app.imagine(user, "a fox --ar 0:1")  # a typo starts no cooldown
        await app.imagine(user, "a fox")
        now[0] += 1.0
        with pytest.raises(UserError, match=r"try again in 2 s"):
            await app.imagine(user, "another fox")
        await app.imagine(Actor(user_id=6), "someone else is not held back")
        # Manage Server in one listed server makes an admin there, not of the shared queue.
        server_admin = Actor(user_id=8, guild_id=900, is_admin=True)
        await app.imagine(server_admin, "a server admin's first")
        with pytest.raises(UserError, match=r"try again in 3 s"):
            await app.imagine(server_admin, "a server admin's second at once")
        owner = Actor(user_id=7, guild_id=900, is_admin=True, is_owner=True)
        await app.imagine(owner, "owners are exempt")
        await app.imagine(owner, "even twice in a row")
        now[0] += 2.5
        await app.imagine(user, "a third fox")
        now[0] += 10
        # Sent at the same moment, both would pass a check that is only recorded later.
        results = await asyncio.gather(
            *(app.imagine(user, f"burst {i}") for i in range(5)), return_exceptions=True
        )
        accepted = [r for r in results if not isinstance(r, BaseException)]
        assert len(accepted) == 1
        assert all(isinstance(r, UserError) for r in results if r not in accepted)
    finally:
        await core.close(drain_timeout_s=5.0)
