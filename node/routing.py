"""Routing: decide, from a completed series' or study's own attributes, what runs.

Routes are evaluated in their configured order (see node/rules.py for the condition
language). Every matching route fires unless one says ``stop = true``; ``fallback``
routes fire only when no other route of the same level matched. A series-level route
looks at the completed series; a study-level route matches when some series of the
study satisfies ``match`` (``has_series``/``no_series`` say more), and may ``select``
the one series its model gets.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from node.audit import NO_AUDIT, AuditLog
from node.db import InstanceRow, SeriesRow, StudyRow
from node.domain import CompletedUnit
from node.jobs import JobSpec, JobStore
from node.rules import (
    Attributes,
    Condition,
    Selector,
    Subject,
    compile_condition,
    compile_selector,
)
from node.settings import ModelSettings, RouteSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CompiledRoute:
    settings: RouteSettings
    match: Condition
    select: Selector | None

    @classmethod
    def of(cls, route: RouteSettings) -> CompiledRoute:
        selector = compile_selector(route.select) if route.select is not None else None
        return cls(route, compile_condition(route.match), selector)


@dataclass(frozen=True)
class Decision:
    """One route's verdict for one unit, with the reason an admin can read."""

    route: str
    level: str
    matched: bool
    reason: str
    action: str
    models: tuple[str, ...] = ()
    destinations: tuple[str, ...] = ()
    priority: int = 50
    wait_seconds: float = 0.0
    series_instance_uid: str | None = None       # the series the job works on, if one
    source: str | None = None                    # fetch_priors: where from
    priors: int = 1
    skipped: str | None = None                   # why a matching route did not fire
    notes: tuple[str, ...] = field(default=())

    @property
    def fires(self) -> bool:
        return self.matched and self.skipped is None


def plain(value: Any) -> Any:
    """A pydicom value as str/int/float or a list of them (None for binary values)."""
    if isinstance(value, (bytes, bytearray, Dataset)):
        return None
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        return [plain(v) for v in value]
    if isinstance(value, int):          # IS values too
        return int(value)
    if isinstance(value, float):        # DS values too
        return float(value)
    return str(value)


