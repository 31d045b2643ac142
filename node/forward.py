"""The ``forward`` job: send a completed series or study unchanged to destinations.

Destinations already served are remembered in the job's ``step`` ("sent:a,b"), so a
retry after a failure or a crash sends only to the ones still owed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

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


def make_forward_handler(engine: Engine, current: Callable[[], Settings],
                         sender: Sender) -> JobHandler:
    """``current`` returns the settings in force (destinations may change on reload)."""

    def handle(job: Job, store: JobStore) -> None:
        settings = current()
        spool_root = settings.storage.spool
        sent = set((job.step or "").removeprefix("sent:").split(",")) - {""}
        files = job_files(engine, spool_root, job)
        if not files:
            raise DeliveryError("no instances left in the spool for this job", retryable=False)
        owed = [d for d in job.payload.get("destinations", []) if d not in sent]
        failures: list[str] = []
        for name in owed:
            store.advance(job.id, JobStateValues.DELIVERING, step="sent:" + ",".join(sorted(sent)))
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
        store.advance(job.id, JobStateValues.DELIVERING, step="sent:" + ",".join(sorted(sent)))
        if failures:
            raise DeliveryError("; ".join(failures), retryable=True)
        store.advance(job.id, JobStateValues.DONE, step="sent:" + ",".join(sorted(sent)))

    return handle
