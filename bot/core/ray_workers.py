"""Workers on a Ray cluster (`[workers] backend = "ray"`): one long-lived actor per GPU.

The scheduler, the fair queue and the credits ledger stay in the bot process; Ray only places
and runs the GPU work. `RayPool` watches the cluster's nodes (`ray.nodes()`, off the event
loop) and keeps one `RayWorker` per unit of the GPU resource of every live node: a node that
joins gets workers, one that leaves loses them. Each `RayWorker` is an ordinary `Worker` to the
scheduler and owns one `EngineActor`, pinned to its node, which builds the engine once and
runs job after job.

Nothing crosses a shared filesystem: the bot reads a job's input files and sends their bytes
with the job, the actor sends the PNGs back as bytes, and the bot writes them into its own
data folder with the same code the local worker process uses (`execute.write_result`).

Failures keep their local meaning: an actor (or its node) that dies under a job is a
`WorkerCrashed` (re-queued at most `max_attempts` times), a timeout kills the actor, and an
unreachable cluster leaves every job queued, with one log line and a status for
`/admin workers`, until it answers again.

Ray is optional: nothing imports it until the Ray backend is asked for.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib.util
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol, TypeVar

from bot.config import Config
from bot.core.execute import (
    DEFAULT_ENGINE_FACTORY,
    JobError,
    RenderedJob,
    WorkItem,
    WorkOutcome,
    prepare_request,
    read_inputs,
    render_job,
    resolve_factory,
    safe_path,
    write_result,
)
from bot.core.workers import (
    JobTimeout,
    ProgressSink,
    Worker,
    WorkerCrashed,
    WorkerStartFailed,
    WorkerUnavailable,
)
from generation.contract import GenerationCancelled, Progress
from generation.settings import EngineSettings

log = logging.getLogger(__name__)

T = TypeVar("T")

NAMESPACE = "imagine-bot"
# Connecting, listing nodes, killing an actor: a cluster that does not answer in this long is
# treated as unreachable (the call may go on hanging in its daemon thread; nobody waits for it).
CALL_TIMEOUT_S = 30.0
# How long one progress call waits in the actor for the next step.
PROGRESS_POLL_S = 1.0
# Threads of an actor: the job, its progress poll, a cancel, and room for a describe.
ACTOR_CONCURRENCY = 8


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


async def in_daemon_thread(call: Callable[[], T], timeout_s: float) -> T:
    """Run a Ray call that may block, or hang against a cluster that went away, in a daemon
    thread: it never holds up the event loop, and a hung one never holds up the bot's exit
    (the default executor's threads are joined at exit)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def target() -> None:
        try:
            result = call()
        except BaseException as exc:
            outcome: tuple[T | None, BaseException | None] = (None, exc)
        else:
            outcome = (result, None)
        with contextlib.suppress(RuntimeError):  # the loop has closed
            loop.call_soon_threadsafe(settle, *outcome)

    threading.Thread(target=target, name="ray-call", daemon=True).start()
    return await asyncio.wait_for(future, timeout_s)


def _short(exc: BaseException) -> str:
    """One line about a Ray error (whose text may hold a whole remote traceback)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[-1] if lines else ''}"[:300]


# ----- the actor: runs in a Ray worker process on a GPU node ----------------------------------


class EngineActor:
    """Builds the engine once, then runs jobs one at a time. The actor has several threads
    (`max_concurrency`), so progress polls and cancels are answered while a job runs."""

    def __init__(self, factory: str, settings: EngineSettings, log_level: int) -> None:
        logging.basicConfig(level=log_level, format="%(asctime)s actor %(levelname)s %(message)s")
        self._engine = resolve_factory(factory)(settings)
        # Load the models now, so a job's timeout never includes loading them.
        warm_up = getattr(self._engine, "warm_up", None)
        if callable(warm_up):
            warm_up()
        self._changed = threading.Condition()
        self._current: int | None = None
        self._cancel = threading.Event()
        self._cancelled: set[int] = set()
        self._progress: dict[int, tuple[int, int]] = {}

    def describe(self) -> dict[str, str]:
        """Where this actor runs; answering at all means the engine is ready."""
        import ray

        gpus = ",".join(str(g) for g in ray.get_gpu_ids())
        return {
            "pid": str(os.getpid()),
            "node_ip": ray.util.get_node_ip_address(),
            "gpus": gpus,
        }

    def run(self, item: WorkItem, inputs: Mapping[str, bytes]) -> tuple[Any, ...]:
        """("done", RenderedJob), ("cancelled",) or ("error", kind, message)."""
        event = threading.Event()
        with self._changed:
            self._current = item.job_id
            self._cancel = event
            if item.job_id in self._cancelled:
                event.set()
        try:
            request = self._request(item, inputs)

            def progress(update: Progress) -> None:
                with self._changed:
                    self._progress[item.job_id] = (update.step, update.total)
                    self._changed.notify_all()

            return ("done", render_job(self._engine, item, request, progress, event))
        except GenerationCancelled:
            return ("cancelled",)
        except JobError as exc:
            return ("error", exc.kind, exc.message)
        except Exception as exc:
            logging.getLogger(__name__).exception("job %d failed", item.job_id)
            return ("error", "worker", f"the worker failed ({type(exc).__name__})")
        finally:
            with self._changed:
                self._current = None
                self._cancelled.discard(item.job_id)
                self._progress.pop(item.job_id, None)
                self._changed.notify_all()

    @staticmethod
    def _request(item: WorkItem, inputs: Mapping[str, bytes]) -> Any:
        # The inputs go to a scratch folder at their stored relative paths, so the one loader
        # that reads a job's pictures (execute.load_request) reads them here too.
        with tempfile.TemporaryDirectory(prefix="imagine-inputs-") as scratch:
            root = Path(scratch)
            for relative, data in inputs.items():
                path = safe_path(root, relative)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
            return prepare_request(root, item)

    def progress(self, job_id: int, after_step: int, wait_s: float) -> tuple[int, int] | None:
        """The job's latest (step, total) once it is past `after_step`, or whatever is known
        after `wait_s`; None while the job is not running here."""

        def moved() -> bool:
            return self._current != job_id or self._progress.get(job_id, (0, 0))[0] > after_step

        with self._changed:
            self._changed.wait_for(moved, wait_s)
            return self._progress.get(job_id)

    def cancel(self, job_id: int) -> None:
        with self._changed:
            self._cancelled.add(job_id)
            if self._current == job_id:
                self._cancel.set()


# ----- the bot's side of one actor ------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ActorSpec:
    """How the pool's actors are made (the same for every GPU)."""

    factory: str
    settings: EngineSettings
    gpu_resource: str
    startup_timeout_s: float
    log_level: int


class RayWorker:
    """One GPU unit of one node, as a `Worker` (capacity 1). The actor is created on start;
    after a crash or a timeout a new one is created in the background, on the same node."""

    def __init__(
        self,
        ray: ModuleType,
        actor_class: Any,
        spec: ActorSpec,
        data_dir: Path,
        node_id: str,
        node_ip: str,
        slot: int,
    ) -> None:
        self.name = f"ray-{node_id[:8]}-{slot}"
        self.capacity = 1
        self.node = node_ip
        self.device = f"{spec.gpu_resource} #{slot}"
        self.node_id = node_id
        self.slot = slot
        self.restarts = 0
        self.pid: int | None = None
        self._ray = ray
        self._actor_class = actor_class
        self._spec = spec
        self._data_dir = data_dir.resolve()
        self._actor: Any = None
        self._starting: asyncio.Task[Any] | None = None
        self._current: int | None = None
        self._closed = False

    @property
    def actor(self) -> Any:
        """The live actor's handle, None between actors."""
        return self._actor

    async def start(self) -> None:
        await self._ensure_actor()

    async def _ensure_actor(self) -> Any:
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

    async def _spawn(self) -> Any:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        spec = self._spec
        options: dict[str, Any] = {
            "num_cpus": 0,
            "max_concurrency": ACTOR_CONCURRENCY,
            "max_restarts": 0,
            # Pinned: this worker stands for a GPU of this node, and leaves with it.
            "scheduling_strategy": NodeAffinitySchedulingStrategy(self.node_id, soft=False),
        }
        if spec.gpu_resource == "GPU":
            options["num_gpus"] = 1  # Ray sets CUDA_VISIBLE_DEVICES in the actor
        else:
            options["resources"] = {spec.gpu_resource: 1}
        actor = self._actor_class.options(**options).remote(
            spec.factory, spec.settings, spec.log_level
        )
        try:
            info = await asyncio.wait_for(
                asyncio.wrap_future(actor.describe.remote().future()), spec.startup_timeout_s
            )
        except BaseException as exc:
            self._kill_later(actor)
            if isinstance(exc, asyncio.CancelledError):
                raise
            reason = (
                f"no answer in {spec.startup_timeout_s:g} s"
                if isinstance(exc, TimeoutError)
                else _short(exc)
            )
            raise WorkerStartFailed(f"worker {self.name}: engine did not start: {reason}") from exc
        if self._closed:
            self._kill_later(actor)
            raise WorkerStartFailed(f"worker {self.name} is closed")
        self.pid = int(info["pid"])
        self.node = info["node_ip"]
        if info["gpus"]:
            self.device = f"GPU {info['gpus']}"
        self._actor = actor
        log.info("worker %s: engine ready in actor pid %s on %s", self.name, self.pid, self.node)
        return actor

    def _restart_soon(self) -> None:
        """Load the models again while the queue is quiet, not when the next job arrives."""
        if self._closed or (self._starting is not None and not self._starting.done()):
            return
        self._starting = asyncio.create_task(self._spawn(), name=f"{self.name}-respawn")
        self._starting.add_done_callback(self._restarted)

    def _restarted(self, task: asyncio.Task[Any]) -> None:
        if task.cancelled():
            return
        if task.exception() is not None:
            # Left in `_starting`: the next job gets this error (WorkerUnavailable).
            log.error("worker %s: restart failed: %s", self.name, task.exception())
        elif self._starting is task:
            self._starting = None

    def _lost(self, actor: Any, kill: bool) -> None:
        if self._actor is actor:
            self._actor = None
        if kill:
            self._kill_later(actor)
        self.restarts += 1
        self._restart_soon()

    def _kill_later(self, actor: Any) -> None:
        async def kill() -> None:
            with contextlib.suppress(Exception):
                await in_daemon_thread(lambda: self._ray.kill(actor), CALL_TIMEOUT_S)

        task = asyncio.get_running_loop().create_task(kill())
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
        actor: Any,
        item: WorkItem,
        inputs: Mapping[str, bytes],
        on_progress: ProgressSink,
        timeout_s: float,
    ) -> tuple[Any, ...]:
        exceptions = self._ray.exceptions
        follower = asyncio.create_task(self._follow(actor, item.job_id, on_progress))
        try:
            reference = actor.run.remote(item, dict(inputs))
            reply: tuple[Any, ...] = await asyncio.wait_for(
                asyncio.wrap_future(reference.future()), timeout_s
            )
            return reply
        except TimeoutError:
            log.warning("worker %s: job %d timed out; killing its actor", self.name, item.job_id)
            self._lost(actor, kill=True)
            raise JobTimeout(timeout_s) from None
        except asyncio.CancelledError:
            # Hard abort (cancel grace expired, or shutdown): only a new actor is sure to
            # have a free GPU.
            self._lost(actor, kill=True)
            raise
        except exceptions.RayTaskError as exc:
            # `run` returns its errors; one that escapes it is a bug of the worker's.
            log.error("worker %s: job %d: %s", self.name, item.job_id, exc)
            raise JobError("the worker failed", "worker") from exc
        except (exceptions.RayError, ConnectionError) as exc:
            self._lost(actor, kill=False)
            raise WorkerCrashed(f"the Ray actor of worker {self.name} died: {_short(exc)}") from exc
        finally:
            follower.cancel()

    async def _follow(self, actor: Any, job_id: int, on_progress: ProgressSink) -> None:
        step = 0
        while True:
            try:
                update = await asyncio.wrap_future(
                    actor.progress.remote(job_id, step, PROGRESS_POLL_S).future()
                )
            except Exception:
                return  # the actor is gone: the job's own call says how
            if update is None:
                await asyncio.sleep(0.05)
                continue
            if update[0] > step:
                step = update[0]
                on_progress(update[0], update[1])

    async def cancel(self, job_id: int) -> None:
        actor = self._actor
        if actor is not None and self._current == job_id:
            with contextlib.suppress(Exception):
                actor.cancel.remote(job_id)

    async def close(self) -> None:
        self._closed = True
        if self._starting is not None:
            self._starting.cancel()
            with contextlib.suppress(BaseException):
                await self._starting
        actor, self._actor = self._actor, None
        if actor is not None:
            with contextlib.suppress(Exception):
                await in_daemon_thread(lambda: self._ray.kill(actor), CALL_TIMEOUT_S)


