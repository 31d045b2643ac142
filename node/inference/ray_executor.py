"""Inference on a Ray cluster (``[executor] kind = "ray"``); the one module that imports ray.

The worker role keeps doing what it does with local processes — claim ``infer`` jobs from
the job table in priority order, advance them, deliver the results — but the model runs
in Ray actors: ``replicas`` actors per model, each requesting the model's ``num_gpus`` /
``num_cpus``, each loading the model once (ModelPool / TorchRunner, with its
out-of-memory fallback) and keeping it resident. The job row is claimed in the database
before dispatch, so two dispatchers never run one job; the actor reads the series from
the shared spool and writes SEG + SR into the job's result folder beside it; the
dispatcher then advances the job and delivers.

When an actor or its Ray node is lost mid-run (RayActorError, NodeDiedError,
ObjectLostError, a worker crash, Ray's out-of-memory kill) or a run passes
``task_timeout_seconds``, the actor is replaced, the job goes back to the table with the
usual backoff and the next free actor — on a surviving node — takes it. A job is never
delivered twice: delivery happens here, once, recorded in the job's step, and the result
UIDs are derived from the job, so a re-run after a loss writes the same objects.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import (
    GetTimeoutError,
    NodeDiedError,
    ObjectLostError,
    OutOfMemoryError,
    RayActorError,
    RayTaskError,
    WorkerCrashedError,
)

from node.errors import ExecutorError, ModelError, PacsnodeError
from node.forward import job_files
from node.inference.runner import ModelPool
from node.inference.service import (
    SavedPrediction,
    WorkerNode,
    infer_series,
    make_infer_handler,
    previous_sr,
    status_file,
)
from node.jobs import Job, JobRunner, owner_name
from node.ports import Sender
from node.results.warm import warm_up
from node.settings import ExecutorSettings, ModelSettings, Settings
from node.spool import write_status_file

log = logging.getLogger(__name__)

# The run was lost with its actor, its worker process or its node: run it again elsewhere.
LOST = (RayActorError, NodeDiedError, ObjectLostError, WorkerCrashedError, OutOfMemoryError)


class ModelActor:
    """One model on one Ray worker, loaded once and kept resident."""

    def __init__(self, model: ModelSettings) -> None:
        self.name = model.name
        self.pool = ModelPool({model.name: model})

    def ready(self) -> dict[str, Any]:
        """Load the weights and the result writers' tables now (not at the first job)
        and say where this actor lives."""
        self.pool.runner(self.name).load()
        warm_up()
        return {"node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}

    def run(self, job: Job, files: Sequence[str], out_dir: str,
            predecessor: str | None) -> SavedPrediction:
        saved = infer_series(self.pool, job, [Path(f) for f in files], Path(out_dir),
                             predecessor=Path(predecessor) if predecessor else None)
        return replace(saved, ran_on=f"ray node {ray.get_runtime_context().get_node_id()}")


def gpus_for(model: ModelSettings) -> float:
    if model.num_gpus is not None:
        return model.num_gpus
    return 1.0 if model.device.startswith("cuda") else 0.0


class ActorPool:
    """The live actors of every model; a job leases an idle one. A lost actor is replaced
    by a new one, which joins the pool once Ray has placed it and it has loaded its model."""

    def __init__(self, models: Sequence[ModelSettings],
                 on_change: Callable[[], None] = lambda: None) -> None:
        self.models = {m.name: m for m in models}
        self.on_change = on_change
        self._idle: dict[str, list[Any]] = {m.name: [] for m in models}
        self._cond = threading.Condition()
        self._stopping = False
        self._backoff = {m.name: 1.0 for m in models}   # between replacements that die
        self.placed: dict[str, str] = {}         # actor id -> Ray node id (for status, tests)

    def start(self) -> None:
        for model in self.models.values():
            for _ in range(model.replicas):
                self._spawn(model)

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()

    def _spawn(self, model: ModelSettings) -> None:
        # SPREAD: a model's replicas go to different nodes where they can, so losing a
        # node leaves a replica running. No automatic restart: a replacement is started
        # here, and joins when it is ready, so no job waits on an actor being re-placed.
        actor = ray.remote(ModelActor).options(
            num_cpus=model.num_cpus, num_gpus=gpus_for(model), max_restarts=0,
            scheduling_strategy="SPREAD",
        ).remote(model)
        threading.Thread(target=self._join_when_ready, args=(model, actor), daemon=True,
                         name=f"ray-actor-{model.name}").start()

    def _join_when_ready(self, model: ModelSettings, actor: Any) -> None:
        try:
            where = ray.get(actor.ready.remote())
        except LOST as exc:
            delay = self._backoff[model.name]
            self._backoff[model.name] = min(60.0, delay * 2)
            log.warning("a %s actor was lost before it was ready (%s); starting another "
                        "in %.0f s", model.name, type(exc).__name__, delay)
            time.sleep(delay)
            if not self._stopping:
                self._spawn(model)
            return
        except RayTaskError as exc:
            log.error("model %s cannot be loaded on Ray: %s", model.name, exc.cause)
            return
        with self._cond:
            self._backoff[model.name] = 1.0
            self.placed[actor._actor_id.hex()] = str(where["node_id"])
            self._idle[model.name].append(actor)
            self._cond.notify_all()
        log.info("model %s resident in a Ray actor on node %s (pid %s)", model.name,
                 where["node_id"], where["pid"])
        self.on_change()

    def resident(self) -> dict[str, list[str]]:
        """Per model, the Ray nodes its live actors are on."""
        with self._cond:
            nodes: dict[str, list[str]] = {name: [] for name in self.models}
            for name, actors in self._idle.items():
                nodes[name] += [self.placed.get(a._actor_id.hex(), "?") for a in actors]
            return nodes

    def acquire(self, name: str, timeout: float) -> Any:
        if name not in self.models:
            raise ModelError(f"no model named {name!r} on the Ray executor; configured: "
                             f"{sorted(self.models)}")
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._idle[name]:
                left = deadline - time.monotonic()
                if left <= 0 or self._stopping:
                    raise ExecutorError(f"no {name} actor became free within {timeout:.0f} s",
                                        retryable=True)
                self._cond.wait(min(left, 1.0))
            return self._idle[name].pop(0)

    def node_of(self, actor: Any) -> str:
        with self._cond:
            return self.placed.get(actor._actor_id.hex(), "unknown")

    def release(self, name: str, actor: Any) -> None:
        with self._cond:
            self._idle[name].append(actor)
            self._cond.notify_all()

    def replace(self, name: str, actor: Any) -> None:
        """Drop a lost or stuck actor and start another in its place."""
        with self._cond:
            self.placed.pop(actor._actor_id.hex(), None)
        self.on_change()
        try:
            ray.kill(actor, no_restart=True)
        except Exception:  # noqa: BLE001  already gone with its node
            pass
        if not self._stopping:
            self._spawn(self.models[name])


def run_on_actor(pool: ActorPool, cfg: ExecutorSettings, engine: Any, job: Job,
                 settings: Settings, out_dir: Path) -> SavedPrediction:
    """Dispatch one claimed job to a free actor of its model and wait for the result."""
    model = str(job.payload.get("model", ""))
    files = [str(f) for f in job_files(engine, settings.storage.spool, job)]
    predecessor = previous_sr(engine, settings, job)
    actor = pool.acquire(model, cfg.task_timeout_seconds)
    log.info("job %d: dispatched to a %s actor on Ray node %s", job.id, model,
             pool.node_of(actor))
    ref = actor.run.remote(job, files, str(out_dir), str(predecessor) if predecessor else None)
    try:
        saved: SavedPrediction = ray.get(ref, timeout=cfg.task_timeout_seconds)
    except GetTimeoutError as exc:
        pool.replace(model, actor)
        raise ExecutorError(f"job {job.id}: no result from the {model} actor within "
                            f"{cfg.task_timeout_seconds:.0f} s", retryable=True) from exc
    except RayTaskError as exc:
        pool.release(model, actor)          # the actor is fine; the job failed in it
        cause = exc.cause
        if isinstance(cause, PacsnodeError):
            raise cause from exc
        raise ExecutorError(f"job {job.id}: {model} failed on Ray: {cause!r}",
                            retryable=True) from exc
    except LOST as exc:
        pool.replace(model, actor)
        log.warning("job %d: its %s actor or Ray node was lost (%s); back to the queue",
                    job.id, model, type(exc).__name__)
        raise ExecutorError(f"job {job.id}: the {model} actor or its Ray node was lost "
                            f"({type(exc).__name__})", retryable=True) from exc
    pool.release(model, actor)
    log.info("job %d: %s ran on %s", job.id, model, saved.ran_on)
    return saved


class RayWorker(WorkerNode):
    """The worker role with ``[executor] kind = "ray"``: claims every ``infer`` job and
    runs it on the cluster's model actors; delivery stays here."""

    def __init__(self, settings: Settings, *, sender: Sender | None = None) -> None:
        self.actors = ActorPool(settings.models, on_change=self.write_status)
        self.runs: dict[str, int] = {}
        self.seconds: dict[str, float] = {}
        self._status_lock = threading.Lock()
        super().__init__(settings, sender=sender, device=None)
        self.device = "ray"                 # status file .worker-status-ray.json
        if self.jobs.owner is not None:
            self.jobs.owner = owner_name("worker-ray")

    def _run(self, job: Job, settings: Settings, out_dir: Path) -> SavedPrediction:
        started = time.monotonic()
        saved = run_on_actor(self.actors, settings.executor, self.engine, job, settings,
                             out_dir)
        model = str(job.payload.get("model", ""))
        with self._status_lock:
            self.runs[model] = self.runs.get(model, 0) + 1
            self.seconds[model] = self.seconds.get(model, 0.0) + time.monotonic() - started
        self.write_status()
        return saved

    def write_status(self) -> None:
        """What `pacsnode models list` and /metrics read: a model counts as loaded while
        at least one of its actors is resident."""
        resident = self.actors.resident()
        with self._status_lock:
            data = {"pid": os.getpid(), "device": "ray",
                    "loaded": {name: bool(nodes) for name, nodes in resident.items()},
                    "ray_nodes": resident, "seconds": dict(self.seconds),
                    "runs": dict(self.runs)}
            write_status_file(status_file(self.settings, "ray"), data)

    def _make_runner(self, sender: Sender | None) -> JobRunner:
        cfg = self.settings.executor
        handler = make_infer_handler(self.engine, lambda: self.settings, self.pool, sender,
                                     audit=self.audit, predict=self._run)
        actors = sum(m.replicas for m in self.settings.models)
        return JobRunner(self.jobs, {"infer": handler}, audit=self.audit,
                         workers=max(1, min(actors, cfg.max_in_flight)))

    def serve_forever(self) -> None:
        cfg = self.settings.executor
        ray.init(address=cfg.address, namespace=cfg.namespace, configure_logging=False)
        resources = ray.cluster_resources()  # type: ignore[no-untyped-call]  # untyped API
        log.info("connected to the Ray cluster at %s: %s", cfg.address, resources)
        self.actors.start()
        super().serve_forever()

    def close(self) -> None:
        self.actors.stop()
        ray.shutdown()
