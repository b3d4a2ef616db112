"""The Ray driver in a process of its own (`RayBridge`), so the bot outlives its cluster.

Ray's driver (what `ray.init` connects) runs in C++ inside the process that calls it, and it
does not survive its cluster going away: after 60 s without the head's GCS it ends the whole
process, and once a head is restarted on the same address the next call fails a fatal check
("WrongClusterID"), again ending the process. Both would take the bot down with its cluster.
So the bot never calls Ray itself: a child process holds the connection and the actor handles,
and the bot sends it calls over a pipe. When the cluster stops answering the bridge is thrown
away (Ray ends the actors of a driver that leaves), and a fresh one connects when the cluster
answers again.

The bridge runs an asyncio loop: a call to an actor is an awaited `ObjectRef` with its deadline
(the timeout is Ray's side of the call), and a job is one streaming call whose items (its
progress and previews, then its answer) are sent on to the bot as they come; blocking Ray calls
(looks at the nodes, creating and killing actors) run in a small pool of threads. The bot keeps
its own deadline on every call too (a little longer), so a cluster that hangs (an address where
nothing answers, where `ray.init` retries for minutes) costs a timeout, never a stuck bot; a
hung call stays behind in the child, which is killed with the bridge.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import multiprocessing
import os
import queue
import signal
import socket
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from typing import Any

log = logging.getLogger(__name__)

# A GCS that does not take a TCP connection in this long is down; checked before each look at
# the nodes, because a Ray call against a dead GCS hangs instead of failing.
GCS_PROBE_TIMEOUT_S = 2.0
# The bot waits this much longer than a call's own deadline, which the bridge keeps: a late
# "timeout" from the bridge is the usual way a call ends past its time.
BOT_MARGIN_S = 5.0
# Threads for the Ray calls that block (looks at the nodes, creating and killing actors); one
# that hangs (a frozen head) holds its thread until it answers.
BLOCKING_THREADS = 16


class BridgeError(Exception):
    """A call failed in the bridge. `kind`: "actor" (the actor or its node died, or is
    unknown), "task" (the actor's method raised) or "cluster" (anything else). A call past its
    deadline raises TimeoutError instead."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


class BridgeLost(ConnectionError):
    """The bridge process is gone (it died, or was discarded): no call reaches the cluster."""


def short_error(exc: BaseException) -> str:
    """One line about a Ray error (whose text may hold a whole remote traceback)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[-1] if lines else ''}"[:300]


class RayBridge:
    """The bot's side of one bridge process: start it (it connects), call it, close it."""

    def __init__(self, address: str, namespace: str, log_level: int) -> None:
        self.address = address
        self._namespace = namespace
        self._log_level = log_level
        self._process: multiprocessing.process.BaseProcess | None = None
        self._conn: Connection | None = None
        self._send_lock = threading.Lock()
        self._pending: dict[int, asyncio.Future[Any]] = {}
        # Streaming calls: where each of their items goes, as it comes.
        self._streams: dict[int, Callable[[Any], None]] = {}
        self._ids = itertools.count(1)
        self._lost = False
        # What crossed the pipe: calls sent, and messages (answers and stream items) received.
        self.calls_sent = 0
        self.messages_received = 0

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    async def start(self, timeout_s: float) -> None:
        """Start the process and connect it to the cluster; raises (and leaves nothing
        running) when the cluster does not answer within `timeout_s`."""
        loop = asyncio.get_running_loop()
        context = multiprocessing.get_context("spawn")
        parent_conn, child_conn = context.Pipe(duplex=True)
        process = context.Process(
            target=bridge_main,
            args=(child_conn, self._namespace, self._log_level),
            name="imagine-bot-ray-bridge",
            daemon=True,
        )
        await asyncio.to_thread(process.start)
        # Our copy of the child's end must go, or we would never see EOF when the child dies.
        child_conn.close()
        self._process, self._conn = process, parent_conn
        reader = threading.Thread(
            target=self._read, args=(parent_conn, loop), name="ray-bridge-reader", daemon=True
        )
        reader.start()
        try:
            await self.call("connect", self.address, timeout_s=timeout_s)
        except BaseException:
            await self.discard()
            raise

    async def call(self, op: str, *args: Any, timeout_s: float) -> Any:
        """Run `op` in the bridge, which gives it `timeout_s`. Raises BridgeError, BridgeLost
        or TimeoutError (the call may go on in the bridge; its late answer is dropped)."""
        return await self._request(op, args, timeout_s, None)

    async def stream(
        self, op: str, *args: Any, on_item: Callable[[Any], None], timeout_s: float
    ) -> None:
        """Run a streaming `op` in the bridge: `on_item` gets each of its items, on the event
        loop, as they come; returns when the stream ends. Raises like `call`."""
        await self._request(op, args, timeout_s, on_item)

    async def _request(
        self,
        op: str,
        args: tuple[Any, ...],
        timeout_s: float,
        on_item: Callable[[Any], None] | None,
    ) -> Any:
        if self._lost or self._conn is None:
            raise BridgeLost("the Ray bridge process is gone")
        call_id = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[call_id] = future
        if on_item is not None:
            self._streams[call_id] = on_item
        try:
            try:
                with self._send_lock:
                    self._conn.send(("call", call_id, op, args, timeout_s))
            except (OSError, ValueError) as exc:
                raise BridgeLost(f"the Ray bridge process is gone ({exc})") from exc
            self.calls_sent += 1
            return await asyncio.wait_for(future, timeout_s + BOT_MARGIN_S)
        finally:
            self._pending.pop(call_id, None)
            self._streams.pop(call_id, None)

    def _read(self, conn: Connection, loop: asyncio.AbstractEventLoop) -> None:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                break
            except Exception:
                log.exception("Ray bridge: unreadable message")
                break
            with contextlib.suppress(RuntimeError):  # the loop has closed
                loop.call_soon_threadsafe(self._settle, message)
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._gone)

    def _settle(self, message: tuple[Any, ...]) -> None:
        self.messages_received += 1
        if message[0] == "item":
            on_item = self._streams.get(message[1])
            if on_item is not None:
                on_item(message[2])
            return
        future = self._pending.get(message[1])
        if future is None or future.done():
            return  # an answer nobody waits for any more
        if message[0] == "ok":
            future.set_result(message[2])
        elif message[2] == "timeout":
            future.set_exception(TimeoutError(message[3]))
        else:
            future.set_exception(BridgeError(message[2], message[3]))

    def _gone(self) -> None:
        self._lost = True
        for future in self._pending.values():
            if not future.done():
                future.set_exception(BridgeLost("the Ray bridge process ended"))
        self._pending.clear()

    async def discard(self) -> None:
        """End the bridge at once (its cluster went away, or never answered)."""
        self._lost = True
        process = self._process
        if process is not None and process.is_alive():
            with contextlib.suppress(OSError):
                process.kill()
        await self._reap(10.0)

    async def close(self, timeout_s: float = 15.0) -> None:
        """Leave the cluster cleanly (a cluster the bridge started itself stops with it)."""
        if self._conn is not None and not self._lost:
            with contextlib.suppress(OSError, ValueError), self._send_lock:
                self._conn.send(("shutdown",))
        self._lost = True
        if await self._reap(timeout_s) is None:
            await self.discard()

    async def _reap(self, timeout_s: float) -> int | None:
        process = self._process
        if process is None:
            return 0
        await asyncio.to_thread(process.join, timeout_s)
        code = process.exitcode
        if code is not None and self._conn is not None:
            with contextlib.suppress(OSError):
                self._conn.close()
        return code


