"""The ``forward`` job: send a completed series or study unchanged to destinations.

Each destination's delivery is tracked on its own in the outbox (node/outbox.py), so a
retry after a failure or a crash sends only to the ones still owed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from node.audit import NO_AUDIT, AuditLog
from node.db import InstanceRow, SeriesRow
from node.errors import ConfigError, DeliveryError
from node.intake import utcnow
from node.jobs import Job, JobHandler, JobStateValues, JobStore
from node.outbox import Delivery, DeliveryStateValues, Outbox, summary
from node.ports import Sender
from node.settings import Settings

log = logging.getLogger(__name__)


def job_files(engine: Engine, spool_root: Path, job: Job) -> list[Path]:
    with Session(engine) as session:
        query = select(InstanceRow.path).order_by(InstanceRow.series_instance_uid,
                                                  InstanceRow.instance_number)
        if job.series_instance_uid:
            query = query.where(InstanceRow.series_instance_uid == job.series_instance_uid)
        else:
            query = query.join(SeriesRow).where(
                SeriesRow.study_instance_uid == job.study_instance_uid)
        return [spool_root / rel for rel in session.scalars(query)]


def deliver(job: Job, store: JobStore, files: Sequence[Path], settings: Settings,
            sender: Sender, *, step_prefix: str = "", audit: AuditLog = NO_AUDIT) -> None:
    """Send ``files`` to every destination of the job that is due, then settle the job.

    Each destination has its own outbox row (node/outbox.py) with its own tries and
    backoff: one that is down waits or dead-letters alone, the others are served in the
    same pass, and one already served is never sent to again. The job's step keeps the
    served names ("<prefix>sent:a,b") for a quick look.
    """
    outbox = Outbox(store.engine, store.settings)
    step = (job.step or "").removeprefix(step_prefix)
    legacy = set(step.removeprefix("sent:").split(",")) - {""} if step.startswith("sent:") \
        else set()
    deliveries = outbox.ensure(job.id, job.payload.get("destinations", []), legacy)
    now = utcnow()
    for delivery in [d for d in deliveries if d.due(now)]:
        name = delivery.destination
        store.advance(job.id, JobStateValues.DELIVERING, step=_step(step_prefix, deliveries))
        try:
            report = sender.send(settings.destination(name), files)
        except (DeliveryError, ConfigError) as exc:
            retryable = isinstance(exc, DeliveryError) and exc.retryable
            state = outbox.mark_failed(job.id, name, str(exc), retryable=retryable)
            log.warning("job %d: delivery to %s failed (%s): %s", job.id, name, state.value, exc)
            continue
        if report.failed:
            state = outbox.mark_failed(
                job.id, name, f"{len(report.failed)} of {len(files)} refused, first: "
                f"{report.failed[0][1]}", retryable=True)
            log.warning("job %d: %s refused %d object(s) (%s)", job.id, name,
                        len(report.failed), state.value)
            continue
        outbox.mark_sent(job.id, name, report.sent)
        deliveries = outbox.list(job.id)
        log.info("job %d: %d instance(s) sent to %s", job.id, report.sent, name)
        audit.write("delivered", job.study_instance_uid, job=job.id, kind=job.kind,
                    route=job.route, destination=name, instances=report.sent)
    _settle(job, store, outbox.list(job.id), step_prefix)


def _step(prefix: str, deliveries: Sequence[Delivery]) -> str:
    return f"{prefix}sent:" + ",".join(sorted(d.destination for d in deliveries
                                             if d.state is DeliveryStateValues.SENT))


def _settle(job: Job, store: JobStore, deliveries: Sequence[Delivery], prefix: str) -> None:
    """Done when every destination is served; else wait for the next destination due;
    else (nothing left to try) failed, or dead when a destination ran out of tries."""
    step = _step(prefix, deliveries)
    waiting = [d.next_attempt_at or utcnow() for d in deliveries
               if d.state is DeliveryStateValues.PENDING]
    if waiting:
        store.defer(job.id, min(waiting), summary(deliveries), step=step)
    elif all(d.state is DeliveryStateValues.SENT for d in deliveries):
        store.advance(job.id, JobStateValues.DONE, step=step)
    else:
        dead = any(d.state is DeliveryStateValues.DEAD for d in deliveries)
        store.give_up(job.id, JobStateValues.DEAD if dead else JobStateValues.FAILED,
                      summary(deliveries), step=step)
        log.warning("job %d: %s", job.id, summary(deliveries))


def make_forward_handler(engine: Engine, current: Callable[[], Settings],
                         sender: Sender, audit: AuditLog = NO_AUDIT) -> JobHandler:
    """``current`` returns the settings in force (destinations may change on reload)."""

    def handle(job: Job, store: JobStore) -> None:
        settings = current()
        files = job_files(engine, settings.storage.spool, job)
        if not files:
            raise DeliveryError("no instances left in the spool for this job", retryable=False)
        deliver(job, store, files, settings, sender, audit=audit)

    return handle
