"""The durable job table and the threads that work it.

States (``JobStateValues``): pending → running → [encoded →] delivering → done, or
failed (not retryable) / dead (out of tries) / cancelled. Every transition is committed
before the work it announces, so after a crash or kill -9 :meth:`JobStore.recover`
puts each unfinished job back where its last commit left it: a job caught in
``running``, ``encoded`` or ``delivering`` becomes claimable again and keeps its ``step``
(so an encoded job is delivered, not predicted again); handlers
make their steps idempotent (deterministic UIDs make a resend harmless).
"""

from __future__ import annotations

import enum
import json
import logging
import socket
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, Select, or_, select, update
from sqlalchemy.orm import Session

from node.audit import NO_AUDIT, AuditLog
from node.backoff import after_failure
from node.db import DeliveryRow, JobRow, is_postgresql
from node.errors import DeliveryError, ExecutorError, JobError, PacsnodeError
from node.intake import utcnow
from node.outbox import DeliveryStateValues
from node.settings import JobSettings

log = logging.getLogger(__name__)


class JobStateValues(enum.Enum):
    PENDING = "pending"
    RUNNING = "running"
    ENCODED = "encoded"
    DELIVERING = "delivering"
    DONE = "done"
    FAILED = "failed"
    DEAD = "dead"
    CANCELLED = "cancelled"


FINAL = {JobStateValues.DONE, JobStateValues.FAILED, JobStateValues.DEAD,
         JobStateValues.CANCELLED}
# ENCODED is in flight, not claimable: the thread that encoded goes on to deliver, and a
# second claimer (another runner thread or dispatcher) must not deliver the same job at
# the same time. After a crash, recovery turns it back to pending with its step kept.
CLAIMABLE = (JobStateValues.PENDING.value,)
IN_FLIGHT = (JobStateValues.RUNNING.value, JobStateValues.ENCODED.value,
             JobStateValues.DELIVERING.value)
HEARTBEAT_SECONDS = 30.0       # schedule.stale_after_seconds must be well above this


@dataclass(frozen=True)
class Job:
    id: int
    key: str
    kind: str
    route: str
    study_instance_uid: str
    series_instance_uid: str | None
    generation: int
    payload: Mapping[str, Any]
    state: JobStateValues
    step: str | None
    priority: int
    attempts: int
    not_before: datetime | None
    last_error: str | None
    created_at: datetime
    updated_at: datetime
    owner: str | None = None        # who claimed it last (shared database only)

    @classmethod
    def from_row(cls, row: JobRow) -> Job:
        return cls(row.id, row.key, row.kind, row.route, row.study_instance_uid,
                   row.series_instance_uid, row.generation, json.loads(row.payload),
                   JobStateValues(row.state), row.step, row.priority, row.attempts,
                   row.not_before, row.last_error, row.created_at, row.updated_at,
                   row.owner)


@dataclass(frozen=True)
class JobSpec:
    key: str
    kind: str
    route: str
    study_instance_uid: str
    series_instance_uid: str | None
    generation: int
    payload: Mapping[str, Any]
    priority: int = 50
    delay_seconds: float = 0.0
    queue: str = "default"          # an infer job's device queue (the model's device)


def owner_name(role: str) -> str:
    """Who claims jobs in a shared database: the host and the role of this process."""
    return f"{socket.gethostname()}:{role}"[:128]


