"""Workers run jobs off the event loop. The scheduler only knows the `Worker` protocol, so a

Long (about 580 lines): the `Worker` protocol with its two kinds and the child process's side
of the pipe, which change together whenever a message between them does.
remote GPU worker can be added later without touching scheduling.

`ProcessWorker` (the default) owns one child process that builds the engine once and serves
job after job. Unlike a thread it can be killed: a hang past the timeout, a segfault or an
out-of-memory kill costs that one job (which the scheduler fails and refunds, or re-queues) and
a fresh child is started for the next. The child writes the result PNGs itself, so only small
metadata crosses the pipe, and a reader thread in the parent turns pipe messages into
event-loop callbacks, so the loop never blocks on the engine.

`InProcessWorker` runs the engine in a thread of this process: handy for tests and benchmarks,
but a hung engine cannot be killed there (the thread is abandoned).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import queue
import signal
import socket
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from bot.core.execute import (
    DEFAULT_ENGINE_FACTORY,
    EngineFactory,
    JobError,
    WorkItem,
    WorkOutcome,
    resolve_factory,
    run_job,
)
from bot.core.worker_env import start_with_minimal_environment
from generation.contract import Engine, GenerationCancelled, Progress
from generation.settings import EngineSettings

log = logging.getLogger(__name__)


class ProgressSink(Protocol):
    """Where a worker reports a job's steps: `(step, total)`, plus the preview image's PNG bytes
    when the engine made one (only then is the third argument passed)."""

    def __call__(self, step: int, total: int, preview_png: bytes | None = ..., /) -> None: ...


class WorkerCrashed(Exception):
    """The worker died under the job (segfault, OOM kill, lost connection); not the job's
    fault as far as we know, so the scheduler may re-queue it."""


class JobTimeout(Exception):
    def __init__(self, timeout_s: float) -> None:
        super().__init__(f"timed out after {timeout_s:g} s")
        self.timeout_s = timeout_s


class WorkerStartFailed(Exception):
    """The worker could not get ready: its process could not be started, its engine could not
    be created (bad model config, missing files, no GPU memory), or it did not report ready
    within the start-up timeout. Never the fault of a job that was waiting for it."""


class WorkerUnavailable(Exception):
    """The worker could not take the job at all (its engine could not be started, e.g. the GPU
    memory of a killed child was not free yet): not the job's fault, so it goes back to the
    queue without losing an attempt, and the worker is started again in the background."""


@runtime_checkable
class Worker(Protocol):
    name: str
    # Jobs it can run at once; the scheduler never gives it more.
    capacity: int

    async def start(self) -> None:
        """Get ready to run jobs (load models); raises WorkerStartFailed."""
        ...

    async def run(self, item: WorkItem, on_progress: ProgressSink, timeout_s: float) -> WorkOutcome:
        """Run one job. Raises GenerationCancelled (after `cancel`), JobTimeout (the worker has
        already killed/reset whatever ran it), JobError (engine failure: fail the job),
        WorkerCrashed, WorkerUnavailable (never started the job). Cancelling this coroutine
        must abort the job hard."""
        ...

    async def cancel(self, job_id: int) -> None:
        """Ask the running job to stop at its next step (cooperative)."""
        ...

    async def close(self) -> None: ...


class InProcessWorker:
    def __init__(
        self,
        settings: EngineSettings,
        data_dir: Path,
        engine_factory: str | EngineFactory = DEFAULT_ENGINE_FACTORY,
        capacity: int = 1,
        name: str = "in-process",
    ) -> None:
        self.name = name
        self.capacity = capacity
        # Where it runs, for /admin workers: this machine, whatever device the engine picks.
        self.node = socket.gethostname()
        self.device = ""
        self._settings = settings
        self._data_dir = data_dir
        self._factory = engine_factory
        self._engine: Engine | None = None
        self._executor = ThreadPoolExecutor(capacity, thread_name_prefix=name)
        self._cancels: dict[int, threading.Event] = {}

    async def start(self) -> None:
        if self._engine is not None:
            return
        loop = asyncio.get_running_loop()
        factory = resolve_factory(self._factory)
        try:
            self._engine = await loop.run_in_executor(self._executor, factory, self._settings)
        except Exception as exc:
            raise WorkerStartFailed(f"{type(exc).__name__}: {exc}") from exc

    async def run(self, item: WorkItem, on_progress: ProgressSink, timeout_s: float) -> WorkOutcome:
        try:
            await self.start()
        except WorkerStartFailed as exc:
            raise WorkerUnavailable(str(exc)) from exc
        assert self._engine is not None
        loop = asyncio.get_running_loop()
        cancel = threading.Event()
        self._cancels[item.job_id] = cancel

        def progress(update: Progress) -> None:
            arguments: tuple[Any, ...] = (update.step, update.total)
            if update.preview_png is not None:
                arguments += (update.preview_png,)
            with contextlib.suppress(RuntimeError):  # loop already closed at shutdown
                loop.call_soon_threadsafe(on_progress, *arguments)

        future = loop.run_in_executor(
            self._executor, run_job, self._engine, item, self._data_dir, progress, cancel
        )
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout_s)
        except TimeoutError:
            cancel.set()
            self._abandon_if_stuck(future)
            raise JobTimeout(timeout_s) from None
        except asyncio.CancelledError:
            cancel.set()
            self._abandon_if_stuck(future)
            raise
        finally:
            self._cancels.pop(item.job_id, None)

    def _abandon_if_stuck(self, future: asyncio.Future[Any]) -> None:
        # A thread cannot be killed; if the engine ignores the cancel event the thread stays
        # busy, so later jobs get a fresh executor instead of queueing behind it.
        if not future.done():
            old = self._executor
            self._executor = ThreadPoolExecutor(self.capacity, thread_name_prefix=self.name)
            old.shutdown(wait=False, cancel_futures=True)
        future.add_done_callback(lambda f: f.cancelled() or f.exception())

    async def cancel(self, job_id: int) -> None:
        event = self._cancels.get(job_id)
        if event is not None:
            event.set()

    async def close(self) -> None:
        for event in self._cancels.values():
            event.set()
        self._executor.shutdown(wait=False, cancel_futures=True)


class ProcessWorker:
    """One child process running the engine; capacity 1."""

    def __init__(
        self,
        settings: EngineSettings,
        data_dir: Path,
        engine_factory: str = DEFAULT_ENGINE_FACTORY,
        name: str = "local",
        startup_timeout_s: float = 600.0,
        log_level: int | None = None,
        environment: Mapping[str, str] | None = None,
    ) -> None:
        """`environment` is set in the child before the engine (and torch) is imported, e.g.
        `{"CUDA_VISIBLE_DEVICES": "1"}` to pin the worker to one GPU."""
        if not isinstance(engine_factory, str):
            raise ValueError("engine_factory: a ProcessWorker needs a 'module:function' string")
        self.name = name
        self.capacity = 1
        self._settings = settings
        self._data_dir = data_dir.resolve()
        self._factory = engine_factory
        self._startup_timeout_s = startup_timeout_s
        self._log_level = log_level if log_level is not None else logging.getLogger().level
        self.environment = dict(environment or {})
        self.node = socket.gethostname()
        pinned = self.environment.get("CUDA_VISIBLE_DEVICES")
        self.device = f"cuda:{pinned}" if pinned else ""
        self._child: _Child | None = None
        self._starting: asyncio.Task[_Child] | None = None
        self._current: int | None = None
        self._closed = False
        self.restarts = 0

    @property
    def pid(self) -> int | None:
        return self._child.process.pid if self._child else None

    async def start(self) -> None:
        await self._ensure_child()

    async def _ensure_child(self) -> _Child:
        if self._closed:
            raise WorkerStartFailed(f"worker {self.name} is closed")
        if self._child is not None:
            if self._child.process.is_alive():
                return self._child
            await self._discard()
        if self._starting is None:
            self._starting = asyncio.create_task(self._spawn(), name=f"{self.name}-spawn")
        task = self._starting
        try:
            child = await asyncio.shield(task)
        finally:
            if task.done() and self._starting is task:
                self._starting = None
        self._child = child
        return child

    def _restart_soon(self, killed: _Child | None = None) -> bool:
        """Load the models again while the queue is quiet, not when the next job arrives (a
        `killed` child is reaped first). False when no restart was started."""
        if self._closed or (self._starting is not None and not self._starting.done()):
            return False
        self._starting = asyncio.create_task(self._spawn(killed), name=f"{self.name}-respawn")
        self._starting.add_done_callback(self._restarted)
        return True

    def _restarted(self, task: asyncio.Task[_Child]) -> None:
        if task.cancelled():
            return
        if task.exception() is not None:
            # Left in `_starting`: the next job (or start()) gets this error, then spawns anew.
            log.error("worker %s: restart failed: %s", self.name, task.exception())
        elif self._starting is task and self._child is None and not self._closed:
            self._child = task.result()
            self._starting = None

    async def _spawn(self, killed: _Child | None = None) -> _Child:
        if killed is not None:
            # Until the killed child is gone its GPU memory is not free: a new engine loaded
            # before that could run out of memory.
            await killed.reap()
        loop = asyncio.get_running_loop()
        context = multiprocessing.get_context("spawn")
        parent_conn, child_conn = context.Pipe(duplex=True)
        process = context.Process(
            target=child_main,
            args=(
                child_conn,
                self._factory,
                self._settings,
                str(self._data_dir),
                self._log_level,
                self.environment,
            ),
            name=f"imagine-bot-worker-{self.name}",
            daemon=True,
        )
        try:
            # Started with only what the engine needs: no DISCORD_TOKEN, nothing else of ours.
            await asyncio.to_thread(start_with_minimal_environment, process.start)
        except Exception as exc:
            # No process (fork refused, arguments that cannot be sent): a start failure like
            # any other, so the scheduler keeps the jobs and retries the worker.
            parent_conn.close()
            child_conn.close()
            raise WorkerStartFailed(
                f"worker {self.name}: could not start its process: {type(exc).__name__}: {exc}"
            ) from exc
        # Our copy of the child's end must go, or we would never see EOF when the child dies.
        child_conn.close()
        child = _Child(process, parent_conn, loop, self._exited)
        try:
            message = await asyncio.wait_for(child.inbox.get(), self._startup_timeout_s)
        except BaseException as exc:
            child.kill()
            await child.reap()
            if isinstance(exc, TimeoutError):
                raise WorkerStartFailed(
                    f"worker {self.name}: engine did not start within {self._startup_timeout_s:g} s"
                ) from None
            raise
        if message[0] == "ready":
            log.info("worker %s: engine ready in child pid %d", self.name, process.pid)
            return child
        child.kill()
        code = await child.reap()
        detail = message[1] if message[0] == "fatal" else f"child exited with code {code}"
        raise WorkerStartFailed(f"worker {self.name}: engine did not start: {detail}")

    def _exited(self, child: _Child) -> None:
        """The child's pipe closed. During a job the job's own loop handles it; a child that
        dies while idle is replaced at once, not when the next job finds it dead."""
        if child is not self._child or self._current is not None or self._closed:
            return
        log.warning(
            "worker %s: idle child pid %s died (exit code %s); restarting it",
            self.name,
            child.process.pid,
            child.process.exitcode,
        )
        self._child = None
        self.restarts += 1
        if not self._restart_soon(killed=child):
            self._reap_later(child)

    async def _discard(self) -> int | None:
        child, self._child = self._child, None
        if child is None:
            return None
        child.kill()
        return await child.reap()

    async def run(self, item: WorkItem, on_progress: ProgressSink, timeout_s: float) -> WorkOutcome:
        if self._current is not None:
            raise RuntimeError(f"worker {self.name} is busy with job {self._current}")
        self._current = item.job_id
        try:
            try:
                child = await self._ensure_child()
            except WorkerStartFailed as exc:
                raise WorkerUnavailable(str(exc)) from exc
            return await self._run_on(child, item, on_progress, timeout_s)
        finally:
            self._current = None

    async def _run_on(
        self, child: _Child, item: WorkItem, on_progress: ProgressSink, timeout_s: float
    ) -> WorkOutcome:
        loop = asyncio.get_running_loop()
        try:
            child.send(("job", item))
        except OSError as exc:
            await self._crashed()
            raise WorkerCrashed(f"worker {self.name}: could not send the job: {exc}") from exc
        deadline = loop.time() + timeout_s
        try:
            while True:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise TimeoutError
                message = await asyncio.wait_for(child.inbox.get(), remaining)
                tag = message[0]
                if tag == "eof":
                    code = await self._crashed()
                    raise WorkerCrashed(f"the worker process died (exit code {code})")
                if message[1] != item.job_id:
                    continue  # a late message about an earlier job
                if tag == "progress" and len(message) > 4 and message[4] is not None:
                    on_progress(message[2], message[3], message[4])
                elif tag == "progress":
                    on_progress(message[2], message[3])
                elif tag == "done":
                    return message[2]
                elif tag == "cancelled":
                    raise GenerationCancelled()
                elif tag == "error":
                    raise JobError(message[3], message[2])
        except TimeoutError:
            log.warning(
                "worker %s: job %d timed out; killing pid %s",
                self.name,
                item.job_id,
                child.process.pid,
            )
            await self._crashed()
            raise JobTimeout(timeout_s) from None
        except asyncio.CancelledError:
            # Hard abort (cancel grace expired, or shutdown): the child may be mid-step, and
            # only killing it frees the GPU for certain.
            child.kill()
            self._child = None
            if not self._restart_soon(killed=child):
                self._reap_later(child)
            raise

    async def _crashed(self) -> int | None:
        code = await self._discard()
        self.restarts += 1
        self._restart_soon()
        return code

    def _reap_later(self, child: _Child) -> None:
        task = asyncio.get_running_loop().create_task(child.reap())
        task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def cancel(self, job_id: int) -> None:
        child = self._child
        if child is not None and self._current == job_id:
            with contextlib.suppress(OSError):
                child.send(("cancel", job_id))

    async def close(self) -> None:
        self._closed = True
        if self._starting is not None:
            self._starting.cancel()
            with contextlib.suppress(BaseException):
                started = await self._starting
                started.kill()
                await started.reap()
        child, self._child = self._child, None
        if child is None:
            return
        with contextlib.suppress(OSError):
            child.send(("shutdown",))
        code = await child.reap(timeout_s=5.0)
        if code is None:
            child.kill()
            await child.reap()


class _Child:
    """The parent's side of one child process: its pipe, and the thread that reads it."""

    def __init__(
        self,
        process: multiprocessing.process.BaseProcess,
        conn: Connection,
        loop: asyncio.AbstractEventLoop,
        on_exit: Callable[[_Child], None] | None = None,
    ) -> None:
        self.process = process
        self.conn = conn
        self.inbox: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
        self._loop = loop
        self._on_exit = on_exit
        self._send_lock = threading.Lock()
        self._reader = threading.Thread(
            target=self._read, name=f"worker-reader-{process.pid}", daemon=True
        )
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):
                break
            except Exception:
                log.exception("worker pid %s: unreadable message", self.process.pid)
                break
            self._post(message)
        self._post(("eof",))
        if self._on_exit is not None:
            with contextlib.suppress(RuntimeError):  # the loop has closed
                self._loop.call_soon_threadsafe(self._on_exit, self)

    def _post(self, message: tuple[Any, ...]) -> None:
        with contextlib.suppress(RuntimeError):  # the loop has closed
            self._loop.call_soon_threadsafe(self.inbox.put_nowait, message)

    def send(self, message: tuple[Any, ...]) -> None:
        with self._send_lock:
            self.conn.send(message)

    def kill(self) -> None:
        if self.process.is_alive():
            with contextlib.suppress(OSError):
                self.process.kill()

    async def reap(self, timeout_s: float = 30.0) -> int | None:
        """Wait for the process to end (off the loop) and release its pipe."""
        await asyncio.to_thread(self.process.join, timeout_s)
        code = self.process.exitcode
        if code is not None:
            await asyncio.to_thread(self._reader.join, 5.0)
            with contextlib.suppress(OSError):
                self.conn.close()
        return code


