"""/metrics, /healthz and /readyz over real HTTP, on a real core (fake engine at the edge)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bot.app.health import FAILED, HealthServer, ray_summary, start_health_server
from bot.config import ConfigError, MetricsConfig, parse_config
from bot.core import Core, Finished, InProcessWorker, Job, JobKind, JobState, Owner
from bot.core.execute import WorkOutcome
from bot.discord.client import ImagineBot
from generation.contract import InputImage, InputRole
from generation.requests import describe_request, zoom_request
from generation.settings import EngineSettings
from tests.bot.conftest import bot_config, in_process_workers
from tests.core.conftest import finished, make_config, open_core, request
from tests.core.fakes import FakeEngine, create_fake_engine
from tests.fakediscord import FakeDiscord

ALICE = Owner(user_id=101, guild_id=1, channel_id=2)
BOB = Owner(user_id=202, guild_id=1, channel_id=2)
# Readiness refreshed often, so the tests see a change soon after it happens.
LOCAL = MetricsConfig(enabled=True, host="127.0.0.1", port=0, ready_refresh_s=0.05)


async def get(server: HealthServer, path: str) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{server.port}{path}") as response,
    ):
        return response.status, await response.text()


async def until(condition: Callable[[], Awaitable[bool]], timeout_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while asyncio.get_running_loop().time() < deadline:
        if await condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not met in time")


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample as {(name, sorted labels): value}."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


async def test_metrics_count_the_jobs_that_ran_by_kind_and_outcome(tmp_path: Path) -> None:
    core = await open_core(make_config(tmp_path))
    server = await start_health_server(LOCAL, core)
    assert server is not None
    try:
        jobs = [
            await core.scheduler.submit(ALICE, request("a red fox")),
            await core.scheduler.submit(BOB, request("a blue owl")),
            await core.scheduler.submit(ALICE, request("a cat [raise]")),
        ]
        ended = [await finished(core, job.id) for job in jobs]
        assert [job.state for job in ended] == [
            JobState.SUCCEEDED,
            JobState.SUCCEEDED,
            JobState.FAILED,
        ]
        status, text = await get(server, "/metrics")
    finally:
        await server.close()
        await core.close(drain_timeout_s=2.0)

    assert status == 200
    found = samples(text)
    imagine = (("kind", "imagine"),)
    assert found[("imagine_jobs_total", (*imagine, ("outcome", "succeeded")))] == 2
    assert found[("imagine_jobs_total", (*imagine, ("outcome", "failed")))] == 1
    assert found[("imagine_job_wait_seconds_count", imagine)] == 3
    assert found[("imagine_job_run_seconds_count", imagine)] == 3
    assert found[("imagine_job_run_seconds_sum", imagine)] > 0
    cost = jobs[0].cost
    assert cost > 0 and all(job.cost == cost for job in jobs)
    assert found[("imagine_credits_held_total", ())] == 3 * cost
    assert found[("imagine_credits_settled_total", ())] == 2 * cost
    assert found[("imagine_credits_refunded_total", ())] == cost
    assert found[("imagine_queue_depth", ())] == 0
    assert found[("imagine_jobs_running", ())] == 0
    assert found[("imagine_workers_up", ())] == 1
    assert found[("imagine_workers_busy", ())] == 0
    assert found[("imagine_deliveries_lost_total", ())] == 0
    # On a CPU nobody reports GPU memory, and no metric is ever split by user.
    assert not [key for key in found if key[0] == "imagine_worker_gpu_memory_bytes"]
    assert not [key for key in found if any(name.startswith("user") for name, _ in key[1])]


async def test_metrics_count_every_kind_and_every_way_a_job_ends(tmp_path: Path) -> None:
    async def refuse_marked(job: Job, _outcome: WorkOutcome) -> str | None:
        return "withheld" if "[refuse]" in job.prompt else None

    core = await open_core(make_config(tmp_path), output_check=refuse_marked)
    server = await start_health_server(LOCAL, core)
    assert server is not None
    ended: list[Job] = []
    core.scheduler.add_listener(lambda e: ended.append(e.job) if isinstance(e, Finished) else None)
    try:
        parent = await finished(core, (await core.scheduler.submit(ALICE, request())).id)
        source = await core.jobs.image(parent.id, 0)
        parent_request = await core.jobs.request(parent.id)
        zoom = zoom_request(parent_request, source, factor=2.0, seed=3)
        await core.scheduler.submit(ALICE, zoom, JobKind.ZOOM, (parent.id, 0))
        picture = InputImage(InputRole.IMAGE_PROMPT, source, source="attachment:a.png")
        await core.scheduler.submit(BOB, describe_request(picture, seed=4), JobKind.DESCRIBE)
        await core.scheduler.submit(BOB, request("a cat [refuse]"))
        await core.scheduler.submit(BOB, request("a dog [raise]"))
        await until(lambda: _true(len(ended) == 5))
        # A result that can never be posted is refunded after it succeeded.
        undelivered = await core.scheduler.refund_undelivered(parent.id, "no permission")
        status, text = await get(server, "/metrics")
    finally:
        await server.close()
        await core.close(drain_timeout_s=2.0)

    assert status == 200 and undelivered == parent.cost > 0
    found = samples(text)
    outcomes = {(job.kind.value, job.state.value) for job in ended}
    assert outcomes == {
        ("imagine", "succeeded"),
        ("zoom", "succeeded"),
        ("describe", "succeeded"),
        ("imagine", "refused"),
        ("imagine", "failed"),
    }
    counted = {
        (dict(labels)["kind"], dict(labels)["outcome"]): value
        for (name, labels), value in found.items()
        if name == "imagine_jobs_total"
    }
    assert counted == {
        ("imagine", "succeeded"): 1,
        ("zoom", "succeeded"): 1,
        ("describe", "succeeded"): 1,
        ("imagine", "refused"): 1,
        ("imagine", "failed"): 1,
    }
    for kind in ("zoom", "describe"):
        assert found[("imagine_job_run_seconds_count", (("kind", kind),))] == 1
    succeeded = sum(job.cost for job in ended if job.state is JobState.SUCCEEDED)
    not_succeeded = sum(job.cost for job in ended if job.state is not JobState.SUCCEEDED)
    assert found[("imagine_credits_held_total", ())] == succeeded + not_succeeded
    assert found[("imagine_credits_settled_total", ())] == succeeded
    assert found[("imagine_credits_refunded_total", ())] == not_succeeded + parent.cost


async def _true(value: bool) -> bool:
    return value


async def test_gauges_show_the_queue_and_busy_workers_while_jobs_run(tmp_path: Path) -> None:
    core = await open_core(make_config(tmp_path, step_s=0.05))
    server = await start_health_server(LOCAL, core)
    assert server is not None
    try:
        first = await core.scheduler.submit(ALICE, request("a slow fox [slow]"))
        second = await core.scheduler.submit(BOB, request("a blue owl"))

        async def running() -> bool:
            return core.scheduler.running_count == 1

        await until(running)
        _status, text = await get(server, "/metrics")
        found = samples(text)
        assert found[("imagine_queue_depth", ())] == 1
        assert found[("imagine_jobs_running", ())] == 1
        assert found[("imagine_workers_busy", ())] == 1
        await core.scheduler.cancel(first.id)
        await core.scheduler.cancel(second.id)
        await finished(core, first.id)
        _status, text = await get(server, "/metrics")
        found = samples(text)
        cancelled = (("kind", "imagine"), ("outcome", "cancelled"))
        assert found[("imagine_jobs_total", cancelled)] == 2
        assert found[("imagine_credits_refunded_total", ())] == first.cost + second.cost
    finally:
        await server.close()
        await core.close(drain_timeout_s=2.0)


async def test_readyz_fails_until_a_worker_is_ready(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    allowed = threading.Event()

    def engine_once_allowed(settings: EngineSettings) -> FakeEngine:
        if not allowed.is_set():
            raise RuntimeError("CUDA error: out of memory")
        return create_fake_engine(settings)

    worker = InProcessWorker(config.engine, config.data_dir, engine_once_allowed)
    gateway: dict[str, str | None] = {"reason": None}

    async def gateway_check() -> str | None:
        return gateway["reason"]

    core: Core = await open_core(config, workers=[worker], worker_retry_s=0.05)
    server = await start_health_server(LOCAL, core, {"gateway": gateway_check})
    assert server is not None
    try:
        assert await get(server, "/healthz") == (200, '{"status": "ok"}')
        status, body = await get(server, "/readyz")
        assert status == 503
        assert "no worker is ready" in body and "database" not in body

        allowed.set()

        async def ready() -> bool:
            return (await get(server, "/readyz"))[0] == 200

        await until(ready)
        gateway["reason"] = "not connected to the Discord gateway"

        async def not_ready() -> bool:
            return (await get(server, "/readyz"))[0] == 503

        await until(not_ready)
        status, body = await get(server, "/readyz")
        assert status == 503 and "gateway" in body and "worker" not in body
    finally:
        await server.close()
        await core.close(drain_timeout_s=2.0)


async def test_readyz_names_a_database_that_takes_no_writes(tmp_path: Path) -> None:
    core = await open_core(make_config(tmp_path))
    server = await start_health_server(LOCAL, core)
    assert server is not None
    try:

        async def worker_ready() -> bool:
            return core.scheduler.ready_workers == 1

        await until(worker_ready)
        await core.db.close()

        async def not_ready() -> bool:
            return (await get(server, "/readyz"))[0] == 503

        await until(not_ready)
        status, body = await get(server, "/readyz")
        assert status == 503 and json.loads(body)["not_ready"] == {"database": FAILED}
    finally:
        await server.close()
        core.retention = None
        await core.scheduler.close(drain_timeout_s=2.0)
        if core.lock is not None:
            core.lock.release()


def test_the_server_is_off_unless_enabled() -> None:
    assert parse_config({}).metrics == MetricsConfig(enabled=False, host="127.0.0.1", port=9464)
    config = parse_config({"metrics": {"enabled": True, "host": "0.0.0.0", "port": 9100}})
    assert config.metrics == MetricsConfig(enabled=True, host="0.0.0.0", port=9100)


@pytest.mark.parametrize(
    ("metrics", "message"),
    [
        ({"port": 70000}, "metrics.port: must be at most 65535"),
        ({"port": -1}, "metrics.port: must be >= 0"),
        ({"host": " "}, "metrics.host: must not be empty"),
        ({"enabled": "yes"}, "metrics.enabled: must be bool"),
        ({"path": "/m"}, "metrics.path: unknown setting"),
    ],
)
def test_bad_metrics_settings_are_named(metrics: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config({"metrics": metrics})


async def test_disabled_metrics_start_no_server(tmp_path: Path) -> None:
    core = await open_core(make_config(tmp_path))
    try:
        assert await start_health_server(MetricsConfig(), core) is None
    finally:
        await core.close(drain_timeout_s=2.0)


async def test_the_discord_bot_serves_its_probes_sharded_over_the_fake_gateway(
    tmp_path: Path,
) -> None:
    settings = EngineSettings(cache_dir=tmp_path / "models")
    config = bot_config(
        tmp_path / "data",
        settings,
        moderation={"nsfw_check": False},
        metrics={"enabled": True, "port": 0, "ready_refresh_s": 0.05},
    )
    async with FakeDiscord() as fake:
        fake.add_user("alice")
        bot = ImagineBot(
            config,
            core_options={"workers": in_process_workers(config, FakeEngine(settings))},
            guild_ready_timeout=0.05,
        )
        async with fake.run_bot(bot):
            assert bot.shard_count == 1 and list(bot.shards) == [0]
            server = bot.health
            assert server is not None

            async def ready() -> bool:
                return (await get(server, "/readyz"))[0] == 200

            await until(ready)
            status, text = await get(server, "/metrics")
            assert status == 200 and "imagine_workers_up 1.0" in text
            assert await bot.gateway_check() is None
        assert await bot.gateway_check() == "not connected to the Discord gateway"


async def test_a_taken_port_is_named(tmp_path: Path) -> None:
    core = await open_core(make_config(tmp_path))
    first = await start_health_server(LOCAL, core)
    assert first is not None and first.port
    try:
        taken = MetricsConfig(enabled=True, host="127.0.0.1", port=first.port)
        with pytest.raises(OSError, match=rf"\[metrics\] cannot listen on 127.0.0.1:{first.port}"):
            await start_health_server(taken, core)
    finally:
        await first.close()
        await core.close(drain_timeout_s=2.0)


async def test_readyz_answers_from_the_last_check_and_writes_nothing_per_request(
    tmp_path: Path,
) -> None:
    core = await open_core(make_config(tmp_path))
    secret = f"{tmp_path}/imagine-bot.sqlite3 is locked by pid 4242"
    failing: dict[str, BaseException | None] = {"error": None}

    async def flaky() -> str | None:
        if failing["error"] is not None:
            raise failing["error"]
        return None

    slow = dataclasses.replace(LOCAL, ready_refresh_s=3600)
    server = await start_health_server(slow, core, {"storage": flaky})
    assert server is not None
    try:
        # The database check writes a timestamp; one per refresh, none per request.
        probed = await core.db.get_setting("health.probed_at")
        assert probed is not None
        for _ in range(30):
            await get(server, "/readyz")
        assert await core.db.get_setting("health.probed_at") == probed
        await server.refresh()
        assert await core.db.get_setting("health.probed_at") != probed

        # A failing check is named, with a fixed reason: its exception's text is not shown.
        failing["error"] = OSError(secret)
        await server.refresh()
        status, body = await get(server, "/readyz")
        assert status == 503
        assert json.loads(body) == {"status": "not ready", "not_ready": {"storage": FAILED}}
        assert str(tmp_path) not in body and "4242" not in body
    finally:
        await server.close()
        await core.close(drain_timeout_s=2.0)


@pytest.mark.parametrize(
    ("status", "summary"),
    [
        (
            "Ray cluster at 10.0.0.5:6379 unreachable (since 12:00:00): Connection refused",
            "the Ray cluster is unreachable",
        ),
        (
            "Ray cluster at 10.0.0.5:6379 not answering for 9 s (3 failed look(s)): timeout",
            "the Ray cluster is not answering",
        ),
        ("connecting to the Ray cluster at ray://10.0.0.5:10001", "connecting to the Ray cluster"),
        ("Ray cluster at 10.0.0.5:6379: 3 GPU on 2 node(s)", "Ray: 3 GPU on 2 node(s)"),
    ],
)
def test_readiness_names_the_ray_clusters_state_without_its_address(
    status: str, summary: str
) -> None:
    assert ray_summary(status) == summary
