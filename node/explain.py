"""`pacsnode route explain`: what every route decides for a study, and why."""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from pydicom.errors import InvalidDicomError
from sqlalchemy.orm import Session

from node.db import open_database
from node.routing import CompiledRoute, Decision, attributes_of, decide, read_series_attributes
from node.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StudyView:
    study_instance_uid: str
    series: tuple[dict[str, Any], ...]


def studies_from_folder(folder: Path) -> tuple[list[StudyView], list[str]]:
    """Group the DICOM files under ``folder`` into studies; returns (studies, skipped)."""
    first: dict[tuple[str, str], tuple[int, dict[str, Any]]] = {}
    counts: dict[tuple[str, str], int] = defaultdict(int)
    skipped: list[str] = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            study, series = str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)
        except (InvalidDicomError, AttributeError, OSError, ValueError, EOFError,
                KeyError, TypeError) as exc:
            skipped.append(f"{path}: {type(exc).__name__}: {exc}")
            continue
        key = (study, series)
        counts[key] += 1
        number = ds.get("InstanceNumber")
        try:
            rank = int(number) if number not in (None, "") else 1 << 30
        except (TypeError, ValueError):
            rank = 1 << 30
        if key not in first or rank < first[key][0]:
            first[key] = (rank, attributes_of(ds))
    by_study: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for key in sorted(first):
        attrs = dict(first[key][1])
        attrs["NumberOfInstances"] = counts[key]
        by_study[key[0]].append(attrs)
    return [StudyView(uid, tuple(s)) for uid, s in by_study.items()], skipped


def study_from_index(settings: Settings, uid: str) -> StudyView | None:
    engine = open_database(settings.storage)
    try:
        with Session(engine) as session:
            series = read_series_attributes(settings.storage.spool, session, uid)
    finally:
        engine.dispose()
    return StudyView(uid, tuple(series)) if series else None


def explain(settings: Settings, study: StudyView) -> dict[str, Any]:
    routes = [CompiledRoute.of(r) for r in settings.routes]
    decisions: list[Decision] = []
    for attrs in study.series:
        decisions += decide(routes, "series", study.series, focus=attrs)
    decisions += decide(routes, "study", study.series)
    return {
        "study_instance_uid": study.study_instance_uid,
        "series": [{"series_instance_uid": s.get("SeriesInstanceUID"),
                    "series_number": s.get("SeriesNumber"), "modality": s.get("Modality"),
                    "series_description": s.get("SeriesDescription"),
                    "instances": s.get("NumberOfInstances")} for s in study.series],
        "decisions": [_decision_dict(d) for d in decisions],
        "jobs": [_would_run(d) for d in decisions if d.fires and d.action != "ignore"],
    }


def _decision_dict(d: Decision) -> dict[str, Any]:
    return {"route": d.route, "level": d.level, "series_instance_uid": d.series_instance_uid,
            "matched": d.matched, "fires": d.fires, "skipped": d.skipped, "reason": d.reason,
            "action": d.action, "models": list(d.models),
            "destinations": list(d.destinations), "priority": d.priority}


def _would_run(d: Decision) -> str:
    target = f"series {d.series_instance_uid}" if d.series_instance_uid else "the study"
    dests = ", ".join(d.destinations) or "no destination"
    if d.action == "run":
        return f"{d.route}: run {', '.join(d.models)} on {target} -> {dests} (priority " \
               f"{d.priority})"
    if d.action == "fetch_priors":
        return f"{d.route}: fetch {d.priors} earlier stud{'y' if d.priors == 1 else 'ies'} " \
               f"of the patient from {d.source} (priority {d.priority})"
    return f"{d.route}: forward {target} unchanged -> {dests} (priority {d.priority})"


def format_explain(report: dict[str, Any]) -> str:
    lines = [f"study {report['study_instance_uid']}"]
    labels = {}
    for s in report["series"]:
        label = f"#{s['series_number']} {s['modality']} ({s['instances']} instances)"
        labels[s["series_instance_uid"]] = label
        lines.append(f"  series {label} {s['series_description'] or ''}".rstrip())
    current = None
    for d in report["decisions"]:
        heading = "study level" if d["level"] == "study" else \
            f"series {labels.get(d['series_instance_uid'], d['series_instance_uid'])}"
        if heading != current:
            lines.append(f"{heading}:")
            current = heading
        mark = "FIRES  " if d["fires"] else "matched" if d["matched"] else "no     "
        note = f" [not fired: {d['skipped']}]" if d["skipped"] else ""
        lines.append(f"  {mark} {d['route']}: {d['reason']}{note}")
    lines.append("would run:" if report["jobs"] else "would run: nothing")
    lines += [f"  {j}" for j in report["jobs"]]
    return "\n".join(lines)
