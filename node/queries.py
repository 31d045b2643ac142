"""Read-only views of the index and job table for the CLI and the admin API."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from node.db import InstanceRow, SeriesRow, StudyRow, open_database
from node.jobs import Job
from node.settings import Settings


def list_studies(settings: Settings, *, limit: int = 50) -> list[dict[str, Any]]:
    engine = open_database(settings.storage)
    with Session(engine) as session:
        rows = session.scalars(
            select(StudyRow).order_by(StudyRow.last_received_at.desc()).limit(limit)).all()
        out = []
        for st in rows:
            series = session.scalars(select(SeriesRow).where(
                SeriesRow.study_instance_uid == st.study_instance_uid)).all()
            count = session.scalar(select(func.count()).select_from(InstanceRow).join(SeriesRow)
                                   .where(SeriesRow.study_instance_uid == st.study_instance_uid))
            out.append({
                "study_instance_uid": st.study_instance_uid,
                "study_date": st.study_date,
                "accession_number": st.accession_number,
                "modalities": sorted({s.modality or "?" for s in series}),
                "series": len(series),
                "instances": int(count or 0),
                "state": st.state,
                "generation": st.generation,
                "last_received_at": st.last_received_at.isoformat(),
            })
    engine.dispose()
    return out


def study_detail(settings: Settings, uid: str) -> dict[str, Any] | None:
    engine = open_database(settings.storage)
    with Session(engine) as session:
        st = session.get(StudyRow, uid)
        if st is None:
            return None
        series_out = []
        for s in session.scalars(select(SeriesRow).where(SeriesRow.study_instance_uid == uid)
                                 .order_by(SeriesRow.series_number)):
            count = session.scalar(select(func.count()).select_from(InstanceRow).where(
                InstanceRow.series_instance_uid == s.series_instance_uid))
            series_out.append({
                "series_instance_uid": s.series_instance_uid, "modality": s.modality,
                "series_number": s.series_number, "series_description": s.series_description,
                "instances": int(count or 0), "images_in_acquisition": s.images_in_acquisition,
                "state": s.state, "generation": s.generation,
                "completion_reason": s.completion_reason,
                "calling_ae_title": s.calling_ae_title,
                "first_received_at": s.first_received_at.isoformat(),
                "completed_at": s.completed_at.isoformat() if s.completed_at else None,
            })
        data = {
            "study_instance_uid": st.study_instance_uid, "patient_id": st.patient_id,
            "patient_name": st.patient_name, "study_date": st.study_date,
            "accession_number": st.accession_number, "study_description": st.study_description,
            "state": st.state, "generation": st.generation,
            "completion_reason": st.completion_reason, "series": series_out,
        }
    engine.dispose()
    return data


def job_dict(job: Job) -> dict[str, Any]:
    return {
        "id": job.id, "kind": job.kind, "route": job.route, "state": job.state.value,
        "step": job.step, "priority": job.priority, "attempts": job.attempts,
        "study_instance_uid": job.study_instance_uid,
        "series_instance_uid": job.series_instance_uid, "generation": job.generation,
        "payload": dict(job.payload), "last_error": job.last_error,
        "not_before": job.not_before.isoformat() if job.not_before else None,
        "created_at": job.created_at.isoformat(), "updated_at": job.updated_at.isoformat(),
        "owner": job.owner,
    }


def _table(headers: list[str], rows: list[list[str]]) -> str:
    if not rows:
        return "(none)"
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def format_studies(studies: list[dict[str, Any]]) -> str:
    return _table(["STUDY UID", "DATE", "MODALITIES", "SERIES", "INSTANCES", "STATE"], [
        [s["study_instance_uid"], s["study_date"] or "", ",".join(s["modalities"]),
         str(s["series"]), str(s["instances"]), s["state"]] for s in studies])


def format_study(study: dict[str, Any]) -> str:
    head = (f"study {study['study_instance_uid']}  ({study['state']}, generation "
            f"{study['generation']}, {study['completion_reason'] or 'not complete'})\n"
            f"  patient {study['patient_id']}  date {study['study_date']}  accession "
            f"{study['accession_number']}\n")
    return head + _table(["SERIES UID", "MOD", "NO", "INSTANCES", "STATE", "HOW"], [
        [s["series_instance_uid"], s["modality"] or "", str(s["series_number"] or ""),
         str(s["instances"]), s["state"], s["completion_reason"] or ""]
        for s in study["series"]])


def format_jobs(jobs: list[dict[str, Any]]) -> str:
    return _table(["ID", "KIND", "ROUTE", "STATE", "TRIES", "SERIES/STUDY", "LAST ERROR"], [
        [str(j["id"]), j["kind"], j["route"], j["state"], str(j["attempts"]),
         j["series_instance_uid"] or j["study_instance_uid"], (j["last_error"] or "")[:60]]
        for j in jobs])


def format_job(job: dict[str, Any]) -> str:
    head = "\n".join(f"{k:>20}: {v}" for k, v in job.items() if k != "deliveries")
    deliveries = job.get("deliveries") or []
    if not deliveries:
        return head
    return head + "\n\n" + _table(
        ["DESTINATION", "STATE", "TRIES", "NEXT TRY", "SENT AT", "LAST ERROR"],
        [[d["destination"], d["state"], str(d["attempts"]), d["next_attempt_at"] or "",
          d["sent_at"] or "", (d["last_error"] or "")[:80]] for d in deliveries])
