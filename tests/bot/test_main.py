"""`python -m bot` as a server owner starts it: exit codes, and the console front end."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bot.app.application import open_core
from bot.console.shell import SHELL_USER_ID, run_shell
from tests.bot.conftest import bot_config, in_process_workers

REPO = Path(__file__).resolve().parents[2]


def run_bot(
    *args: str, env: dict[str, str] | None = None, **options: Any
) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if k != "DISCORD_TOKEN"}
    environment.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "bot", *args],
        cwd=REPO,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
        **options,
    )


def test_missing_token_is_one_clear_line_and_exit_2() -> None:
    result = run_bot("--config", str(REPO / "config.toml"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "DISCORD_TOKEN" in lines[0] and "--shell" in lines[0]


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("[scheduler]\nmax_queue = -1\n", "scheduler.max_queue"),
        ("[credits\n", "not valid TOML"),
    ],
)
def test_bad_config_is_one_clear_line_and_exit_2(
    tmp_path: Path, content: str, expected: str
) -> None:
    path = tmp_path / "config.toml"
    path.write_text(content)
    result = run_bot("--config", str(path), env={"DISCORD_TOKEN": "secret-token-value"})
    assert result.returncode == 2
    assert expected in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "secret-token-value" not in result.stderr + result.stdout


def test_shell_runs_the_main_job_end_to_end(tmp_path: Path, tiny_models: Path) -> None:
    """The README's first command on a machine with no token: the real worker process and
    the tiny model, commands piped in, images written where the shell says."""
    config = tmp_path / "config.toml"
    text = (REPO / "config.toml").read_text()
    text = text.replace('data_dir = "data"', 'data_dir = "data"\n', 1)
    # The run's tiny models (a worker that builds them on first use: tests/core/test_real_engine).
    text = text.replace('cache_dir = "models"', f"cache_dir = {json.dumps(str(tiny_models))}", 1)
    assert str(tiny_models) in text
    text = re.sub(r"default_steps = \d+", "default_steps = 3", text)
    text = re.sub(r"candidates = \d+", "candidates = 4", text)
    text = re.sub(r"command_cooldown_s = [\d.]+", "command_cooldown_s = 0.0", text)
    config.write_text(text)
    commands = "/imagine a red fox --ar 3:2 --seed 5 --v 6\n/balance\nU2\nupscale subtle\n"
    # One torch thread, as each test worker has (tests/conftest.py): on cores the other workers
    # keep busy, a second thread mostly spins waiting for the first.
    threads = {"OMP_NUM_THREADS": "1"}
    result = run_bot("--shell", "--config", str(config), input=commands, env=threads)
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert "--v 6" in out or "--v" in out  # the ignored flag is noted
    paths = re.findall(r"(?:grid|image \d): (\S+\.png)", out)
    assert len(paths) == 6, out  # the grid, four kept images, then the upscale
    # U2 picks the image (free, its own file); the upscale is the job that works on it.
    separated = re.findall(r"Image #2 of job 1: (\S+\.png)", out)
    assert separated == [paths[2]], out
    assert "Upscale of image 2 from job 1" in out
    for path in paths:
        assert Path(path).is_file() and Path(path).is_relative_to(tmp_path / "data")
    assert "credits available" in out


async def test_shell_commands_in_process(
    tmp_path: Path, bot_engine_settings: Any, shared_engine: Any
) -> None:
    config = bot_config(tmp_path / "data", bot_engine_settings)
    stdin = io.StringIO(
        "/imagine a blue bird --seed 9\n/jobs\nV1\n/imagine\n/imagine x --stepz 3\nnonsense\n"
        "vary subtle\nU2\nvary subtle\nzoom 1.5\npan sideways\nregion centre a nest\n/help\n"
    )
    out = io.StringIO()
    code = await run_shell(
        config,
        stdin=stdin,
        out=out,
        core_options={"workers": in_process_workers(config, shared_engine)},
    )
    text = out.getvalue()
    assert code == 0
    assert "seed 9" in text and "Best 4 of 8 by CLIP" in text
    assert "Variations of image 1 from job 1" in text
    assert "Vary" not in text.split("Variations of image 1")[0]
    assert "✖ prompt" in text  # the empty /imagine
    assert "✖ --stepz" in text and "Unknown command 'nonsense'" in text
    # The edits work on a picked image: none yet, then image 2 of the variation grid.
    assert "✖ No image picked" in text
    assert "Image #2 of job 2: " in text and "✖ direction: expected left" in text
    workers = in_process_workers(config, shared_engine)
    core = await open_core(config, lambda _channel: False, workers=workers)
    try:
        jobs = list(reversed(await core.jobs.for_user(SHELL_USER_ID)))
    finally:
        await core.close()
    assert [(job.kind.value, job.parent_job_id, job.parent_index) for job in jobs[2:]] == [
        ("variation", 2, 1),
        ("zoom", 2, 1),
        ("region", 2, 1),
    ]
    assert jobs[-1].request_data["regions"] == ["centre"]
    assert "a nest" in jobs[-1].request_data["prompt"]