# ----- the pool: one worker per GPU of every live node ----------------------------------------


class RayPool:
    """Connects to the cluster and keeps the host's Ray workers in step with its GPU nodes."""

    def __init__(
        self,
        config: Config,
        engine_factory: str = DEFAULT_ENGINE_FACTORY,
        log_level: int | None = None,
    ) -> None:
        workers = config.workers
        self._address = workers.ray_address
        self._interval_s = workers.ray_watch_interval_s
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
        )
        self._ray = import_ray(self._address)
        self._actor_class: Any = self._ray.remote(EngineActor)
        self._host: WorkerHost | None = None
        self._workers: dict[tuple[str, int], RayWorker] = {}
        self._task: asyncio.Task[None] | None = None
        self._probe: asyncio.Future[dict[tuple[str, int], str]] | None = None
        self._owns_connection = False
        self._down_since: float | None = None
        self.status = f"connecting to the Ray cluster at {self._address}"

    @property
    def workers(self) -> list[RayWorker]:
        return list(self._workers.values())

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
        try:
            slots = await self._look()
        except Exception as exc:
            await self._unreachable(exc)
            return
        if self._down_since is not None:
            log.warning(
                "Ray cluster at %s answers again after %.0f s",
                self._address,
                time.monotonic() - self._down_since,
            )
            self._down_since = None
        for key in [k for k in self._workers if k not in slots]:
            worker = self._workers.pop(key)
            log.info("worker %s left with its Ray node %s", worker.name, worker.node)
            await self._host.remove_worker(worker)
        for key, node_ip in slots.items():
            if key not in self._workers:
                node_id, slot = key
                worker = RayWorker(
                    self._ray, self._actor_class, self._spec, self._data_dir, node_id, node_ip, slot
                )
                self._workers[key] = worker
                log.info("worker %s joined on Ray node %s", worker.name, node_ip)
                self._host.add_worker(worker)
        nodes = len({node for node, _ in slots})
        self.status = (
            f"Ray cluster at {self._address}: {len(slots)} {self._spec.gpu_resource} "
            f"on {nodes} node(s)"
        )

    async def _look(self) -> dict[tuple[str, int], str]:
        # One probe at a time: against a cluster that hangs, later looks wait for the same one
        # instead of piling up threads.
        if self._probe is None or self._probe.done():
            self._probe = asyncio.ensure_future(in_daemon_thread(self._gpu_slots, 1e9))
        return await asyncio.wait_for(asyncio.shield(self._probe), CALL_TIMEOUT_S)

    def _gpu_slots(self) -> dict[tuple[str, int], str]:
        """(node id, unit) -> node address for every unit of the GPU resource of live nodes.
        Blocking: runs in a daemon thread."""
        ray = self._ray
        if not ray.is_initialized():
            self._connect()
        resource = self._spec.gpu_resource
        slots: dict[tuple[str, int], str] = {}
        for node in ray.nodes():
            if not node.get("Alive"):
                continue
            units = int(node.get("Resources", {}).get(resource, 0))
            for slot in range(units):
                slots[(node["NodeID"], slot)] = str(node.get("NodeManagerAddress", "?"))
        return slots

    def _connect(self) -> None:
        ray = self._ray
        options: dict[str, Any] = {"namespace": NAMESPACE, "log_to_driver": True}
        if self._address == "local":
            ray.init(include_dashboard=False, **options)
        else:
            ray.init(address=self._address, **options)
        self._owns_connection = True
        log.info("connected to the Ray cluster at %s", self._address)

    async def _unreachable(self, exc: BaseException) -> None:
        assert self._host is not None
        reason = "no answer" if isinstance(exc, TimeoutError) else _short(exc)
        if self._down_since is None:
            self._down_since = time.monotonic()
            log.error(
                "Ray cluster at %s is unreachable (%s): jobs stay queued until it answers",
                self._address,
                reason,
            )
        since = time.strftime("%H:%M:%S", time.localtime(time.time()))
        self.status = f"Ray cluster at {self._address} unreachable (since {since}): {reason}"
        for key in list(self._workers):
            await self._host.remove_worker(self._workers.pop(key))
        if self._owns_connection and (self._probe is None or self._probe.done()):
            # A fresh connection next time (a dropped client connection stays "initialized").
            with contextlib.suppress(Exception):
                await in_daemon_thread(self._ray.shutdown, CALL_TIMEOUT_S)

    async def stop_watching(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def disconnect(self) -> None:
        """After the scheduler closed the workers: leave the cluster if we joined it."""
        self._workers.clear()
        if self._owns_connection:
            self._owns_connection = False
            with contextlib.suppress(Exception):
                await in_daemon_thread(self._ray.shutdown, CALL_TIMEOUT_S)