class JobStore:
    """The job table. ``owner`` (set where several processes share a PostgreSQL table)
    is stamped on every claim, and :meth:`recover` then takes back only this owner's
    jobs, never the ones another live receiver or worker is running."""

    def __init__(self, engine: Engine, settings: JobSettings, *,
                 owner: str | None = None) -> None:
        self.engine = engine
        self.settings = settings
        self.owner = owner
        self._skip_locked = is_postgresql(engine)

    def add(self, session: Session, spec: JobSpec) -> bool:
        """Insert in the caller's transaction; a job with the same key is not added twice."""
        if session.scalar(select(JobRow.id).where(JobRow.key == spec.key)) is not None:
            return False
        now = utcnow()
        session.add(JobRow(
            key=spec.key, kind=spec.kind, route=spec.route,
            study_instance_uid=spec.study_instance_uid,
            series_instance_uid=spec.series_instance_uid, generation=spec.generation,
            payload=json.dumps(dict(spec.payload), sort_keys=True),
            state=JobStateValues.PENDING.value, priority=spec.priority, attempts=0,
            queue=spec.queue,
            not_before=now + timedelta(seconds=spec.delay_seconds) if spec.delay_seconds
            else None,
            created_at=now, updated_at=now,
        ))
        self._supersede(session, spec)
        return True

    @staticmethod
    def _supersede(session: Session, spec: JobSpec) -> None:
        """A follow-up replaces the same route's job for an earlier generation that has
        not started yet (it would run on an incomplete series)."""
        session.flush()
        session.execute(
            update(JobRow)
            .where(JobRow.route == spec.route, JobRow.kind == spec.kind,
                   JobRow.study_instance_uid == spec.study_instance_uid,
                   JobRow.series_instance_uid.is_(None) if spec.series_instance_uid is None
                   else JobRow.series_instance_uid == spec.series_instance_uid,
                   JobRow.generation < spec.generation, JobRow.attempts == 0,
                   JobRow.state == JobStateValues.PENDING.value)
            .values(state=JobStateValues.CANCELLED.value,
                    last_error=f"superseded by generation {spec.generation}",
                    updated_at=utcnow())
        )

    def recover(self, kinds: set[str] | None = None, queues: set[str] | None = None) -> int:
        """At start: jobs a crash caught mid-flight become claimable again (step kept).

        ``kinds``: only the kinds this process runs (a receiver must not take back the
        jobs a separate worker process is running).
        """
        with Session(self.engine) as session, session.begin():
            query = update(JobRow).where(JobRow.state.in_(IN_FLIGHT))
            if kinds is not None:
                query = query.where(JobRow.kind.in_(kinds))
            if queues is not None:
                query = query.where(JobRow.queue.in_(queues))
            if self.owner is not None:
                query = query.where(or_(JobRow.owner == self.owner, JobRow.owner.is_(None)))
            result = session.execute(
                query.values(state=JobStateValues.PENDING.value, updated_at=utcnow())
            )
            count = int(getattr(result, "rowcount", 0) or 0)
        if count:
            log.warning("resumed %d job(s) interrupted by a stop", count)
        return count

    def heartbeat(self, job_ids: set[int]) -> None:
        """A runner still works these jobs: refresh their lease (``updated_at``)."""
        if not job_ids:
            return
        with Session(self.engine) as session, session.begin():
            session.execute(update(JobRow)
                            .where(JobRow.id.in_(job_ids), JobRow.state.in_(IN_FLIGHT))
                            .values(updated_at=utcnow()))

    def requeue_stale(self, older_than_seconds: float) -> int:
        """Running/delivering jobs whose runner stopped beating (a hung or vanished
        process) go back to pending, step kept, like :meth:`recover` does at start."""
        limit = utcnow() - timedelta(seconds=older_than_seconds)
        with Session(self.engine) as session, session.begin():
            result = session.execute(
                update(JobRow)
                .where(JobRow.state.in_(IN_FLIGHT), JobRow.updated_at < limit)
                .values(state=JobStateValues.PENDING.value, updated_at=utcnow(),
                        last_error=f"lease expired: no heartbeat for {older_than_seconds:.0f} s"))
            count = int(getattr(result, "rowcount", 0) or 0)
        if count:
            log.warning("requeued %d job(s) whose runner stopped sending heartbeats", count)
        return count

    def release_owner(self, owner: str) -> int:
        """Put back the in-flight jobs of a claimer that will not come back (a host gone
        for good); each keeps its step. Run it only when that claimer is really stopped."""
        with Session(self.engine) as session, session.begin():
            result = session.execute(
                update(JobRow).where(JobRow.state.in_(IN_FLIGHT), JobRow.owner == owner)
                .values(state=JobStateValues.PENDING.value, updated_at=utcnow()))
            count = int(getattr(result, "rowcount", 0) or 0)
        log.warning("released %d in-flight job(s) of %s", count, owner)
        return count

    def claim(self, kinds: set[str], queues: set[str] | None = None) -> Job | None:
        """Take the most urgent claimable job of the given kinds (and queues), atomically."""
        now = utcnow()
        with Session(self.engine) as session, session.begin():
            query = select(JobRow).where(
                JobRow.state.in_(CLAIMABLE), JobRow.kind.in_(kinds),
                or_(JobRow.not_before.is_(None), JobRow.not_before <= now))
            if queues is not None:
                query = query.where(JobRow.queue.in_(queues))
            if self._skip_locked:
                return self._claim_locked(session, query, now)
            candidates = session.scalars(
                query
                .order_by(JobRow.priority.desc(), JobRow.id)
                .limit(5)
            ).all()
            for row in candidates:
                claimed = session.execute(
                    update(JobRow)
                    .where(JobRow.id == row.id, JobRow.state == row.state)
                    .values(state=JobStateValues.RUNNING.value, attempts=JobRow.attempts + 1,
                            owner=self.owner, updated_at=now)
                )
                if getattr(claimed, "rowcount", 0) == 1:
                    session.flush()
                    session.refresh(row)
                    return Job.from_row(row)
        return None

    def _claim_locked(self, session: Session, query: Select[Any],
                      now: datetime) -> Job | None:
        """PostgreSQL: lock the most urgent row, skipping rows other claimers hold, so
        concurrent claimers never wait for each other nor take the same job."""
        row: JobRow | None = session.scalars(
            query.order_by(JobRow.priority.desc(), JobRow.id).limit(1)
            .with_for_update(skip_locked=True)
        ).first()
        if row is None:
            return None
        row.state = JobStateValues.RUNNING.value
        row.attempts += 1
        row.owner = self.owner
        row.updated_at = now
        session.flush()
        return Job.from_row(row)

    def advance(self, job_id: int, state: JobStateValues, *, step: str | None = None) -> None:
        self._set(job_id, state=state.value, step=step, last_error=None, not_before=None)

    def fail(self, job_id: int, error: str, *, retryable: bool) -> JobStateValues:
        """Record a failure: retry later with capped exponential backoff, or give up."""
        with Session(self.engine) as session, session.begin():
            row = self._row(session, job_id)
            outcome, when = after_failure(self.settings, row.attempts, retryable=retryable)
            state = JobStateValues(outcome.value)
            if when is not None:
                row.not_before = when
            row.state = state.value
            row.last_error = error
            row.updated_at = utcnow()
        return state

    def defer(self, job_id: int, not_before: datetime, error: str, *, step: str) -> None:
        """Back to pending until ``not_before`` (a destination waits its backoff); not a
        failure of the job itself."""
        self._set(job_id, state=JobStateValues.PENDING.value, not_before=not_before,
                  last_error=error, step=step)

    def give_up(self, job_id: int, state: JobStateValues, error: str, *, step: str) -> None:
        """End the job as failed or dead (its deliveries say which destination and why)."""
        if state not in (JobStateValues.FAILED, JobStateValues.DEAD):
            raise JobError(f"job {job_id}: give_up expects failed or dead, got {state.value}")
        self._set(job_id, state=state.value, not_before=None, last_error=error, step=step)

    def retry(self, job_id: int) -> Job:
        """Put a failed, dead or cancelled job back in the queue, with fresh tries; of its
        deliveries only the failed and dead ones are tried again."""
        with Session(self.engine) as session, session.begin():
            row = self._row(session, job_id)
            if JobStateValues(row.state) not in FINAL - {JobStateValues.DONE}:
                raise JobError(f"job {job_id} is {row.state}; only failed, dead or cancelled "
                               f"jobs can be retried")
            row.state = JobStateValues.PENDING.value
            row.attempts = 0
            row.not_before = None
            row.updated_at = utcnow()
            session.execute(
                update(DeliveryRow)
                .where(DeliveryRow.job_id == job_id,
                       DeliveryRow.state.in_((DeliveryStateValues.FAILED.value,
                                              DeliveryStateValues.DEAD.value)))
                .values(state=DeliveryStateValues.PENDING.value, attempts=0,
                        next_attempt_at=None, updated_at=utcnow()))
            session.flush()
            return Job.from_row(row)

    def cancel(self, job_id: int) -> Job:
        with Session(self.engine) as session, session.begin():
            row = self._row(session, job_id)
            if JobStateValues(row.state) in FINAL:
                raise JobError(f"job {job_id} is already {row.state}")
            row.state = JobStateValues.CANCELLED.value
            row.updated_at = utcnow()
            session.flush()
            return Job.from_row(row)

    def get(self, job_id: int) -> Job:
        with Session(self.engine) as session:
            return Job.from_row(self._row(session, job_id))

    def list(self, *, state: str | None = None, limit: int = 100) -> list[Job]:
        with Session(self.engine) as session:
            query = select(JobRow).order_by(JobRow.id.desc()).limit(limit)
            if state:
                query = query.where(JobRow.state == state)
            return [Job.from_row(r) for r in session.scalars(query)]

    def _set(self, job_id: int, **values: Any) -> None:
        with Session(self.engine) as session, session.begin():
            row = self._row(session, job_id)
            if row.state == JobStateValues.CANCELLED.value:
                raise JobError(f"job {job_id} was cancelled")
            for key, value in values.items():
                setattr(row, key, value)
            row.updated_at = utcnow()

    @staticmethod
    def _row(session: Session, job_id: int) -> JobRow:
        row = session.get(JobRow, job_id)
        if row is None:
            raise JobError(f"no job with id {job_id}")
        return row


