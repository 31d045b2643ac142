"""The outbox: per-destination delivery state of a job, each destination on its own.

A job that sends to several destinations has one ``deliveries`` row per destination:
pending → sent, or failed (not retryable: refused for good) / dead (out of tries). Each
row counts its own attempts and waits its own capped exponential backoff
(``[jobs]`` retry_base_seconds · 2^(attempts-1), at most retry_max_seconds), and is
dead-lettered with its reason after ``max_attempts`` tries, so a destination that is
down never delays or dead-letters the others. ``pacsnode jobs retry`` puts only the
failed and dead rows back (:meth:`node.jobs.JobStore.retry`); the sent ones are never
sent again.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from node.backoff import after_failure
from node.db import DeliveryRow
from node.intake import utcnow
from node.settings import JobSettings


class DeliveryStateValues(enum.Enum):
    PENDING = "pending"
    SENT = "sent"
    FAILED = "failed"
    DEAD = "dead"


@dataclass(frozen=True)
class Delivery:
    job_id: int
    destination: str
    state: DeliveryStateValues
    attempts: int
    last_error: str | None
    next_attempt_at: datetime | None
    sent_at: datetime | None
    instances: int

    @classmethod
    def from_row(cls, row: DeliveryRow) -> Delivery:
        return cls(row.job_id, row.destination, DeliveryStateValues(row.state), row.attempts,
                   row.last_error, row.next_attempt_at, row.sent_at, row.instances)

    def due(self, now: datetime) -> bool:
        return self.state is DeliveryStateValues.PENDING and (
            self.next_attempt_at is None or self.next_attempt_at <= now)

    def as_dict(self) -> dict[str, Any]:
        return {"destination": self.destination, "state": self.state.value,
                "attempts": self.attempts, "last_error": self.last_error,
                "next_attempt_at": self.next_attempt_at.isoformat()
                if self.next_attempt_at else None,
                "sent_at": self.sent_at.isoformat() if self.sent_at else None,
                "instances": self.instances}


class Outbox:
    def __init__(self, engine: Engine, settings: JobSettings) -> None:
        self.engine = engine
        self.settings = settings

    def ensure(self, job_id: int, destinations: Iterable[str],
               already_sent: Iterable[str] = ()) -> list[Delivery]:
        """Rows for every destination of the job (new ones pending; names in
        ``already_sent``, from a job step written before the outbox existed, as sent)."""
        sent = set(already_sent)
        now = utcnow()
        with Session(self.engine) as session, session.begin():
            have = set(session.scalars(select(DeliveryRow.destination)
                                       .where(DeliveryRow.job_id == job_id)))
            for name in dict.fromkeys(destinations):
                if name in have:
                    continue
                done = name in sent
                session.add(DeliveryRow(
                    job_id=job_id, destination=name, attempts=0, instances=0,
                    state=(DeliveryStateValues.SENT if done else DeliveryStateValues.PENDING
                           ).value, sent_at=now if done else None,
                    created_at=now, updated_at=now))
        return self.list(job_id)

    def list(self, job_id: int) -> list[Delivery]:
        with Session(self.engine) as session:
            rows = session.scalars(select(DeliveryRow).where(DeliveryRow.job_id == job_id)
                                   .order_by(DeliveryRow.id))
            return [Delivery.from_row(r) for r in rows]

    def mark_sent(self, job_id: int, destination: str, instances: int) -> None:
        with Session(self.engine) as session, session.begin():
            row = self._row(session, job_id, destination)
            row.state = DeliveryStateValues.SENT.value
            row.attempts += 1
            row.instances = instances
            row.sent_at = row.updated_at = utcnow()
            row.last_error = None
            row.next_attempt_at = None

    def mark_failed(self, job_id: int, destination: str, error: str, *,
                    retryable: bool) -> DeliveryStateValues:
        """Count the try; wait the backoff, or give up (failed / dead) with the reason."""
        with Session(self.engine) as session, session.begin():
            row = self._row(session, job_id, destination)
            row.attempts += 1
            outcome, when = after_failure(self.settings, row.attempts, retryable=retryable)
            state = DeliveryStateValues(outcome.value)
            row.next_attempt_at = when
            row.state = state.value
            row.last_error = error
            row.updated_at = utcnow()
        return state

    @staticmethod
    def _row(session: Session, job_id: int, destination: str) -> DeliveryRow:
        row = session.scalars(select(DeliveryRow).where(
            DeliveryRow.job_id == job_id, DeliveryRow.destination == destination)).one()
        return row


def summary(deliveries: Sequence[Delivery]) -> str:
    """One line per destination not (yet) served, for the job's last_error."""
    return "; ".join(f"{d.destination} {d.state.value} after {d.attempts} tries: "
                     f"{d.last_error}" for d in deliveries
                     if d.state is not DeliveryStateValues.SENT and d.last_error)