def attributes_of(ds: Dataset, **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for elem in ds:
        if elem.keyword and elem.VR not in ("SQ", "OB", "OW", "OF", "OD", "OL", "UN"):
            value = plain(elem.value)
            if value is not None:
                out[elem.keyword] = value
    out.update({k: v for k, v in extra.items() if v is not None})
    return out


def decide(routes: Sequence[CompiledRoute], level: str, series: Sequence[Attributes], *,
           focus: Attributes | None = None) -> list[Decision]:
    """Evaluate every route of ``level``; ``focus`` is the completed series (series level)."""
    study = tuple(series)
    decisions: list[Decision] = []
    stopped_by: str | None = None
    for compiled in routes:
        route = compiled.settings
        if route.level != level or route.fallback:
            continue
        decision = _evaluate(compiled, study, focus)
        if decision.matched and stopped_by is not None:
            decision = _with(decision, skipped=f"an earlier route ({stopped_by}) has stop = true")
        decisions.append(decision)
        if decision.fires and route.stop:
            stopped_by = route.name
    matched_any = any(d.matched for d in decisions)
    for compiled in routes:
        route = compiled.settings
        if route.level != level or not route.fallback:
            continue
        decision = _evaluate(compiled, study, focus)
        if decision.matched and matched_any:
            decision = _with(decision, skipped="fallback: another route matched")
        decisions.append(decision)
    return decisions


def _with(decision: Decision, *, skipped: str) -> Decision:
    return dataclasses.replace(decision, skipped=skipped)


def _decision(route: RouteSettings, matched: bool, reason: str,
              series_instance_uid: str | None = None) -> Decision:
    return Decision(route=route.name, level=route.level, matched=matched, reason=reason,
                    action=route.effective_action, models=route.models,
                    destinations=route.destinations, priority=route.priority,
                    source=route.source, priors=route.priors,
                    wait_seconds=route.wait_seconds, series_instance_uid=series_instance_uid)


def _evaluate(compiled: CompiledRoute, study: tuple[Attributes, ...],
              focus: Attributes | None) -> Decision:
    route = compiled.settings
    if route.level == "series":
        if focus is None:
            raise ValueError("a series-level decision needs the completed series")
        out = compiled.match.evaluate(Subject(focus, study))
        return _decision(route, out.ok, out.reason,
                         str(focus.get("SeriesInstanceUID", "")) or None)
    failures = []
    for attrs in study:
        out = compiled.match.evaluate(Subject(attrs, study))
        if out.ok:
            break
        failures.append(f"series {attrs.get('SeriesNumber', '?')} "
                        f"({attrs.get('Modality', '?')}): {out.reason}")
    else:
        return _decision(route, False, "; ".join(failures) or "the study has no series")
    if compiled.select is None:
        return _decision(route, True, out.reason)
    chosen, why = compiled.select.choose(study)
    if chosen is None:
        return _decision(route, False, f"{out.reason}; but {why}")
    return _decision(route, True, f"{out.reason}; {why}", str(chosen.get("SeriesInstanceUID")))


def job_specs(decisions: Iterable[Decision], unit: CompletedUnit,
              queues: Mapping[str, str] | None = None) -> list[JobSpec]:
    """``queues``: model name → the device queue its worker claims (default "default")."""
    specs: list[JobSpec] = []
    for d in decisions:
        if not d.fires or d.action == "ignore":
            continue
        target = d.series_instance_uid      # None: the whole study
        base = f"{d.route}:{unit.level}:{target or unit.study_instance_uid}:g{unit.generation}"
        payload = {"destinations": list(d.destinations), "level": unit.level}
        if d.action == "run":
            for model in d.models:
                specs.append(JobSpec(f"{base}:infer:{model}", "infer", d.route,
                                     unit.study_instance_uid, target, unit.generation,
                                     {**payload, "model": model}, d.priority, d.wait_seconds,
                                     (queues or {}).get(model, "default")))
        elif d.action == "fetch_priors":
            specs.append(JobSpec(f"{base}:fetch_priors", "fetch_priors", d.route,
                                 unit.study_instance_uid, None, unit.generation,
                                 {"source": d.source, "priors": d.priors}, d.priority,
                                 d.wait_seconds))
        else:
            specs.append(JobSpec(f"{base}:forward", "forward", d.route,
                                 unit.study_instance_uid, target, unit.generation,
                                 payload, d.priority, d.wait_seconds))
    return specs


def read_series_attributes(spool_root: Path, session: Session,
                           study_uid: str) -> list[dict[str, Any]]:
    """One attribute set per series of a study: the header of its first instance (by
    InstanceNumber), plus how it arrived and how many instances it has."""
    out = []
    for row in session.scalars(select(SeriesRow).where(SeriesRow.study_instance_uid == study_uid)
                               .order_by(SeriesRow.series_number, SeriesRow.series_instance_uid)):
        uid = row.series_instance_uid
        count = session.scalar(select(func.count()).select_from(InstanceRow)
                               .where(InstanceRow.series_instance_uid == uid))
        rel = session.scalar(select(InstanceRow.path).where(InstanceRow.series_instance_uid == uid)
                             .order_by(InstanceRow.instance_number).limit(1))
        extra = {"CallingAETitle": row.calling_ae_title, "CalledAETitle": row.called_ae_title,
                 "SourceAddress": row.source_address, "NumberOfInstances": int(count or 0)}
        attrs: dict[str, Any] = {"SeriesInstanceUID": uid, "Modality": row.modality}
        if rel is not None:
            try:
                ds = pydicom.dcmread(spool_root / rel, stop_before_pixels=True, force=True)
                attrs = attributes_of(ds)
            except (OSError, InvalidDicomError, ValueError) as exc:
                log.warning("series %s: cannot read attributes for routing: %s", uid, exc)
        attrs.update({k: v for k, v in extra.items() if v is not None})
        out.append(attrs)
    return out


class RoutePlanner:
    """Called by assembly inside the completing transaction; turns decisions into jobs."""

    def __init__(self, routes: Sequence[RouteSettings], jobs: JobStore, spool_root: Path,
                 models: Sequence[ModelSettings] = (), audit: AuditLog = NO_AUDIT) -> None:
        self.audit = audit
        self.routes = tuple(CompiledRoute.of(r) for r in routes)
        self.queues = {m.name: m.device for m in models}
        self.jobs = jobs
        self.spool_root = spool_root

    def replace_routes(self, routes: Sequence[RouteSettings],
                       models: Sequence[ModelSettings] = ()) -> None:
        """Swap the rule set at once (reload); a plan in progress keeps the old one."""
        self.routes = tuple(CompiledRoute.of(r) for r in routes)
        self.queues = {m.name: m.device for m in models}

    def plan(self, session: Session, unit: CompletedUnit) -> None:
        self._audit_received(session, unit)
        routes = self.routes
        if not any(r.settings.level == unit.level for r in routes):
            return
        series = read_series_attributes(self.spool_root, session, unit.study_instance_uid)
        focus = None
        if unit.level == "series":
            focus = next((s for s in series
                          if s.get("SeriesInstanceUID") == unit.series_instance_uid), None)
            if focus is None:
                return
        decisions = decide(routes, unit.level, series, focus=focus)
        specs = job_specs(decisions, unit, self.queues)
        self.audit.write("routed", unit.study_instance_uid, level=unit.level,
                         series_instance_uid=unit.series_instance_uid,
                         generation=unit.generation,
                         routes=[d.route for d in decisions if d.fires],
                         jobs=[s.key for s in specs])
        for spec in specs:
            if self.jobs.add(session, spec):
                log.info("route %s: job %s queued", spec.route, spec.key)
        if not specs:
            ignored = [d.route for d in decisions if d.fires]
            log.info("%s %s: no job (%s)", unit.level,
                     unit.series_instance_uid or unit.study_instance_uid,
                     f"ignored by {', '.join(ignored)}" if ignored else "no route fired")

    def _audit_received(self, session: Session, unit: CompletedUnit) -> None:
        study = session.get(StudyRow, unit.study_instance_uid)
        fields: dict[str, Any] = {"level": unit.level, "generation": unit.generation,
                                  "completion": unit.reason.value}
        if study is not None:
            fields.update(patient_id=study.patient_id, patient_name=study.patient_name,
                          patient_birth_date=study.patient_birth_date,
                          accession_number=study.accession_number)
        if unit.series_instance_uid:
            series = session.get(SeriesRow, unit.series_instance_uid)
            count = session.scalar(select(func.count()).select_from(InstanceRow).where(
                InstanceRow.series_instance_uid == unit.series_instance_uid))
            fields.update(series_instance_uid=unit.series_instance_uid, instances=count,
                          modality=series.modality if series else None,
                          calling_ae_title=series.calling_ae_title if series else None)
        self.audit.write("received", unit.study_instance_uid, **fields)
