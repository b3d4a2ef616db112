"""Workers on a Ray cluster (`[workers] backend = "ray"`): one long-lived actor per GPU.

Long (about 650 lines): one backend, the pool that follows the cluster and the worker that
fronts one actor, which share the bridge and the cluster's state; the actor itself lives in
bot/core/ray_actor.py and the connection in bot/core/ray_bridge.py.

The scheduler, the fair queue and the credits ledger stay in the bot process; Ray only places
and runs the GPU work. The bot never calls Ray itself: a `RayBridge` process holds the
connection (see bot/core/ray_bridge.py for why). `RayPool` looks at the cluster's nodes every
`ray_watch_interval_s` and keeps one `RayWorker` per unit of the GPU resource of every live
node: a node that joins gets workers, one that leaves loses them. Each `RayWorker` is an
ordinary `Worker` to the scheduler and owns one `EngineActor` (bot/core/ray_actor.py), pinned
to its node, which builds the engine once and runs job after job.

Nothing crosses a shared filesystem: the bot reads a job's input files and sends their bytes
with the job, the actor sends the PNGs back as bytes, and the bot writes them into its own
data folder with the same code the local worker process uses (`execute.write_result`).

Failures keep their local meaning: an actor (or its node) that dies under a job is a
`WorkerCrashed` (re-queued at most `max_attempts` times), a timeout kills the actor, and an
unreachable cluster leaves every job queued, with one log line and a status for
`/admin workers` and `/readyz`, until it answers again (through a fresh bridge).

Ray is optional: nothing imports it until the Ray backend is asked for.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib.util
import itertools
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

from bot.config import Config
from bot.core.execute import (
    DEFAULT_ENGINE_FACTORY,
    JobError,
    RenderedJob,
    WorkItem,
    WorkOutcome,
    read_inputs,
    write_result,
)
from bot.core.ray_bridge import BridgeError, BridgeLost, RayBridge, host_port
from bot.core.worker_env import SECRETS
from bot.core.workers import (
    JobTimeout,
    ProgressSink,
    Worker,
    WorkerCrashed,
    WorkerStartFailed,
    WorkerUnavailable,
)
from generation.contract import GenerationCancelled
from generation.settings import EngineSettings

log = logging.getLogger(__name__)

NAMESPACE = "imagine-bot"
# Creating or killing an actor: a call that does not answer in this long has failed (it may go
# on hanging in the bridge process; nobody waits for it).
CALL_TIMEOUT_S = 30.0
# Connecting to the cluster (the bridge process starts, imports Ray and joins).
CONNECT_TIMEOUT_S = 30.0
# One look at the cluster's nodes.
LOOK_TIMEOUT_S = 10.0
# Looks must fail this many times in a row, for `ray_outage_grace_s`, before the bot gives up on
# its connection (which re-queues every running job and reloads every model).
MIN_FAILED_LOOKS = 3
# After a failed try at connecting, the next waits this long, doubling up to the limit.
CONNECT_RETRY_FIRST_S = 2.0
CONNECT_RETRY_MAX_S = 60.0
# Threads of an actor: the job's stream, a cancel, and room for a describe.
ACTOR_CONCURRENCY = 4


class RayNotInstalled(RuntimeError):
    """The Ray backend was asked for, but Ray (or its client) is not installed."""


def import_ray(address: str = "auto") -> ModuleType:
    """Ray, imported only now: the default install has no Ray. Raises RayNotInstalled with the
    line to print."""
    try:
        import ray
    except ImportError:
        raise RayNotInstalled(
            "[workers] backend = \"ray\" needs Ray: pip install -e '.[ray]' "
            '(or set backend = "local")'
        ) from None
    if address.startswith("ray://") and importlib.util.find_spec("grpc") is None:
        raise RayNotInstalled(
            f"[workers] ray_address = {address!r} needs Ray's client: "
            f"pip install 'ray[client]=={ray.__version__}' (or use the GCS address host:6379)"
        )
    return ray


class WorkerHost(Protocol):
    """What the pool changes as nodes come and go (the scheduler)."""

    def add_worker(self, worker: Worker) -> None: ...

    async def remove_worker(self, worker: Worker) -> None: ...


# ----- the bot's side of one actor ------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ActorSpec:
    """How the pool's actors are made (the same for every GPU)."""

    factory: str
    settings: EngineSettings
    gpu_resource: str
    startup_timeout_s: float
    log_level: int
    # At most this many CPUs an actor (`ray_actor_cpus`).
    actor_cpus: float = 0.0


