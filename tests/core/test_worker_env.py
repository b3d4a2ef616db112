"""A worker process never sees DISCORD_TOKEN: not in its `os.environ`, not in the environment
it was started with (`/proc/<pid>/environ`), and nothing else of the bot's environment beyond
what the engine's libraries need. The bot takes the token out of its own environment as soon as
it has read it, so nothing it starts later (a local Ray cluster included) inherits it. (A Ray
actor on a node started with the token: tests/core/test_ray_workers.py.)"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from bot.core import JobState, Owner, ProcessWorker
from bot.core.worker_env import forget_token, worker_environment
from generation.settings import EngineSettings
from tests.core.conftest import finished, make_config, open_core, request
from tests.core.fakes import FakeEngine

TOKEN = "MTIzNDU2Nzg5.worker-must-not-see.this-token"
ALICE = Owner(user_id=101, guild_id=1, channel_id=2)


def create_engine_recording_its_environment(settings: EngineSettings) -> FakeEngine:
    """Writes what its process sees to `fake_marker_dir`: `os.environ`, and the environment the
    process was started with, as the kernel keeps it."""
    marker_dir = Path(settings.extra["fake_marker_dir"])
    marker_dir.mkdir(parents=True, exist_ok=True)
    started = ""
    proc = Path(f"/proc/{os.getpid()}/environ")
    if proc.exists():
        started = proc.read_bytes().decode(errors="replace")
    seen = {"environ": dict(os.environ), "started_with": started}
    (marker_dir / f"env-{os.getpid()}.json").write_text(json.dumps(seen))
    return FakeEngine(settings)


async def test_a_worker_process_cannot_see_the_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DISCORD_TOKEN", TOKEN)
    monkeypatch.setenv("SOME_OTHER_SECRET", "owner-shell-password")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    config = make_config(tmp_path)
    worker = ProcessWorker(
        config.engine,
        config.data_dir,
        f"{__name__}:create_engine_recording_its_environment",
        environment={"CUDA_VISIBLE_DEVICES": "7"},
    )
    core = await open_core(config, workers=[worker])
    try:
        job = await core.scheduler.submit(ALICE, request("a red fox"))
        assert (await finished(core, job.id)).state is JobState.SUCCEEDED
    finally:
        await core.close(drain_timeout_s=2.0)
    (record,) = [json.loads(p.read_text()) for p in (tmp_path / "markers").glob("env-*.json")]
    environ, started = record["environ"], record["started_with"]
    assert "DISCORD_TOKEN" not in environ and TOKEN not in json.dumps(environ)
    assert "SOME_OTHER_SECRET" not in environ
    if sys.platform.startswith("linux"):
        assert started and TOKEN not in started and "owner-shell-password" not in started
    # What the engine needs is there: its libraries' settings and its pinned device.
    assert environ["HF_HOME"] == str(tmp_path / "hf") and environ["PATH"] == os.environ["PATH"]
    assert environ["CUDA_VISIBLE_DEVICES"] == "7"
    # And the bot's own environment is whole again after the start.
    assert os.environ["DISCORD_TOKEN"] == TOKEN
    assert os.environ["SOME_OTHER_SECRET"] == "owner-shell-password"


def test_the_kept_environment_is_what_the_engine_needs() -> None:
    source = {
        "PATH": "/usr/bin",
        "HOME": "/home/bot",
        "LC_ALL": "C.UTF-8",
        "HF_TOKEN": "hf_x",
        "CUDA_VISIBLE_DEVICES": "0",
        "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",
        "DISCORD_TOKEN": TOKEN,
        "AWS_SECRET_ACCESS_KEY": "x",
        "DATABASE_URL": "x",
    }
    assert sorted(worker_environment(source)) == [
        "CUDA_VISIBLE_DEVICES",
        "HF_TOKEN",
        "HOME",
        "LC_ALL",
        "PATH",
        "PYTORCH_CUDA_ALLOC_CONF",
    ]


def test_the_token_leaves_the_bots_environment_once_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISCORD_TOKEN", f"  {TOKEN}\n")
    assert forget_token() == TOKEN
    assert "DISCORD_TOKEN" not in os.environ
    assert forget_token() == ""


def test_main_reads_the_token_then_drops_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import bot.__main__ as entry
    import bot.discord.client

    seen: dict[str, Any] = {}

    async def run_discord(config: Any, token: str, **companions: Any) -> None:
        # Where the bot would connect and start its workers: the token is an argument only.
        seen["token"] = token
        seen["environ"] = os.environ.get("DISCORD_TOKEN")

    config = tmp_path / "config.toml"
    config.write_text(f'data_dir = "{tmp_path / "data"}"\n[discord]\nguild_ids = [1]\n')
    monkeypatch.setenv("DISCORD_TOKEN", TOKEN)
    monkeypatch.setattr(bot.discord.client, "run_discord", run_discord)
    monkeypatch.setattr(entry, "setup_logging", lambda *args, **kwargs: None)
    assert entry.main(["--config", str(config)]) == 0
    assert seen == {"token": TOKEN, "environ": None}
