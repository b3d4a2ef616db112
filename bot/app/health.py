"""The operator's HTTP endpoints, on one small aiohttp server inside the bot's event loop:

* `/metrics`  Prometheus text format (see `bot.core.metrics`);
* `/healthz`  200 whenever the event loop answers (a liveness probe: a wedged loop answers
  nothing, and the probe's timeout says so);
* `/readyz`   200 when the bot can do its work: the database takes a write, at least one
  worker is ready, and (on Discord) the gateway is connected; otherwise 503 with a JSON body
  naming what is not ready.

Readiness is worked out in the background every `ready_refresh_s` and `/readyz` answers from
that, so a probe (or anyone hammering the port) costs nothing: no database write per request.
Each check gets a short timeout, so a stuck database makes the probe fail rather than hang. The
body says only which check failed and a fixed reason; an exception's text (paths, addresses)
goes to the log, not to whoever can reach the port. Nothing here imports discord: the front end
passes its own checks in.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from bot.config import MetricsConfig
from bot.core.db import Transaction
from bot.core.metrics import CONTENT_TYPE
from bot.core.service import Core

log = logging.getLogger(__name__)

# Returns None when ready, or a short reason why not.
ReadinessCheck = Callable[[], Awaitable[str | None]]

CHECK_TIMEOUT_S = 3.0
_PROBE_KEY = "health.probed_at"
FAILED = "failed (see the bot's log)"


def core_checks(core: Core) -> dict[str, ReadinessCheck]:
    async def database() -> str | None:
        # A real write: a full disk or a read-only mount fails here, not on a member's job.
        now = datetime.now(UTC).isoformat()

        async def work(txn: Transaction) -> None:
            await txn.set_setting(_PROBE_KEY, now)

        await core.db.transaction(work)
        return None

    async def workers() -> str | None:
        states = core.scheduler.worker_states()
        if any(state.ready for state in states):
            return None
        reason = f"no worker is ready (0 of {len(states)})"
        if core.ray_pool is not None:
            reason += f"; {ray_summary(core.ray_pool.status)}"
        return reason

    return {"database": database, "workers": workers}


_RAY_UNITS = re.compile(r"(\d+ \S+ on \d+ node\(s\))$")


def ray_summary(status: str) -> str:
    """The Ray pool's state in fixed words: its full status (`/admin workers`) names the
    cluster's address and the connection error, which are nobody else's business."""
    if "unreachable" in status:
        return "the Ray cluster is unreachable"
    if "not answering" in status:
        return "the Ray cluster is not answering"
    if status.startswith("connecting"):
        return "connecting to the Ray cluster"
    units = _RAY_UNITS.search(status)
    return f"Ray: {units.group(1)}" if units else "Ray: state unknown"


class HealthServer:
    def __init__(
        self,
        config: MetricsConfig,
        core: Core,
        extra_checks: Mapping[str, ReadinessCheck] | None = None,
    ) -> None:
        self._config = config
        self._core = core
        self._checks = {**core_checks(core), **(extra_checks or {})}
        self._runner: web.AppRunner | None = None
        self._refresher: asyncio.Task[None] | None = None
        # What /readyz answers: the last refresh's failing checks.
        self._failing: dict[str, str] = {"readiness": "not checked yet"}
        self.port: int | None = None

    async def start(self) -> None:
        await self.refresh()
        self._refresher = asyncio.create_task(self._refresh_forever(), name="readiness")
        try:
            await self._serve()
        except BaseException:
            await self._stop_refreshing()
            raise

    async def _serve(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, self._config.host, self._config.port)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise OSError(
                f"[metrics] cannot listen on {self._config.host}:{self._config.port}: {exc}"
            ) from exc
        self._runner = runner
        addresses = runner.addresses
        self.port = int(addresses[0][1]) if addresses else self._config.port
        log.info("metrics and health checks on http://%s:%s/", self._config.host, self.port)

    async def close(self) -> None:
        await self._stop_refreshing()
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def _stop_refreshing(self) -> None:
        task, self._refresher = self._refresher, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def not_ready(self) -> dict[str, str]:
        """What is not ready, by check name, as of the last refresh; empty when ready."""
        return dict(self._failing)

    async def refresh(self) -> dict[str, str]:
        """Run every check now and keep the result for /readyz."""
        names = list(self._checks)
        results = await asyncio.gather(*(self._run_check(name) for name in names))
        self._failing = {
            name: reason for name, reason in zip(names, results, strict=True) if reason
        }
        return dict(self._failing)

    async def _refresh_forever(self) -> None:
        while True:
            # The database check writes once a refresh: this many, not one per request.
            await asyncio.sleep(self._config.ready_refresh_s)
            try:
                await self.refresh()
            except Exception:
                log.exception("readiness: refreshing failed")
                self._failing = {"readiness": FAILED}

    async def _run_check(self, name: str) -> str | None:
        try:
            return await asyncio.wait_for(self._checks[name](), CHECK_TIMEOUT_S)
        except TimeoutError:
            return f"no answer within {CHECK_TIMEOUT_S:g} s"
        except Exception as exc:
            log.warning("readiness check %s failed: %s: %s", name, type(exc).__name__, exc)
            return FAILED

    async def _metrics(self, _request: web.Request) -> web.Response:
        return web.Response(
            body=self._core.scheduler.metrics.exposition(),
            headers={"Content-Type": CONTENT_TYPE},
        )

    async def _healthz(self, _request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _readyz(self, _request: web.Request) -> web.Response:
        failing = dict(self._failing)
        body: dict[str, Any] = {"status": "not ready" if failing else "ready"}
        if failing:
            body["not_ready"] = failing
        return web.json_response(body, status=503 if failing else 200)


async def start_health_server(
    config: MetricsConfig,
    core: Core,
    extra_checks: Mapping[str, ReadinessCheck] | None = None,
) -> HealthServer | None:
    """The server when `[metrics] enabled`, else None."""
    if not config.enabled:
        return None
    server = HealthServer(config, core, extra_checks)
    await server.start()
    return server
