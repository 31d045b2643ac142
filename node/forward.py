"""The ``forward`` job: send a completed series or study unchanged to destinations.

Destinations already served are remembered in the job's ``step`` ("sent:a,b"), so a
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
from node.errors import DeliveryError
from node.jobs import Job, JobHandler, JobStateValues, JobStore
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
    """Send ``files`` to every destination of the job not yet served, then mark it done.

    The destinations served so far are kept in the job's step ("<prefix>sent:a,b"), so a
    retry after a failure or a crash sends only to the ones still owed; one destination
    being down blocks neither the others nor intake.
    """
    step = (job.step or "").removeprefix(step_prefix)
    sent = set(step.removeprefix("sent:").split(",")) - {""} if step.startswith("sent:") \
        else set()

    def mark(state: JobStateValues) -> None:
        store.advance(job.id, state, step=f"{step_prefix}sent:" + ",".join(sorted(sent)))

    failures: list[str] = []
    for name in [d for d in job.payload.get("destinations", []) if d not in sent]:
        mark(JobStateValues.DELIVERING)
        try:
            report = sender.send(settings.destination(name), files)
        except DeliveryError as exc:
            failures.append(f"{name}: {exc}")
            if not exc.retryable:
                raise
            continue
        if report.failed:
            failures.append(f"{name}: {len(report.failed)} of {len(files)} refused, "
                            f"first: {report.failed[0][1]}")
            continue
        sent.add(name)
        log.info("job %d: %d instance(s) sent to %s", job.id, report.sent, name)
        audit.write("delivered", job.study_instance_uid, job=job.id, kind=job.kind,
                    route=job.route, destination=name, instances=report.sent)
    if failures:
        mark(JobStateValues.DELIVERING)
        raise DeliveryError("; ".join(failures), retryable=True)
    mark(JobStateValues.DONE)


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