JobHandler = Callable[[Job, JobStore], None]


class JobRunner:
    """Threads that claim jobs of the kinds they have handlers for and run them; while a
    job runs, its lease is refreshed every ``heartbeat_seconds`` (see requeue_stale)."""

    def __init__(self, store: JobStore, handlers: Mapping[str, JobHandler], *,
                 workers: int = 1, poll_seconds: float = 1.0,
                 queues: set[str] | None = None, audit: AuditLog = NO_AUDIT,
                 heartbeat_seconds: float = HEARTBEAT_SECONDS) -> None:
        self.heartbeat_seconds = heartbeat_seconds
        self._running: set[int] = set()
        self._running_lock = threading.Lock()
        self.store = store
        self.audit = audit
        self.queues = queues
        self.handlers = dict(handlers)
        self.workers = workers
        self.poll_seconds = poll_seconds
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for i in range(self.workers):
            thread = threading.Thread(target=self._loop, name=f"job-runner-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)
        beat = threading.Thread(target=self._beat, name="job-heartbeat", daemon=True)
        beat.start()
        self._threads.append(beat)

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_seconds):
            with self._running_lock:
                ids = set(self._running)
            try:
                self.store.heartbeat(ids)
            except Exception:
                log.exception("job heartbeat failed")

    def wake(self) -> None:
        self._wake.set()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._wake.set()
        for thread in self._threads:
            thread.join(timeout)

    def run_once(self) -> bool:
        """Claim and run one job; False when nothing was claimable."""
        if not self.handlers:
            return False
        job = self.store.claim(set(self.handlers), self.queues)
        if job is None:
            return False
        with self._running_lock:
            self._running.add(job.id)
        try:
            self.handlers[job.kind](job, self.store)
        except (DeliveryError, ExecutorError) as exc:
            state = self.store.fail(job.id, str(exc), retryable=exc.retryable)
            log.warning("job %d (%s) failed: %s -> %s", job.id, job.kind, exc, state.value)
        except PacsnodeError as exc:
            state = self.store.fail(job.id, str(exc), retryable=False)
            log.error("job %d (%s) failed: %s -> %s", job.id, job.kind, exc, state.value)
        except Exception as exc:
            log.exception("job %d (%s) crashed", job.id, job.kind)
            self.store.fail(job.id, f"internal error: {exc!r}", retryable=True)
        finally:
            with self._running_lock:
                self._running.discard(job.id)
        return True

    def _audit_failure(self, job: Job, error: str, state: JobStateValues) -> None:
        self.audit.write("failed", job.study_instance_uid, job=job.id, kind=job.kind,
                         route=job.route, error=error, state=state.value,
                         attempts=job.attempts)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                worked = self.run_once()
            except Exception:
                log.exception("job runner error")
                worked = False
            if not worked:
                self._wake.wait(self.poll_seconds)
                self._wake.clear()
