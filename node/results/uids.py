"""Deterministic UIDs for result objects, so that a resend is idempotent on the PACS.

Each UID is a "2.25" UID made of a name-based (SHA-1, version 5) UUID (PS3.5 B.2) of the
parts that identify the object: the job key, the model and its version. The same job
written again gives the same SeriesInstanceUID and SOPInstanceUID, so the PACS sees the
same instance twice instead of a duplicate; a new job key or model version gives new ones.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:pacsnode:results")
_MAX_UID_LENGTH = 64  # PS3.5 9.1


def derive_uid(*parts: str) -> str:
    """A "2.25.<decimal UUID>" UID (at most 44 characters) from ``parts``.

    Parts are length-prefixed before they are joined, so ("a|b", "c") and ("a", "b|c")
    give different UIDs.
    """
    if not parts:
        raise ValueError("derive_uid: expected at least one part, got none")
    bad = [p for p in parts if not isinstance(p, str)]
    if bad:
        raise TypeError(f"derive_uid: expected str parts, got {bad!r}")
    name = "|".join(f"{len(p)}:{p}" for p in parts)
    uid = f"2.25.{uuid.uuid5(_NAMESPACE, name).int}"
    assert len(uid) <= _MAX_UID_LENGTH
    return uid


@dataclass(frozen=True)
class ResultUids:
    """The UIDs of the SEG and SR written for one job and one model version."""

    seg_series: str
    seg_instance: str
    sr_series: str
    sr_instance: str
    device_observer: str

    @classmethod
    def for_job(cls, job_key: str, model: str, version: str) -> ResultUids:
        if not job_key:
            raise ValueError("job_key: expected a non-empty string, got ''")
        return cls(
            seg_series=derive_uid("seg-series", job_key, model, version),
            seg_instance=derive_uid("seg-instance", job_key, model, version),
            sr_series=derive_uid("sr-series", job_key, model, version),
            sr_instance=derive_uid("sr-instance", job_key, model, version),
            device_observer=derive_uid("device", model, version),
        )


def tracking_uid(job_key: str, model: str, version: str, label_value: int) -> str:
    """TrackingUID shared by a SEG segment and the SR measurement group about it."""
    return derive_uid("tracking", job_key, model, version, str(label_value))
