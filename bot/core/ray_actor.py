"""The Ray actor that runs jobs on a GPU node: it builds the engine once, then runs one job at a
time as a streaming call (its progress and previews, then its answer), and takes a cancel while
a job runs. It lives in a Ray worker process; the bot reaches it through the bridge process
(bot/core/ray_bridge.py), and `RayWorker` (bot/core/ray_workers.py) is its side in the bot.
"""

from __future__ import annotations

import logging
import os
import queue
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from bot.core.execute import (
    JobError,
    WorkItem,
    prepare_request,
    render_job,
    resolve_factory,
    safe_path,
)
from generation.contract import GenerationCancelled, Progress
from generation.settings import EngineSettings

# A job's progress goes to the bot at most this often (steps in between are merged: the latest
# step, with the latest preview); its answer goes at once.
PROGRESS_EVERY_S = 0.1


class EngineActor:
    """Builds the engine once, then runs jobs one at a time, each as one streaming call
    (`run`): its progress and previews, then its answer. The actor has several threads
    (`max_concurrency`), so a cancel is answered while a job runs."""

    def __init__(self, factory: str, settings: EngineSettings, log_level: int) -> None:
        logging.basicConfig(level=log_level, format="%(asctime)s actor %(levelname)s %(message)s")
        self._engine = resolve_factory(factory)(settings)
        # Load the models now, so a job's timeout never includes loading them.
        warm_up = getattr(self._engine, "warm_up", None)
        if callable(warm_up):
            warm_up()
        self._lock = threading.Lock()
        self._current: int | None = None
        self._cancel = threading.Event()
        self._cancelled: set[int] = set()

    def describe(self) -> dict[str, str]:
        """Where this actor runs; answering at all means the engine is ready."""
        import ray

        gpus = ",".join(str(g) for g in ray.get_gpu_ids())
        return {
            "pid": str(os.getpid()),
            "node_ip": ray.util.get_node_ip_address(),
            "gpus": gpus,
            # What Ray set from the actor's CPUs (and torch read when it was imported).
            "threads": os.environ.get("OMP_NUM_THREADS", ""),
        }

    def run(self, item: WorkItem, inputs: Mapping[str, bytes]) -> Iterator[tuple[Any, ...]]:
        """Yields ("progress", step, total, preview PNG or None) as the job goes, then one of
        ("done", RenderedJob), ("cancelled",) or ("error", kind, message). The engine runs in a
        thread of its own; steps are sent at most every `PROGRESS_EVERY_S`."""
        updates: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()

        def progress(update: Progress) -> None:
            updates.put(("progress", update.step, update.total, update.preview_png))

        def work() -> None:
            updates.put(self._run(item, inputs, progress))

        threading.Thread(target=work, name=f"job-{item.job_id}", daemon=True).start()
        sent_at = 0.0
        while True:
            message = updates.get()
            while message[0] == "progress":
                wait_s = sent_at + PROGRESS_EVERY_S - time.monotonic()
                try:
                    later = updates.get(timeout=wait_s) if wait_s > 0 else updates.get_nowait()
                except queue.Empty:
                    break
                if later[0] == "progress" and later[3] is None:
                    later = (*later[:3], message[3])
                message = later
            yield message
            if message[0] != "progress":
                return
            sent_at = time.monotonic()

    def _run(
        self, item: WorkItem, inputs: Mapping[str, bytes], progress: Callable[[Progress], None]
    ) -> tuple[Any, ...]:
        event = threading.Event()
        with self._lock:
            self._current = item.job_id
            self._cancel = event
            if item.job_id in self._cancelled:
                event.set()
        try:
            request = self._request(item, inputs)
            return ("done", render_job(self._engine, item, request, progress, event))
        except GenerationCancelled:
            return ("cancelled",)
        except JobError as exc:
            return ("error", exc.kind, exc.message)
        except Exception as exc:
            logging.getLogger(__name__).exception("job %d failed", item.job_id)
            return ("error", "worker", f"the worker failed ({type(exc).__name__})")
        finally:
            with self._lock:
                self._current = None
                self._cancelled.discard(item.job_id)

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

    def cancel(self, job_id: int) -> None:
        with self._lock:
            self._cancelled.add(job_id)
            if self._current == job_id:
                self._cancel.set()