def actor_cpus(wanted: float, node_cpus: float, node_units: int) -> float:
    """An actor's CPUs: what is asked for, but never more than its share of the node's CPUs,
    or some of its GPUs would get no actor."""
    if wanted <= 0 or node_units <= 0:
        return 0.0
    # Rounded down to Ray's resource precision (1/10000 of a unit).
    return min(wanted, int(node_cpus / node_units * 10_000) / 10_000)


def actor_options(gpu_resource: str, cpus: float = 0.0) -> dict[str, Any]:
    """Ray's options for one actor that takes one unit of `gpu_resource` and `cpus` CPUs (Ray
    sets its OMP_NUM_THREADS to that, at least 1)."""
    options: dict[str, Any] = {
        "num_cpus": cpus,
        "max_concurrency": ACTOR_CONCURRENCY,
        "max_restarts": 0,
        # An actor runs in its node's environment, which may hold the bot's token (a node
        # started with `ray start` in the shell that exported it): blanked there.
        "runtime_env": {"env_vars": {name: "" for name in sorted(SECRETS)}},
    }
    if gpu_resource == "GPU":
        # Ray gives the actor one GPU of its node and sets CUDA_VISIBLE_DEVICES to it.
        options["num_gpus"] = 1
    else:
        options["resources"] = {gpu_resource: 1}
    return options