# ----- the child process ----------------------------------------------------------------------


def child_main(
    conn: Connection,
    factory: str,
    settings: EngineSettings,
    data_dir: str,
    log_level: int = logging.INFO,
    environment: Mapping[str, str] | None = None,
) -> None:
    """Entry point of the worker process: build the engine once, then serve jobs until told to
    stop or until the parent goes away."""
    # First: CUDA reads CUDA_VISIBLE_DEVICES once, when torch initialises it.
    os.environ.update(environment or {})
    logging.basicConfig(level=log_level, format="%(asctime)s worker %(levelname)s %(message)s")
    # Ctrl-C reaches the whole process group; shutting down is the parent's decision.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        engine = resolve_factory(factory)(settings)
        # Load the models now, so a job's timeout never includes loading them.
        warm_up = getattr(engine, "warm_up", None)
        if callable(warm_up):
            warm_up()
    except BaseException as exc:
        with contextlib.suppress(OSError):
            conn.send(("fatal", f"{type(exc).__name__}: {exc}"))
        return

    jobs: queue.SimpleQueue[WorkItem | None] = queue.SimpleQueue()
    lock = threading.Lock()
    cancelled: set[int] = set()
    current: dict[str, Any] = {"job_id": None, "event": threading.Event()}

    def reader() -> None:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                # The parent is gone (even SIGKILLed): nobody is waiting for our results.
                os._exit(0)
            if message[0] == "job":
                jobs.put(message[1])
            elif message[0] == "cancel":
                with lock:
                    cancelled.add(message[1])
                    if current["job_id"] == message[1]:
                        current["event"].set()
            elif message[0] == "shutdown":
                jobs.put(None)

    threading.Thread(target=reader, name="parent-reader", daemon=True).start()
    conn.send(("ready", os.getpid()))
    root = Path(data_dir)
    while (item := jobs.get()) is not None:
        event = threading.Event()
        with lock:
            current.update(job_id=item.job_id, event=event)
            if item.job_id in cancelled:
                event.set()

        def progress(update: Progress, job_id: int = item.job_id) -> None:
            conn.send(("progress", job_id, update.step, update.total, update.preview_png))

        try:
            outcome = run_job(engine, item, root, progress, event)
            reply: tuple[Any, ...] = ("done", item.job_id, outcome)
        except GenerationCancelled:
            reply = ("cancelled", item.job_id)
        except JobError as exc:
            reply = ("error", item.job_id, exc.kind, exc.message)
        except Exception as exc:
            logging.getLogger(__name__).exception("job %d failed", item.job_id)
            reply = ("error", item.job_id, "worker", f"the worker failed ({type(exc).__name__})")
        with lock:
            current.update(job_id=None)
            cancelled.discard(item.job_id)
        conn.send(reply)
