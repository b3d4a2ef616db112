"""The example Grafana dashboard queries metrics the bot really exports, and the README shows the
same PromQL."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from bot.core.metrics import CoreMetrics

REPO = Path(__file__).resolve().parents[1]
DASHBOARD = REPO / "deploy" / "grafana" / "imagine-bot.json"


class _OneWorker:
    queued_count = 0
    running_count = 0

    def worker_states(self) -> list[object]:
        class State:
            name, ready, busy, gpu_memory_bytes = "w0", True, 0, 1

        return [State()]


def exported_samples() -> set[str]:
    metrics = CoreMetrics()
    metrics.watch(_OneWorker())
    # Labelled families only export samples once a label set is used.
    metrics.jobs.labels(kind="imagine", outcome="succeeded").inc()
    metrics.wait_s.labels(kind="imagine").observe(1.0)
    metrics.run_s.labels(kind="imagine").observe(1.0)
    text = metrics.exposition().decode()
    return {
        sample.name for family in text_string_to_metric_families(text) for sample in family.samples
    }


def test_the_dashboard_queries_exported_metrics_and_matches_the_readme() -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    panels = dashboard["panels"]
    assert len(panels) == 5
    expressions = [target["expr"] for panel in panels for target in panel["targets"]]
    samples = exported_samples()
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    for expression in expressions:
        names = re.findall(r"\bimagine_[a-z_]+", expression)
        assert names, expression
        for name in names:
            assert name in samples, f"{name} is not exported by bot/core/metrics.py"
        assert expression in readme, f"README lacks the panel query {expression!r}"
