"""`[workers]`: the backend and the Ray cluster's keys, the message when Ray is not installed,
and `/workers` (what `/admin workers` shows) for local workers."""

from __future__ import annotations

import asyncio
import io
import subprocess
import sys
from pathlib import Path

import pytest

from bot.config import ConfigError, WorkersConfig, parse_config
from bot.console.shell import Shell
from bot.core import JobState, Owner, ProgressUpdate
from tests.core.conftest import finished, make_config, open_core, request

REPO = Path(__file__).resolve().parents[2]


def test_workers_default_to_local_processes() -> None:
    assert parse_config({}).workers == WorkersConfig()
    assert parse_config({}).workers.backend == "local"


@pytest.mark.parametrize(
    "address", ["auto", "local", "head:6379", "10.0.0.5:6379", "ray://head:10001"]
)
def test_ray_addresses_that_are_accepted(address: str) -> None:
    workers = parse_config({"workers": {"backend": "ray", "ray_address": address}}).workers
    assert (workers.backend, workers.ray_address) == ("ray", address)


@pytest.mark.parametrize(
    ("table", "error"),
    [
        ({"backend": "slurm"}, "workers.backend: must be one of local, ray"),
        ({"ray_address": "head"}, 'workers.ray_address: must be "auto", "local"'),
        ({"ray_address": "ray://head"}, "workers.ray_address: must be"),
        ({"ray_address": "http://head:8265"}, "workers.ray_address: must be"),
        ({"ray_gpu_resource": " "}, "workers.ray_gpu_resource: must not be empty"),
        ({"ray_watch_interval_s": 0}, "workers.ray_watch_interval_s: must be > 0"),
        ({"ray_workers": 2}, "workers.ray_workers: unknown setting"),
        ({"ray_outage_grace_s": 0}, "workers.ray_outage_grace_s: must be > 0"),
        ({"ray_outage_grace_s": 50}, "workers.ray_outage_grace_s: must be at most 40"),
        ({"ray_actor_cpus": -1}, "workers.ray_actor_cpus: must be >= 0"),
        ({"ray_actor_cpus": "4"}, "workers.ray_actor_cpus: must be float"),
    ],
)
def test_bad_workers_settings_name_the_key(table: dict[str, object], error: str) -> None:
    with pytest.raises(ConfigError, match=error):
        parse_config({"workers": table})


def test_ray_outage_grace_and_actor_cpus_are_read() -> None:
    table = {"backend": "ray", "ray_outage_grace_s": 30, "ray_actor_cpus": 0.5}
    workers = parse_config({"workers": table}).workers
    assert (workers.ray_outage_grace_s, workers.ray_actor_cpus) == (30.0, 0.5)
    defaults = parse_config({"workers": {"backend": "ray"}}).workers
    assert (defaults.ray_outage_grace_s, defaults.ray_actor_cpus) == (25.0, 4.0)


def test_a_worker_count_beside_the_ray_backend_is_refused_not_ignored() -> None:
    with pytest.raises(ConfigError, match=r'scheduler.workers: not used with .*backend = "ray"'):
        parse_config({"workers": {"backend": "ray"}, "scheduler": {"workers": 2}})
    assert parse_config({"scheduler": {"workers": 2}}).scheduler.workers == 2


def test_asking_for_ray_without_ray_installed_is_one_clear_line(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[workers]\nbackend = "ray"\n')
    # The import fails at the edge, as on an install without the [ray] extra.
    code = (
        "import sys; sys.modules['ray'] = None; from bot.__main__ import main; "
        f"sys.exit(main(['--shell', '--config', {str(config)!r}]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "pip install -e '.[ray]'" in lines[0] and 'backend = "ray"' in lines[0]
    assert not (tmp_path / "data").exists()  # it stopped before opening anything


async def test_workers_command_lists_local_workers_with_their_job(tmp_path: Path) -> None:
    config = make_config(tmp_path, step_s=0.05)
    core = await open_core(config)
    out = io.StringIO()
    shell = Shell(config, core, out)
    try:
        await shell.handle("/workers")
        idle = out.getvalue()
        assert "local worker processes; 1 worker(s)." in idle
        assert "`in-process` on " in idle and ": idle · models: none yet" in idle

        job = await core.scheduler.submit(Owner(user_id=5), request("a fox", steps=40))
        async with core.scheduler.subscribe(job.id) as events:
            async for event in events:
                if isinstance(event, ProgressUpdate):
                    break
        await shell.handle("/workers")
        assert f"job {job.id} · models: none yet" in out.getvalue()
        assert (await finished(core, job.id)).state is JobState.SUCCEEDED
        await asyncio.sleep(0)
        out.truncate(0)
        await shell.handle("/workers")
        assert ": idle · models: tiny" in out.getvalue()
    finally:
        await core.close(drain_timeout_s=2.0)