# ----- the bridge process ---------------------------------------------------------------------


def bridge_main(conn: Connection, namespace: str, log_level: int) -> None:
    """Entry point of the bridge process: answer calls on an asyncio loop until told to stop
    or the bot is gone."""
    logging.basicConfig(level=log_level, format="%(asctime)s ray-bridge %(levelname)s %(message)s")
    # Ctrl-C reaches the whole process group; leaving the cluster is the bot's decision.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    asyncio.run(_Bridge(conn, namespace).serve())


class _Bridge:
    """The bridge process's loop: one reader thread hands it the bot's messages, one writer
    thread sends its answers (a job's answer may be megabytes of PNGs), and every call is a
    task on the loop."""

    def __init__(self, conn: Connection, namespace: str) -> None:
        self._conn = conn
        self._calls = _Calls(namespace)
        self._outbox: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
        self._tasks: set[asyncio.Task[None]] = set()

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue[tuple[Any, ...] | None] = asyncio.Queue()

        def read() -> None:
            while True:
                try:
                    message: tuple[Any, ...] | None = self._conn.recv()
                except (EOFError, OSError):
                    message = None  # the bot is gone (even SIGKILLed)
                loop.call_soon_threadsafe(inbox.put_nowait, message)
                if message is None or message[0] == "shutdown":
                    return

        threading.Thread(target=read, name="bridge-reader", daemon=True).start()
        threading.Thread(target=self._write, name="bridge-writer", daemon=True).start()
        while True:
            message = await inbox.get()
            if message is None:
                os._exit(0)  # nobody is waiting for our answers
            if message[0] == "shutdown":
                self._calls.shutdown()
                os._exit(0)
            _tag, call_id, op, args, timeout_s = message
            if op == "connect":
                # Here, on the main thread, where Ray sets its signal handlers; nothing else
                # runs yet, and the bot keeps the deadline.
                connected: asyncio.Future[None] = loop.create_future()
                try:
                    self._calls.connect(*args)
                    connected.set_result(None)
                except BaseException as exc:
                    connected.set_exception(exc)
                await self._answer(call_id, connected, timeout_s)
                continue
            task = asyncio.create_task(self._answer(call_id, self._calls.run(op, args), timeout_s))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _write(self) -> None:
        while True:
            message = self._outbox.get()
            if message is None:
                return
            with contextlib.suppress(OSError, ValueError):
                self._conn.send(message)

    async def _answer(self, call_id: int, work: Awaitable[Any] | Any, timeout_s: float) -> None:
        def item(value: Any) -> None:
            self._outbox.put(("item", call_id, value))

        try:
            if isinstance(work, _Stream):
                async with asyncio.timeout(timeout_s):
                    await work.forward(item)
                reply: tuple[Any, ...] = ("ok", call_id, None)
            elif asyncio.iscoroutine(work) or isinstance(work, asyncio.Future):
                reply = ("ok", call_id, await asyncio.wait_for(work, timeout_s))
            else:
                reply = ("ok", call_id, work)
        except TimeoutError:
            reply = ("error", call_id, "timeout", f"no answer in {timeout_s:g} s")
        except BaseException as exc:
            reply = ("error", call_id, self._calls.kind_of(exc), short_error(exc))
        self._outbox.put(reply)