class RayWorker:
    """One GPU unit of one node, as a `Worker` (capacity 1). The actor is created on start;
    after a crash or a timeout a new one is created in the background, on the same node."""

    def __init__(
        self,
        bridge: RayBridge,
        spec: ActorSpec,
        data_dir: Path,
        node_id: str,
        node_ip: str,
        slot: int,
        cpus: float = 0.0,
    ) -> None:
        self.name = f"ray-{node_id[:8]}-{slot}"
        self.capacity = 1
        self.node = node_ip
        self.device = f"{spec.gpu_resource} #{slot}"
        self.node_id = node_id
        self.slot = slot
        self.cpus = cpus
        # The actor's OMP_NUM_THREADS, once it runs.
        self.threads: str | None = None
        self.restarts = 0
        self.pid: int | None = None
        self._bridge = bridge
        self._spec = spec
        self._data_dir = data_dir.resolve()
        # Actor names are unique in the namespace: this bot (its bridge), this worker, a count.
        self._name_prefix = f"{self.name}-{bridge.pid}"
        self._names = itertools.count()
        self._actor: str | None = None
        self._starting: asyncio.Task[str] | None = None
        self._current: int | None = None
        self._closed = False

    @property
    def actor_name(self) -> str | None:
        """The live actor's name in the `imagine-bot` namespace, None between actors."""
        return self._actor

    async def start(self) -> None:
        await self._ensure_actor()

    async def _ensure_actor(self) -> str:
        if self._closed:
            raise WorkerStartFailed(f"worker {self.name} is closed")
        if self._actor is not None:
            return self._actor
        if self._starting is None:
            self._starting = asyncio.create_task(self._spawn(), name=f"{self.name}-spawn")
        task = self._starting
        try:
            return await asyncio.shield(task)
        finally:
            if task.done() and self._starting is task:
                self._starting = None

    async def _spawn(self, replacing: str | None = None) -> str:
        spec = self._spec
        if replacing is not None:
            # Killed (and its handle dropped in the bridge) before anything takes its place: an
            # actor that failed a call may still be alive, holding its GPU, and a replacement
            # would wait for that GPU until it timed out.
            await self._kill(replacing)
        try:
            alive = await self._bridge.call("node_alive", self.node_id, timeout_s=CALL_TIMEOUT_S)
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise WorkerStartFailed(
                f"worker {self.name}: could not check its node: {exc or type(exc).__name__}"
            ) from exc
        if not alive:
            # An actor pinned to a node that is gone would wait for it until its start-up
            # timeout; the pool drops this worker at its next look.
            raise WorkerStartFailed(f"worker {self.name}: its Ray node {self.node} is gone")
        actor = f"{self._name_prefix}-{next(self._names)}"
        try:
            await self._bridge.call(
                "create",
                actor,
                self.node_id,
                actor_options(spec.gpu_resource, self.cpus),
                spec.factory,
                spec.settings,
                spec.log_level,
                timeout_s=CALL_TIMEOUT_S,
            )
            info = await self._bridge.call(
                "method", actor, "describe", (), timeout_s=spec.startup_timeout_s
            )
        except BaseException as exc:
            self._kill_later(actor)
            if isinstance(exc, asyncio.CancelledError):
                raise
            reason = (
                f"no answer in {spec.startup_timeout_s:g} s"
                if isinstance(exc, TimeoutError)
                else str(exc)
            )
            raise WorkerStartFailed(f"worker {self.name}: engine did not start: {reason}") from exc
        if self._closed:
            self._kill_later(actor)
            raise WorkerStartFailed(f"worker {self.name} is closed")
        self.pid = int(info["pid"])
        self.threads = info.get("threads") or None
        self.node = info["node_ip"]
        if info["gpus"]:
            self.device = f"GPU {info['gpus']}"
        self._actor = actor
        log.info("worker %s: engine ready in actor pid %s on %s", self.name, self.pid, self.node)
        return actor

    def _restart_soon(self, replacing: str) -> None:
        """Load the models again while the queue is quiet, not when the next job arrives; the
        actor being replaced is killed first."""
        if self._closed or (self._starting is not None and not self._starting.done()):
            self._kill_later(replacing)
            return
        self._starting = asyncio.create_task(self._spawn(replacing), name=f"{self.name}-respawn")
        self._starting.add_done_callback(self._restarted)

    def _restarted(self, task: asyncio.Task[str]) -> None:
        if task.cancelled():
            return
        if task.exception() is not None:
            # Left in `_starting`: the next job gets this error (WorkerUnavailable).
            log.error("worker %s: restart failed: %s", self.name, task.exception())
        elif self._starting is task:
            self._starting = None

    def _lost(self, actor: str) -> None:
        """The actor failed a job in a way the job did not report (it died, timed out, was
        aborted, or its answer was lost): it is not used again, whatever state it is in."""
        if self._actor == actor:
            self._actor = None
        self.restarts += 1
        self._restart_soon(replacing=actor)

    async def _kill(self, actor: str) -> None:
        """`ray.kill` the actor and drop the bridge's handle on it (also when it is dead)."""
        with contextlib.suppress(Exception):
            await self._bridge.call("kill", actor, timeout_s=CALL_TIMEOUT_S)

    def _kill_later(self, actor: str) -> None:
        task = asyncio.get_running_loop().create_task(self._kill(actor))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def run(self, item: WorkItem, on_progress: ProgressSink, timeout_s: float) -> WorkOutcome:
        if self._current is not None:
            raise RuntimeError(f"worker {self.name} is busy with job {self._current}")
        self._current = item.job_id
        try:
            try:
                inputs = await asyncio.to_thread(read_inputs, self._data_dir, item)
            except (OSError, ValueError) as exc:
                raise JobError(f"invalid request: {exc}", "invalid") from exc
            if self._actor is None and self._starting is not None and not self._starting.done():
                # Its actor is being replaced after a crash: handed back, the job runs on
                # another free worker now instead of waiting for this one's models to load.
                raise WorkerUnavailable(f"worker {self.name}: its actor is being replaced")
            try:
                actor = await self._ensure_actor()
            except WorkerStartFailed as exc:
                raise WorkerUnavailable(str(exc)) from exc
            reply = await self._run_on(actor, item, inputs, on_progress, timeout_s)
        finally:
            self._current = None
        tag = reply[0]
        if tag == "cancelled":
            raise GenerationCancelled()
        if tag == "error":
            raise JobError(reply[2], reply[1])
        rendered: RenderedJob = reply[1]
        try:
            return await asyncio.to_thread(write_result, rendered, self._data_dir)
        except (OSError, ValueError) as exc:
            log.error("job %d: could not write its result: %s", item.job_id, exc)
            raise JobError("the result could not be saved", "worker") from exc

    async def _run_on(
        self,
        actor: str,
        item: WorkItem,
        inputs: Mapping[str, bytes],
        on_progress: ProgressSink,
        timeout_s: float,
    ) -> tuple[Any, ...]:
        answers: list[tuple[Any, ...]] = []

        def on_item(message: tuple[Any, ...]) -> None:
            if message[0] != "progress":
                answers.append(message)
            elif message[3] is not None:
                on_progress(message[1], message[2], message[3])
            else:
                on_progress(message[1], message[2])

        try:
            # One streaming call for the whole job: its steps and previews come as items.
            await self._bridge.stream(
                "stream", actor, "run", (item, dict(inputs)), on_item=on_item, timeout_s=timeout_s
            )
        except TimeoutError:
            log.warning("worker %s: job %d timed out; killing its actor", self.name, item.job_id)
            self._lost(actor)
            raise JobTimeout(timeout_s) from None
        except asyncio.CancelledError:
            # Hard abort (cancel grace expired, or shutdown): only a new actor is sure to
            # have a free GPU.
            self._lost(actor)
            raise
        except BridgeError as exc:
            if exc.kind == "task":
                # `run` returns its errors; one that escapes it is a bug of the worker's.
                log.error("worker %s: job %d: %s", self.name, item.job_id, exc)
                raise JobError("the worker failed", "worker") from exc
            # The actor died, or its node did, or the answer was lost on the way (the actor
            # may be alive and still hold its GPU): killed before its replacement starts.
            self._lost(actor)
            raise WorkerCrashed(f"the Ray actor of worker {self.name} failed: {exc}") from exc
        except BridgeLost as exc:
            # Ray ends the actors of a driver that is gone; the kill fails quietly.
            self._lost(actor)
            raise WorkerCrashed(f"worker {self.name} lost its Ray cluster: {exc}") from exc
        if not answers:
            log.error("worker %s: job %d: the stream ended with no answer", self.name, item.job_id)
            raise JobError("the worker failed", "worker")
        return answers[-1]

    async def cancel(self, job_id: int) -> None:
        actor = self._actor
        if actor is not None and self._current == job_id:
            with contextlib.suppress(Exception):
                await self._bridge.call("method", actor, "cancel", (job_id,), timeout_s=5.0)

    async def close(self) -> None:
        self._closed = True
        if self._starting is not None:
            self._starting.cancel()
            with contextlib.suppress(BaseException):
                await self._starting
        actor, self._actor = self._actor, None
        if actor is not None:
            with contextlib.suppress(Exception):
                await self._bridge.call("kill", actor, timeout_s=CALL_TIMEOUT_S)


