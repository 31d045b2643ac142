"""Periodic work on APScheduler 3 (the only module besides the composition root that
imports it).

Jobs live in a persistent SQLAlchemy job store in the node's database (table
``scheduled_jobs``), so their next run times survive a restart: a run missed while the
node was down is made up once at start (``coalesce``) when it is no older than
``schedule.misfire_grace_seconds``, and skipped otherwise. ``max_instances = 1``: a run
never overlaps the previous one of the same task.

A persistent store keeps a textual reference to the function it calls, so the stored
jobs all call :func:`run_task` with the task's key, and the running node registers what
each key does (:class:`Scheduler` does that on :meth:`~Scheduler.start`). Every task is
safe to run twice.

Receivers sharing a PostgreSQL database (scale-out) each keep their jobs in a table of
their own (``scheduled_jobs_<owner>``, :func:`table_for`): APScheduler 3 cannot share one
store between schedulers (each would run, and reschedule, the others' jobs, and one
receiver's reconciliation removed the tasks the others had configured). A task marked
``once`` (pull polling, retention, the nightly fine-tuning) then runs on one receiver at
a time: its run takes a PostgreSQL advisory lock named after the task, and a receiver
that finds it taken skips that run.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger
from sqlalchemy import Engine, text

from node.db import is_postgresql
from node.errors import ConfigError
from node.settings import ScheduleSettings

log = logging.getLogger(__name__)

TABLE = "scheduled_jobs"
_MAX_IDENTIFIER = 63            # PostgreSQL's limit on a table name
_TASKS: dict[str, Callable[[], object]] = {}      # task key -> what it does in this process
_TASKS_LOCK = threading.Lock()


def run_task(task_id: str) -> None:
    """What every stored job calls (APScheduler keeps this reference in the database);
    ``task_id``: the task's key (its id, after the owner's prefix on a shared database)."""
    with _TASKS_LOCK:
        task = _TASKS.get(task_id)
    if task is None:
        log.warning("scheduled task %s has nothing to run in this process", task_id)
        return
    try:
        task()
    except Exception:
        log.exception("scheduled task %s failed", task_id)


@dataclass(frozen=True)
class Task:
    id: str
    func: Callable[[], object]
    trigger: BaseTrigger
    once: bool = False      # one receiver at a time among those sharing a database


def table_for(owner: str | None) -> str:
    """The job store table of a scheduler: :data:`TABLE`, or one per owner (a receiver on
    a shared database), a valid identifier of at most 63 characters."""
    if owner is None:
        return TABLE
    slug = re.sub(r"[^a-z0-9]+", "_", owner.lower()).strip("_")
    table = f"{TABLE}_{slug}"
    if len(table) > _MAX_IDENTIFIER:
        digest = hashlib.sha1(owner.encode()).hexdigest()[:10]
        table = f"{table[:_MAX_IDENTIFIER - 11]}_{digest}"
    return table


def lock_key(task_id: str) -> int:
    """The PostgreSQL advisory lock (a signed 64-bit number) of a ``once`` task."""
    digest = hashlib.blake2b(f"pacsnode-task:{task_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def every(seconds: float) -> IntervalTrigger:
    return IntervalTrigger(seconds=seconds)


def cron(line: str, key: str = "schedule.finetune_cron") -> CronTrigger:
    try:
        return CronTrigger.from_crontab(line)
    except ValueError as exc:
        raise ConfigError(f"{key}: expected a crontab line such as \"0 2 * * *\"; found "
                          f"{line!r} ({exc})") from exc


class Scheduler:
    def __init__(self, engine: Engine, settings: ScheduleSettings, *, threads: int = 4,
                 owner: str | None = None) -> None:
        """``owner``: this receiver's name where several share the database (see the
        module's docstring); None for a node alone on its database."""
        self.settings = settings
        self.engine = engine
        self.table = table_for(owner)
        self._prefix = "" if owner is None else f"{owner}|"     # keys in _TASKS
        self._shared = owner is not None and is_postgresql(engine)
        # one line per run at INFO would flood the log with short polling intervals;
        # failures still reach it (run_task logs them, and so does APScheduler at WARNING)
        logging.getLogger("apscheduler.executors.default").setLevel(logging.WARNING)
        self._scheduler = BackgroundScheduler(
            jobstores={"default": SQLAlchemyJobStore(engine=engine, tablename=self.table)},
            executors={"default": ThreadPoolExecutor(threads)},
            job_defaults={"coalesce": True, "max_instances": 1,
                          "misfire_grace_time": int(settings.misfire_grace_seconds)},
        )
        self._ids: set[str] = set()

    def start(self, tasks: Sequence[Task]) -> None:
        """Reconcile ``tasks`` with the stored jobs (see :meth:`update`), then run."""
        self._scheduler.start(paused=True)
        self.update(tasks)
        self._scheduler.resume()

    def update(self, tasks: Sequence[Task]) -> None:
        """Register ``tasks`` and make the stored jobs match them.

        A stored job whose trigger is unchanged keeps its next run time (so a run missed
        during downtime is made up); a changed one is replaced; one no longer configured
        is removed.
        """
        ids = {t.id for t in tasks}
        with _TASKS_LOCK:
            for gone in self._ids - ids:
                _TASKS.pop(self._prefix + gone, None)
            for task in tasks:
                _TASKS[self._prefix + task.id] = self._runner(task)
        self._ids = ids
        for job in self._scheduler.get_jobs():
            if job.id not in ids:
                log.info("scheduled task %s is no longer configured; removed", job.id)
                job.remove()
        grace = int(self.settings.misfire_grace_seconds)
        for task in tasks:
            job = self._scheduler.get_job(task.id)
            key = self._prefix + task.id
            if job is not None and str(job.trigger) == str(task.trigger) \
                    and job.args == (key,):
                if job.misfire_grace_time != grace:
                    job.modify(misfire_grace_time=grace)
                continue
            self._scheduler.add_job(run_task, task.trigger, args=[key], id=task.id,
                                    name=task.id, replace_existing=True)
        for job in self._scheduler.get_jobs():
            log.info("scheduled %s: %s, next run %s", job.id, job.trigger,
                     getattr(job, "next_run_time", None))

    def _runner(self, task: Task) -> Callable[[], object]:
        """What a run of ``task`` does here: the task, or for a ``once`` task on a shared
        database, the task under its advisory lock (skipped when another holds it)."""
        if not (task.once and self._shared):
            return task.func

        def once() -> None:
            # a connection of its own, outside any transaction, holds the lock for the run;
            # if it breaks, PostgreSQL releases the lock with the session
            with self.engine.connect() as conn:
                conn = conn.execution_options(isolation_level="AUTOCOMMIT")
                key = {"key": lock_key(task.id)}
                if not conn.execute(text("SELECT pg_try_advisory_lock(:key)"), key).scalar():
                    log.info("scheduled task %s: running on another receiver; skipped here",
                             task.id)
                    return
                try:
                    task.func()
                finally:
                    conn.execute(text("SELECT pg_advisory_unlock(:key)"), key)
        return once

    @property
    def running(self) -> bool:
        return bool(self._scheduler.running)

    def job_ids(self) -> list[str]:
        return sorted(job.id for job in self._scheduler.get_jobs())

    def stop(self) -> None:
        """Stop scheduling; a task that is running is waited for."""
        if self._scheduler.running:
            self._scheduler.shutdown(wait=True)
        with _TASKS_LOCK:
            for task_id in self._ids:
                _TASKS.pop(self._prefix + task_id, None)