def host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of an explicit cluster address ("host:6379" or "ray://host:10001"); None
    for "auto" and "local", which name no port."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def _probe(address: tuple[str, int]) -> None:
    """Raises ConnectionError naming the address unless it takes a TCP connection."""
    try:
        with socket.create_connection(address, timeout=GCS_PROBE_TIMEOUT_S):
            pass
    except OSError as exc:
        raise ConnectionError(f"{address[0]}:{address[1]}: {exc.strerror or exc}") from None


@dataclasses.dataclass(frozen=True)
class _Stream:
    """A streaming actor call: its items go to the bot as they come."""

    generator: Any  # ray.ObjectRefGenerator

    async def forward(self, send: Callable[[Any], None]) -> None:
        async for ref in self.generator:
            send(await ref)


class _Calls:
    """What the bridge can do, on the Ray driver of this process. Each op returns its answer,
    a coroutine (awaited with the call's deadline) or a `_Stream`."""

    def __init__(self, namespace: str) -> None:
        import ray

        self._ray = ray
        self._namespace = namespace
        self._actors: dict[str, Any] = {}
        self._actor_class: Any = None
        self._gcs: tuple[str, int] | None = None
        self._blocking = ThreadPoolExecutor(BLOCKING_THREADS, thread_name_prefix="ray-call")
        self._ops: dict[str, Callable[..., Any]] = {
            "slots": self._in_thread(self.slots),
            "node_alive": self._in_thread(self.node_alive),
            "create": self._in_thread(self.create),
            "kill": self._in_thread(self.kill),
            "held": self.held,
            "method": self.method,
            "stream": self.stream,
        }

    def _in_thread(self, function: Callable[..., Any]) -> Callable[..., Awaitable[Any]]:
        def run(*args: Any) -> Awaitable[Any]:
            return asyncio.get_running_loop().run_in_executor(self._blocking, function, *args)

        return run

    def run(self, op: str, args: tuple[Any, ...]) -> Any:
        try:
            return self._ops[op](*args)
        except BaseException as exc:
            # Failed before anything ran (an unknown actor, a refused submission): answered
            # like a failed call.
            future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            future.set_exception(exc)
            return future

    def kind_of(self, exc: BaseException) -> str:
        exceptions = self._ray.exceptions
        if isinstance(exc, exceptions.GetTimeoutError):
            return "timeout"
        if isinstance(exc, exceptions.RayTaskError):
            return "task"
        if isinstance(exc, exceptions.RayActorError | KeyError):
            return "actor"
        return "cluster"

    def connect(self, address: str) -> None:
        from bot.core.ray_actor import EngineActor

        target = host_port(address)
        if target is not None:
            # Fails in milliseconds when nothing listens there, where ray.init retries for
            # minutes.
            _probe(target)
        options: dict[str, Any] = {"namespace": self._namespace, "log_to_driver": True}
        if address == "local":
            self._ray.init(include_dashboard=False, **options)
        else:
            self._ray.init(address=address, **options)
        host, _, port = self._ray.get_runtime_context().gcs_address.rpartition(":")
        self._gcs = (host, int(port))
        self._actor_class = self._ray.remote(EngineActor)
        logging.getLogger(__name__).info("connected to the Ray cluster at %s", address)

    def slots(self, resource: str) -> dict[tuple[str, int], tuple[str, float, int]]:
        """(node id, unit) -> (node address, the node's CPUs, its units of `resource`) for
        every unit of `resource` on live nodes."""
        if self._gcs is not None:
            # Fails in milliseconds when the head is down, where ray.nodes() would hang.
            _probe(self._gcs)
        slots: dict[tuple[str, int], tuple[str, float, int]] = {}
        for node in self._ray.nodes():
            if not node.get("Alive"):
                continue
            resources = node.get("Resources", {})
            units = int(resources.get(resource, 0))
            address = str(node.get("NodeManagerAddress", "?"))
            for unit in range(units):
                slots[(node["NodeID"], unit)] = (address, float(resources.get("CPU", 0)), units)
        return slots

    def node_alive(self, node_id: str) -> bool:
        if self._gcs is not None:
            _probe(self._gcs)
        return any(n["NodeID"] == node_id and n.get("Alive") for n in self._ray.nodes())

    def create(self, key: str, node_id: str, options: dict[str, Any], *args: Any) -> None:
        """An actor pinned to `node_id` (it stands for a GPU of that node, and leaves with
        it), named `key` in the namespace so an operator can find it (`ray list actors`)."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        strategy = NodeAffinitySchedulingStrategy(node_id, soft=False)
        handle = self._actor_class.options(
            name=key, scheduling_strategy=strategy, **options
        ).remote(*args)
        self._actors[key] = handle

    def method(self, key: str, name: str, args: tuple[Any, ...]) -> Any:
        """An actor's method, awaited (an `ObjectRef` is awaitable)."""
        handle = self._actors[key]

        async def call() -> Any:
            return await getattr(handle, name).remote(*args)

        return call()

    def stream(self, key: str, name: str, args: tuple[Any, ...]) -> _Stream:
        """An actor's generator method, its items sent on as they come."""
        handle = self._actors[key]
        return _Stream(getattr(handle, name).remote(*args))

    def kill(self, key: str) -> None:
        # The handle goes first: an actor whose kill fails (it is already dead, or its node
        # is unreachable) is not called again.
        handle = self._actors.pop(key, None)
        if handle is not None:
            self._ray.kill(handle, no_restart=True)

    def held(self) -> list[str]:
        """The names of the actors this driver holds a handle on."""
        return sorted(self._actors)

    def shutdown(self) -> None:
        with contextlib.suppress(Exception):
            self._ray.shutdown()
