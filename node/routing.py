"""Routing: turn a completed series or study into jobs.

This is the foundation's matcher: each key of a route's ``match`` table is a DICOM
keyword, compared for equality with the series' value (a list means one-of). The full
condition language (regex, ranges, all/any/not, study-level conditions) comes with the
routing engine issue; it replaces :func:`matches` and keeps :class:`RoutePlanner`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pydicom
from pydicom.errors import InvalidDicomError
from sqlalchemy import select
from sqlalchemy.orm import Session

from node.db import InstanceRow, SeriesRow
from node.domain import CompletedUnit
from node.jobs import JobSpec, JobStore
from node.settings import RouteSettings

log = logging.getLogger(__name__)


def matches(match: dict[str, Any], attributes: dict[str, Any]) -> bool:
    for keyword, wanted in match.items():
        seen = attributes.get(keyword)
        if seen is None:
            return False
        options = wanted if isinstance(wanted, list) else [wanted]
        seen_values = [str(v) for v in seen] if isinstance(seen, list) else [str(seen)]
        if not any(str(o) in seen_values for o in options):
            return False
    return True


def series_attributes(spool_root: Path, session: Session, series_uid: str) -> dict[str, Any]:
    """Attributes of a series, taken from one of its instances (no pixel data read)."""
    rel = session.scalar(
        select(InstanceRow.path).where(InstanceRow.series_instance_uid == series_uid)
        .order_by(InstanceRow.instance_number).limit(1)
    )
    if rel is None:
        return {}
    try:
        ds = pydicom.dcmread(spool_root / rel, stop_before_pixels=True, force=True)
    except (OSError, InvalidDicomError, ValueError) as exc:
        log.warning("series %s: cannot read attributes for routing: %s", series_uid, exc)
        return {}
    out: dict[str, Any] = {}
    for elem in ds:
        if elem.keyword and elem.VR != "SQ":
            value = elem.value
            out[elem.keyword] = list(value) if isinstance(value, pydicom.multival.MultiValue) \
                else value
    return out


class RoutePlanner:
    def __init__(self, routes: Sequence[RouteSettings], jobs: JobStore, spool_root: Path) -> None:
        self.routes = tuple(routes)
        self.jobs = jobs
        self.spool_root = spool_root

    def plan(self, session: Session, unit: CompletedUnit) -> None:
        if unit.level == "series" and unit.series_instance_uid:
            candidates = [unit.series_instance_uid]
        else:
            candidates = list(session.scalars(
                select(SeriesRow.series_instance_uid)
                .where(SeriesRow.study_instance_uid == unit.study_instance_uid)
            ))
        attrs = {uid: series_attributes(self.spool_root, session, uid) for uid in candidates}
        for route in self.routes:
            if route.level != unit.level:
                continue
            hits = [uid for uid in candidates if matches(route.match, attrs[uid])]
            if not hits:
                continue
            self._add_jobs(session, route, unit)
            if route.stop:
                break

    def _add_jobs(self, session: Session, route: RouteSettings, unit: CompletedUnit) -> None:
        uid = unit.series_instance_uid or unit.study_instance_uid
        base = f"{route.name}:{unit.level}:{uid}:g{unit.generation}"
        specs: list[JobSpec] = []
        for model in route.models:
            specs.append(JobSpec(f"{base}:infer:{model}", "infer", route.name,
                                 unit.study_instance_uid, unit.series_instance_uid,
                                 unit.generation,
                                 {"model": model, "destinations": list(route.destinations),
                                  "level": unit.level}, route.priority))
        if not route.models and route.destinations:
            specs.append(JobSpec(f"{base}:forward", "forward", route.name,
                                 unit.study_instance_uid, unit.series_instance_uid,
                                 unit.generation,
                                 {"destinations": list(route.destinations), "level": unit.level},
                                 route.priority))
        for spec in specs:
            if self.jobs.add(session, spec):
                log.info("route %s: job %s queued", route.name, spec.key)
