"""Counters the receiver keeps, and the Prometheus text exposition of everything an admin
watches (counters here, job states and disk from the database and the file system)."""

from __future__ import annotations

import shutil
import threading
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from node.db import JobRow
from node.spool import worker_statuses


CounterKey = tuple[str, tuple[tuple[str, str], ...]]   # name, sorted labels


class Metrics:
    """Thread-safe counters; names follow Prometheus conventions."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: Counter[CounterKey] = Counter()

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            self._counters[key] += value  # type: ignore[assignment]  # Counter of floats

    def snapshot(self) -> dict[CounterKey, float]:
        with self._lock:
            return dict(self._counters)


_HELP = {
    "pacsnode_instances_received_total": "Instances stored by C-STORE or STOW-RS.",
    "pacsnode_bytes_received_total": "Bytes of instances stored (C-STORE, STOW-RS, pull).",
    "pacsnode_instances_refused_total": "Instances refused (C-STORE or STOW-RS), by status.",
    "pacsnode_instances_pulled_total": "Instances fetched by pull (DICOMweb or DIMSE), by source.",
    "pacsnode_associations_total": "Associations accepted (result=accepted) or rejected.",
    "pacsnode_jobs": "Jobs in the job table by kind and state.",
    "pacsnode_queue_depth": "Claimable jobs waiting, by kind.",
    "pacsnode_delivery_failures": "Jobs whose last attempt failed to deliver, by state.",
    "pacsnode_spool_free_bytes": "Free bytes on the spool volume.",
    "pacsnode_inference_seconds_total": "Seconds spent in inference, by model.",
    "pacsnode_inferences_total": "Inference runs, by model.",
}


def _line(name: str, labels: tuple[tuple[str, str], ...], value: float) -> str:
    if labels:
        inner = ",".join(f'{k}="{v}"' for k, v in labels)
        return f"{name}{{{inner}}} {value:g}"
    return f"{name} {value:g}"


def exposition(metrics: Metrics, engine: Engine, spool: Path,
               extra: Iterable[tuple[CounterKey, float]] = ()) -> str:
    """The Prometheus text format (version 0.0.4). ``extra``: counters of other processes
    (listener children, node/listener.py), added to ours."""
    samples: dict[str, list[tuple[tuple[tuple[str, str], ...], float]]] = {}
    counters = Counter(metrics.snapshot())
    for key, value in extra:
        counters[key] += value  # type: ignore[assignment]  # Counter of floats
    for (name, labels), value in counters.items():
        samples.setdefault(name, []).append((labels, value))
    with Session(engine) as session:
        for kind, state, count in session.execute(
                select(JobRow.kind, JobRow.state, func.count()).group_by(JobRow.kind,
                                                                         JobRow.state)):
            samples.setdefault("pacsnode_jobs", []).append(
                ((("kind", kind), ("state", state)), float(count)))
            if state in ("pending", "encoded"):
                samples.setdefault("pacsnode_queue_depth", []).append(
                    ((("kind", kind),), float(count)))
        for state, count in session.execute(
                select(JobRow.state, func.count()).where(JobRow.last_error.is_not(None))
                .group_by(JobRow.state)):
            samples.setdefault("pacsnode_delivery_failures", []).append(
                ((("state", state),), float(count)))
    samples["pacsnode_spool_free_bytes"] = [((), float(shutil.disk_usage(spool).free))]
    for data in worker_statuses(spool):
        for model, seconds in data.get("seconds", {}).items():
            samples.setdefault("pacsnode_inference_seconds_total", []).append(
                ((("model", model),), float(seconds)))
        for model, runs in data.get("runs", {}).items():
            samples.setdefault("pacsnode_inferences_total", []).append(
                ((("model", model),), float(runs)))
    lines = []
    for name in sorted(samples):
        kind = "counter" if name.endswith("_total") else "gauge"
        lines.append(f"# HELP {name} {_HELP.get(name, name)}")
        lines.append(f"# TYPE {name} {kind}")
        lines += [_line(name, labels, value) for labels, value in sorted(samples[name])]
    return "\n".join(lines) + "\n"
