"""What a failed try leads to, shared by jobs and deliveries: try again after a capped
exponential backoff, or give up (not retryable: failed; out of tries: dead)."""

from __future__ import annotations

import enum
from datetime import datetime, timedelta

from node.intake import utcnow
from node.settings import JobSettings


class OutcomeValues(enum.Enum):
    RETRY = "pending"
    FAILED = "failed"
    DEAD = "dead"


def after_failure(settings: JobSettings, attempts: int, *,
                  retryable: bool) -> tuple[OutcomeValues, datetime | None]:
    """The outcome after ``attempts`` tries, and when to try next (RETRY only):
    retry_base_seconds · 2^(attempts-1), at most retry_max_seconds."""
    if not retryable:
        return OutcomeValues.FAILED, None
    if attempts >= settings.max_attempts:
        return OutcomeValues.DEAD, None
    delay = min(settings.retry_max_seconds,
                settings.retry_base_seconds * 2 ** max(0, attempts - 1))
    return OutcomeValues.RETRY, utcnow() + timedelta(seconds=delay)
