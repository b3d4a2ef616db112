"""Which servers the bot serves and whose word counts where (bot/app/access.py), and the app's use
of it for other members' jobs."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bot.app.access import (
    DM_COMMAND,
    UNLISTED_SERVER,
    AdminScope,
    admin_scope,
    gate_refusal,
    may_manage,
)
from bot.app.actions import Actor, UserError
from bot.app.application import ImagineApp, open_core
from bot.config import DiscordConfig
from bot.core import InProcessWorker
from bot.core.models import JobState
from tests.bot.test_bad_input import _config
from tests.bot.test_main import run_bot
from tests.core.fakes import create_fake_engine

MAIN, SECOND, STRANGER = 1001, 1002, 1003
OWNER, MODERATOR_ROLE = 7, 555
SETTINGS = DiscordConfig(
    guild_ids=(MAIN, SECOND), admin_user_ids=frozenset({OWNER}), admin_role_ids=frozenset({555})
)


@pytest.mark.parametrize(
    ("user_id", "guild_id", "roles", "manage", "expected"),
    [
        # The owners are owners everywhere, DMs and unlisted servers included.
        (OWNER, MAIN, (), False, AdminScope.OWNER),
        (OWNER, STRANGER, (), False, AdminScope.OWNER),
        (OWNER, None, (), False, AdminScope.OWNER),
        # Manage Server or an admin role count inside a listed server only.
        (8, MAIN, (), True, AdminScope.SERVER),
        (8, SECOND, (), True, AdminScope.SERVER),
        (8, STRANGER, (), True, AdminScope.NONE),
        (8, None, (), True, AdminScope.NONE),
        (8, MAIN, (MODERATOR_ROLE,), False, AdminScope.SERVER),
        (8, STRANGER, (MODERATOR_ROLE,), False, AdminScope.NONE),
        (8, MAIN, (), False, AdminScope.NONE),
    ],
)
def test_admin_scope(
    user_id: int, guild_id: int | None, roles: tuple[int, ...], manage: bool, expected: AdminScope
) -> None:
    scope = admin_scope(
        SETTINGS, user_id=user_id, guild_id=guild_id, role_ids=roles, manage_guild=manage
    )
    assert scope is expected


def test_a_servers_everyone_role_listed_as_admin_role_makes_nobody_an_admin() -> None:
    settings = dataclasses.replace(SETTINGS, admin_role_ids=frozenset({MAIN}))
    assert admin_scope(settings, user_id=8, guild_id=MAIN, role_ids=(MAIN,)) is AdminScope.NONE


def test_the_applications_owner_passed_in_is_an_owner() -> None:
    scope = admin_scope(SETTINGS, user_id=9, guild_id=STRANGER, owner_ids={OWNER, 9})
    assert scope is AdminScope.OWNER


@pytest.mark.parametrize(
    ("guild_id", "is_command", "expected"),
    [
        (MAIN, True, None),
        (SECOND, False, None),
        (STRANGER, True, UNLISTED_SERVER),
        (STRANGER, False, UNLISTED_SERVER),
        # A DM: buttons under the bot's own DM deliveries, never a command.
        (None, False, None),
        (None, True, DM_COMMAND),
    ],
)
def test_gate(guild_id: int | None, is_command: bool, expected: str | None) -> None:
    assert gate_refusal(SETTINGS, guild_id, is_command) == expected


def test_an_empty_list_serves_no_server() -> None:
    assert gate_refusal(DiscordConfig(), MAIN, True) == UNLISTED_SERVER


def test_may_manage() -> None:
    assert may_manage(AdminScope.OWNER, SECOND, MAIN)
    assert may_manage(AdminScope.OWNER, None, MAIN)
    assert may_manage(AdminScope.SERVER, MAIN, MAIN)
    assert not may_manage(AdminScope.SERVER, SECOND, MAIN)
    assert not may_manage(AdminScope.SERVER, None, None)
    assert not may_manage(AdminScope.NONE, MAIN, MAIN)


@pytest.fixture
async def app(tmp_path: Path) -> AsyncIterator[ImagineApp]:
    config = _config(tmp_path)
    worker = InProcessWorker(config.engine, config.data_dir, create_fake_engine)
    core = await open_core(config, lambda _c: False, workers=[worker])
    yield ImagineApp(config, core, seed_source=lambda: 1234)
    await core.close(drain_timeout_s=5.0)


async def test_a_server_admin_reaches_the_jobs_of_their_own_server_only(app: ImagineApp) -> None:
    alice = Actor(user_id=11, guild_id=MAIN, channel_id=1)
    (submitted,) = await app.imagine(alice, "a lighthouse")
    job_id = submitted.job.id
    for _ in range(200):
        if (await app.core.jobs.require(job_id)).state is JobState.SUCCEEDED:
            break
        await asyncio.sleep(0.05)
    foreign = Actor(user_id=12, guild_id=SECOND, channel_id=2, is_admin=True)
    local = Actor(user_id=13, guild_id=MAIN, channel_id=1, is_admin=True)
    owner = Actor(user_id=OWNER, guild_id=SECOND, channel_id=2, is_admin=True, is_owner=True)
    member = Actor(user_id=14, guild_id=MAIN, channel_id=1)
    for outsider in (foreign, member):
        with pytest.raises(UserError, match="isn't your job"):
            await app.cancel(outsider, job_id)
        with pytest.raises(UserError, match="isn't your job"):
            await app.check_delete(outsider, job_id)
    # Past the ownership check, these get to the job itself (finished: nothing to cancel).
    for admin in (local, owner):
        with pytest.raises(UserError, match="already finished"):
            await app.cancel(admin, job_id)
        assert (await app.check_delete(admin, job_id)).id == job_id


def test_python_m_bot_with_no_servers_listed_is_one_clear_line_and_exit_2(
    tmp_path: Path,
) -> None:
    path = tmp_path / "config.toml"
    path.write_text('data_dir = "data"\n[discord]\nguild_ids = []\n')
    result = run_bot("--config", str(path), env={"DISCORD_TOKEN": "secret-token-value"})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "guild_ids is empty" in lines[0], result.stderr
    assert not (tmp_path / "data").exists()
