"""Prometheus metrics for the bot, in one registry per `Scheduler` (so two cores in one process,
as in tests, never share counts). Nothing here carries a user id: labels are the job kind, the
outcome, a worker's name and a Discord error code, all of them few.

Counters follow the job events (every finished job passes through `Finished`) and the credits
the scheduler holds at submit time; gauges (queue depth, workers up and busy, GPU memory) are
read from the scheduler's state when Prometheus scrapes, so they can never drift.

The Discord front end feeds the Discord counters (API errors by code, deliveries retried and
lost) through the plain methods below, so this module stays free of discord imports.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from bot.core.models import Finished, Job, JobEvent, JobState

PREFIX = "imagine"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Waits run from seconds (an idle bot) to many minutes (a busy server's queue).
WAIT_BUCKETS_S = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600)
# A job on a GPU takes seconds to a minute or two; on a CPU, many minutes.
RUN_BUCKETS_S = (0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1200)


class SchedulerView(Protocol):
    """What the gauges read at scrape time."""

    @property
    def queued_count(self) -> int: ...

    @property
    def running_count(self) -> int: ...

    def worker_states(self) -> Sequence[WorkerState]: ...


class WorkerState(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def ready(self) -> bool: ...

    @property
    def busy(self) -> int: ...

    @property
    def gpu_memory_bytes(self) -> int | None: ...


class CoreMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self.jobs = Counter(
            f"{PREFIX}_jobs",
            "Jobs that ended, by kind and outcome (succeeded, failed, cancelled, refused).",
            ["kind", "outcome"],
            registry=registry,
        )
        self.wait_s = Histogram(
            f"{PREFIX}_job_wait_seconds",
            "From submit to the start of the run that ended the job.",
            ["kind"],
            buckets=WAIT_BUCKETS_S,
            registry=registry,
        )
        self.run_s = Histogram(
            f"{PREFIX}_job_run_seconds",
            "From the start of a job's last run to its end.",
            ["kind"],
            buckets=RUN_BUCKETS_S,
            registry=registry,
        )
        self.credits_held = Counter(
            f"{PREFIX}_credits_held",
            "Credits held when jobs were queued.",
            registry=registry,
        )
        self.credits_settled = Counter(
            f"{PREFIX}_credits_settled",
            "Held credits spent by jobs that succeeded.",
            registry=registry,
        )
        self.credits_refunded = Counter(
            f"{PREFIX}_credits_refunded",
            "Held credits given back (failed, cancelled, refused or undelivered jobs).",
            registry=registry,
        )
        self.discord_errors = Counter(
            f"{PREFIX}_discord_api_errors",
            "Errors Discord's API answered, by Discord error code (0: none given).",
            ["code"],
            registry=registry,
        )
        self.deliveries_retried = Counter(
            f"{PREFIX}_deliveries_retried",
            "Result posts that failed and were scheduled again.",
            registry=registry,
        )
        self.deliveries_lost = Counter(
            f"{PREFIX}_deliveries_lost",
            "Results that could not be posted where they were asked for (refunded).",
            registry=registry,
        )

    # ----- fed by the scheduler --------------------------------------------------------------

    def watch(self, view: SchedulerView) -> None:
        """Read the gauges from `view` at every scrape."""
        self.registry.register(_GaugeCollector(view))

    def submitted(self, jobs: Iterable[Job]) -> None:
        self.credits_held.inc(sum(job.cost for job in jobs))

    def refunded(self, credits: int) -> None:
        if credits > 0:
            self.credits_refunded.inc(credits)

    def on_event(self, event: JobEvent) -> None:
        if not isinstance(event, Finished):
            return
        job = event.job
        kind = job.kind.value
        self.jobs.labels(kind=kind, outcome=job.state.value).inc()
        if job.started_at is not None:
            self.wait_s.labels(kind=kind).observe(
                max(0.0, (job.started_at - job.created_at).total_seconds())
            )
            if job.finished_at is not None:
                self.run_s.labels(kind=kind).observe(
                    max(0.0, (job.finished_at - job.started_at).total_seconds())
                )
        if job.state is JobState.SUCCEEDED:
            if job.cost:
                self.credits_settled.inc(job.cost)
        else:
            self.refunded(job.cost)

    # ----- fed by the Discord front end ------------------------------------------------------

    def discord_error(self, code: int) -> None:
        self.discord_errors.labels(code=str(code)).inc()

    def delivery_retried(self) -> None:
        self.deliveries_retried.inc()

    def delivery_lost(self) -> None:
        self.deliveries_lost.inc()

    # ----- read by the HTTP server -----------------------------------------------------------

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _GaugeCollector(Collector):
    def __init__(self, view: SchedulerView) -> None:
        self._view = view

    def describe(self) -> Iterable[Metric]:
        # Described without reading the scheduler, so registering it costs nothing.
        return self._families(None)

    def collect(self) -> Iterable[Metric]:
        return self._families(self._view)

    def _families(self, view: SchedulerView | None) -> list[Metric]:
        def gauge(name: str, doc: str, labels: list[str]) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=labels)

        queue_depth = gauge("queue_depth", "Jobs waiting in the queue.", [])
        running = gauge("jobs_running", "Jobs running now.", [])
        up = gauge("workers_up", "Workers ready to run jobs.", [])
        busy = gauge("workers_busy", "Workers running a job now.", [])
        gpu = gauge(
            "worker_gpu_memory_bytes",
            "CUDA memory a worker held after its last job (absent on CPU).",
            ["worker"],
        )
        if view is not None:
            states = view.worker_states()
            queue_depth.add_metric([], view.queued_count)
            running.add_metric([], view.running_count)
            up.add_metric([], sum(1 for s in states if s.ready))
            busy.add_metric([], sum(1 for s in states if s.busy > 0))
            for state in states:
                if state.gpu_memory_bytes is not None:
                    gpu.add_metric([state.name], state.gpu_memory_bytes)
        return [queue_depth, running, up, busy, gpu]