# ----- the pool: one worker per GPU of every live node ----------------------------------------


class RayPool:
    """Connects to the cluster (through a `RayBridge`) and keeps the host's Ray workers in step
    with its GPU nodes; throws the bridge away when the cluster has stopped answering for
    `ray_outage_grace_s` (one slow look costs nothing)."""

    def __init__(
        self,
        config: Config,
        engine_factory: str = DEFAULT_ENGINE_FACTORY,
        log_level: int | None = None,
    ) -> None:
        workers = config.workers
        self._address = workers.ray_address
        self._interval_s = workers.ray_watch_interval_s
        self._grace_s = workers.ray_outage_grace_s
        self._data_dir = config.data_dir
        settings = config.engine
        if workers.ray_cache_dir:
            settings = dataclasses.replace(settings, cache_dir=Path(workers.ray_cache_dir))
        self._spec = ActorSpec(
            factory=engine_factory,
            settings=settings,
            gpu_resource=workers.ray_gpu_resource,
            startup_timeout_s=config.scheduler.worker_startup_timeout_s,
            log_level=log_level if log_level is not None else logging.getLogger().level,
            actor_cpus=workers.ray_actor_cpus,
        )
        # Fails now, with the line to print, when Ray is not installed.
        import_ray(self._address)
        self._host: WorkerHost | None = None
        self._bridge: RayBridge | None = None
        self._workers: dict[tuple[str, int], RayWorker] = {}
        self._task: asyncio.Task[None] | None = None
        # Since when the cluster is given up on (no bridge), for the log line when it returns.
        self._down_since: float | None = None
        # Failed looks in a row through a live bridge, and when the first of them started.
        self._failed_looks = 0
        self._failing_since: float | None = None
        # Connecting again after a failed try waits this long (doubling up to a limit): a fresh
        # bridge is a process that imports Ray, not something to start every few seconds.
        self._connect_delay_s = 0.0
        self._next_connect_at = 0.0
        self.bridges_started = 0
        self.status = f"connecting to the Ray cluster at {self._address}"

    @property
    def workers(self) -> list[RayWorker]:
        return list(self._workers.values())

    @property
    def bridge_pid(self) -> int | None:
        """The process that holds the Ray connection now (None while disconnected)."""
        return self._bridge.pid if self._bridge is not None else None

    async def actors_held(self) -> list[str]:
        """The actors the bridge holds a handle on (each keeps its actor, and its GPU, alive);
        one per live worker when all is well."""
        bridge = self._bridge
        if bridge is None:
            return []
        held: list[str] = await bridge.call("held", timeout_s=CALL_TIMEOUT_S)
        return held

    async def start(self, host: WorkerHost) -> None:
        """Look at the cluster now, then every `ray_watch_interval_s`."""
        self._host = host
        await self.refresh()
        self._task = asyncio.create_task(self._watch(), name="ray-watch")

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            try:
                await self.refresh()
            except Exception:
                log.exception("watching the Ray cluster failed; trying again")

    async def refresh(self) -> None:
        """One look at the cluster: add workers for new GPUs, drop those of gone nodes."""
        assert self._host is not None
        bridge = self._bridge
        if bridge is None:
            bridge = await self._reconnect()
            if bridge is None:
                return
        try:
            slots: dict[tuple[str, int], tuple[str, float, int]] = await bridge.call(
                "slots", self._spec.gpu_resource, timeout_s=LOOK_TIMEOUT_S
            )
        except BridgeLost as exc:
            # The bridge process is gone (Ray's driver ended it): its actors went with it.
            await self._give_up(exc)
            return
        except Exception as exc:
            await self._look_failed(exc)
            return
        self._answered()
        for key in [k for k in self._workers if k not in slots]:
            worker = self._workers.pop(key)
            log.info("worker %s left with its Ray node %s", worker.name, worker.node)
            await self._host.remove_worker(worker)
        for key, (node_ip, node_cpus, units) in slots.items():
            if key not in self._workers:
                node_id, slot = key
                cpus = actor_cpus(self._spec.actor_cpus, node_cpus, units)
                worker = RayWorker(bridge, self._spec, self._data_dir, node_id, node_ip, slot, cpus)
                self._workers[key] = worker
                log.info("worker %s joined on Ray node %s", worker.name, node_ip)
                self._host.add_worker(worker)
        nodes = len({node for node, _ in slots})
        self.status = (
            f"Ray cluster at {self._address}: {len(slots)} {self._spec.gpu_resource} "
            f"on {nodes} node(s)"
        )

    async def _reconnect(self) -> RayBridge | None:
        """A fresh bridge, or None (and the status says why) when the cluster is not there or
        the last try was too recent."""
        now = time.monotonic()
        if now < self._next_connect_at:
            return None
        try:
            # Milliseconds when nothing listens there, where starting a bridge costs a process.
            await probe_address(self._address)
        except (OSError, TimeoutError) as exc:
            self._unreachable(exc)
            return None
        bridge = RayBridge(self._address, NAMESPACE, self._spec.log_level)
        self.bridges_started += 1
        try:
            # Bounded: `ray.init` against an address that does not answer retries for minutes.
            await bridge.start(CONNECT_TIMEOUT_S)
        except Exception as exc:
            self._connect_delay_s = min(
                max(self._connect_delay_s * 2, CONNECT_RETRY_FIRST_S), CONNECT_RETRY_MAX_S
            )
            self._next_connect_at = time.monotonic() + self._connect_delay_s
            self._unreachable(exc, f"; next try in {self._connect_delay_s:g} s")
            return None
        self._connect_delay_s = 0.0
        self._bridge = bridge
        return bridge

    def _answered(self) -> None:
        if self._down_since is not None:
            log.warning(
                "Ray cluster at %s answers again after %.0f s",
                self._address,
                time.monotonic() - self._down_since,
            )
            self._down_since = None
        elif self._failing_since is not None:
            log.warning(
                "Ray cluster at %s answers again after %d failed look(s) in %.0f s; "
                "nothing was lost",
                self._address,
                self._failed_looks,
                time.monotonic() - self._failing_since,
            )
        self._failed_looks = 0
        self._failing_since = None

    async def _look_failed(self, exc: BaseException) -> None:
        """A look through a live bridge failed: the workers and their jobs carry on (their
        calls go to the actors, not to the head) until looks have failed for the grace time."""
        now = time.monotonic()
        reason = _reason(exc)
        self._failed_looks += 1
        if self._failing_since is None:
            self._failing_since = now - (LOOK_TIMEOUT_S if isinstance(exc, TimeoutError) else 0)
            log.warning(
                "Ray cluster at %s did not answer a look (%s); jobs carry on, and the bot "
                "gives up on the connection if it does not answer for %g s",
                self._address,
                reason,
                self._grace_s,
            )
        failing_s = now - self._failing_since
        if self._failed_looks >= MIN_FAILED_LOOKS and failing_s >= self._grace_s:
            await self._give_up(exc)
            return
        self.status = (
            f"Ray cluster at {self._address} not answering for {failing_s:.0f} s "
            f"({self._failed_looks} failed look(s)): {reason}"
        )

    async def _give_up(self, exc: BaseException) -> None:
        """Throw the bridge away (Ray ends the actors of a driver that leaves); every worker
        goes, and their running jobs are re-queued."""
        assert self._host is not None
        self._failed_looks = 0
        self._failing_since = None
        self._unreachable(exc)
        # First, so the workers' calls fail at once instead of waiting on a dead cluster; a
        # fresh bridge next time, as Ray's driver does not survive a restarted head.
        bridge, self._bridge = self._bridge, None
        if bridge is not None:
            await bridge.discard()
        for key in list(self._workers):
            await self._host.remove_worker(self._workers.pop(key))

    def _unreachable(self, exc: BaseException, then: str = "") -> None:
        reason = _reason(exc)
        if self._down_since is None:
            self._down_since = time.monotonic()
            log.error(
                "Ray cluster at %s is unreachable (%s): jobs stay queued until it answers",
                self._address,
                reason,
            )
        since = time.strftime("%H:%M:%S", time.localtime(time.time()))
        self.status = f"Ray cluster at {self._address} unreachable (since {since}): {reason}{then}"

    async def stop_watching(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def disconnect(self) -> None:
        """After the scheduler closed the workers: leave the cluster."""
        self._workers.clear()
        bridge, self._bridge = self._bridge, None
        if bridge is not None:
            await bridge.close()


def _reason(exc: BaseException) -> str:
    return "no answer" if isinstance(exc, TimeoutError) else str(exc) or type(exc).__name__


async def probe_address(address: str, timeout_s: float = 2.0) -> None:
    """Raises OSError (or TimeoutError) unless the cluster's address takes a TCP connection."""
    target = host_port(address)
    if target is None:
        return
    host, port = target
    try:
        _reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout_s)
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise ConnectionError(f"{host}:{port}: {reason}") from None
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
