"""Assembly: decide when a series, and a study, is complete.

Three ways to complete (see ``CompletionReasonValues``):

- fast path: the association that carried a series is released and the series is
  provably complete: the InstanceNumbers are contiguous, the slice positions along the
  normal are evenly spaced in one orientation, and either the instance count equals
  ImagesInAcquisition or that one association carried every instance the series has.
  Geometry alone proves nothing about instances that came over several associations: a
  sender that opens one association per instance has, after its second, two contiguous,
  evenly spaced slices (and a series split over parallel associations has a contiguous
  first part), so such a series waits for its count or its quiet period;
- quiet: nothing new arrived for the quiet period;
- deadline: a hard limit after the first instance, so a trickling sender cannot hold a
  series open for ever.

An instance arriving after completion reopens the unit with the next generation (a
follow-up; see node/intake.py). Completion and the jobs it creates are committed in one
transaction, so a crash can lose neither.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from sqlalchemy import Engine, Select, bindparam, func, or_, select
from sqlalchemy.orm import Session

from node.db import InstanceRow, SeriesRow, StudyRow, begin_write
from node.domain import CompletedUnit, CompletionReasonValues, UnitStateValues
from node.intake import utcnow
from node.settings import AssemblySettings

log = logging.getLogger(__name__)

RECEIVING = UnitStateValues.RECEIVING.value
COMPLETE = UnitStateValues.COMPLETE.value
# Several receivers may share one PostgreSQL index: each locks the units it completes and
# skips those another holds, so a unit is completed (and its jobs planned) once. SQLite
# has one writer at a time and ignores the clause.
_LOCK = {"skip_locked": True}



def _past_due(model: type[SeriesRow] | type[StudyRow]) -> Select[str]:
    """Whether tick() may have work, asked without the intake lock and without ORM
    objects: a receiving series or study past its quiet period or its deadline. (For a
    study this ignores whether series are still open: it can say yes in vain, never no
    in vain.) Built once: building statements costs more than running them."""
    return (
        select(model.state)
        .where(model.state == RECEIVING,
               or_(model.last_received_at <= bindparam("quiet"),
                   model.first_received_at <= bindparam("deadline")))
        .limit(1)
    )


_DUE_SERIES = _past_due(SeriesRow)
_DUE_STUDY = _past_due(StudyRow)
# A released series' state, ImagesInAcquisition and instance count, for the look before
# the write lock (on_association_released).
_SERIES_COUNT = (
    select(SeriesRow.state, SeriesRow.images_in_acquisition,
           select(func.count()).where(InstanceRow.series_instance_uid
                                      == SeriesRow.series_instance_uid).scalar_subquery())
    .where(SeriesRow.series_instance_uid == bindparam("uid"))
)


class Planner(Protocol):
    """Called inside the completing transaction: turn a completed unit into jobs."""

    def plan(self, session: Session, unit: CompletedUnit) -> None: ...


@dataclass(frozen=True)
class Verdict:
    complete: bool
    reason: str


def counts_rule_out(n: int, *, images_in_acquisition: int | None, carried: int) -> str | None:
    """Why a series of ``n`` instances cannot be proven complete by its counts alone, or
    None when the counts allow it (the geometry decides)."""
    if n == 0:
        return "no instances"
    if images_in_acquisition and n != images_in_acquisition:
        return f"{n} of {images_in_acquisition} instances (ImagesInAcquisition)"
    if not images_in_acquisition and carried < n:
        return (f"the association carried {carried} of its {n} instances and there is no "
                "ImagesInAcquisition to count them against")
    return None


def check_series(
    rows: Iterable[tuple[int | None, float | None, float | None, float | None, str | None]],
    *,
    images_in_acquisition: int | None,
    tolerance: float,
    carried: int,
) -> Verdict:
    """Is a series provably complete? ``rows``: (InstanceNumber, x, y, z, orientation);
    ``carried``: how many distinct instances of it the released association carried
    (0: not known)."""
    items = list(rows)
    n = len(items)
    ruled_out = counts_rule_out(n, images_in_acquisition=images_in_acquisition,
                                carried=carried)
    if ruled_out is not None:
        return Verdict(False, ruled_out)
    numbers = [r[0] for r in items]
    if any(v is None for v in numbers):
        return Verdict(False, "an instance has no InstanceNumber")
    ints = sorted(v for v in numbers if v is not None)
    if len(set(ints)) != n or ints[-1] - ints[0] + 1 != n:
        return Verdict(False, f"InstanceNumbers {ints[0]}..{ints[-1]} are not contiguous for {n}")
    if n == 1:
        if images_in_acquisition == 1:
            return Verdict(True, "single instance, ImagesInAcquisition 1")
        return Verdict(False, "a single instance cannot prove a series complete")
    orientations = {r[4] for r in items}
    if None in orientations or len(orientations) != 1:
        return Verdict(False, "missing or mixed ImageOrientationPatient")
    if any(r[1] is None or r[2] is None or r[3] is None for r in items):
        return Verdict(False, "an instance has no ImagePositionPatient")
    o = [float(v) for v in str(next(iter(orientations))).split("\\")]
    normal = (o[1] * o[5] - o[2] * o[4], o[2] * o[3] - o[0] * o[5], o[0] * o[4] - o[1] * o[3])
    dist = sorted(
        normal[0] * r[1] + normal[1] * r[2] + normal[2] * r[3]  # type: ignore[operator]  # None excluded above
        for r in items
    )
    gaps = [b - a for a, b in zip(dist, dist[1:])]
    step = sorted(gaps)[len(gaps) // 2]
    if step <= 1e-6:
        return Verdict(False, "several instances share one slice position")
    worst = max(abs(g - step) for g in gaps)
    if worst > tolerance * step:
        return Verdict(False, f"slice spacing uneven (step {step:.3f} mm, off by {worst:.3f} mm)")
    return Verdict(True, f"{n} instances, contiguous, spacing {step:.3f} mm")


class Assembly:
    def __init__(
        self,
        engine: Engine,
        settings: AssemblySettings,
        planner: Planner,
        *,
        lock: threading.Lock | None = None,
    ) -> None:
        self.engine = engine
        self.settings = settings
        self.planner = planner
        self._lock = lock or threading.Lock()

    def on_association_released(self, carried: Mapping[str, int]) -> list[CompletedUnit]:
        """Fast path: complete the series this association carried that are provably
        whole. ``carried``: series UID -> distinct instances of it the association (or
        STOW-RS request, or pull) carried; 0 where that is not known."""
        if not self.settings.fast_path:
            return []
        done: list[CompletedUnit] = []
        candidates = self._worth_a_look(carried)
        if not candidates:
            return done
        with self._lock, Session(self.engine) as session, session.begin():
            begin_write(session.connection())   # listener processes write beside us
            studies: set[str] = set()
            for uid in sorted(candidates):
                series = session.get(SeriesRow, uid, with_for_update=_LOCK)
                if series is None or series.state != RECEIVING:
                    continue
                studies.add(series.study_instance_uid)
                verdict = self._verdict(session, series, carried[uid])
                if verdict.complete:
                    done.append(self._complete_series(session, series,
                                                      CompletionReasonValues.FAST_PATH))
                else:
                    self._log_waiting(uid, verdict.reason)
            for study_uid in sorted(studies):
                study = session.get(StudyRow, study_uid, with_for_update=_LOCK)
                members = session.scalars(
                    select(SeriesRow).where(SeriesRow.study_instance_uid == study_uid)
                ).all()
                if (study is not None and study.state == RECEIVING
                        and all(s.state == COMPLETE for s in members)
                        and {s.series_instance_uid for s in members} <= carried.keys()):
                    done.append(self._complete_study(session, study,
                                                     CompletionReasonValues.FAST_PATH))
        return done

    def _worth_a_look(self, carried: Mapping[str, int]) -> set[str]:
        """The released series, still receiving, whose counts allow a proof; asked
        before the write lock, which the intake of every listener process waits for
        while it is held. Those the counts rule out are logged and need no locked look:
        for them to become provable, more instances must arrive, and the release that
        brings them looks again (the quiet period remains in any case). A study can only
        complete here with all its series, so it needs one of these too."""
        worth: set[str] = set()
        with self.engine.connect() as conn:
            for uid in sorted(carried):
                row = conn.execute(_SERIES_COUNT, {"uid": uid}).first()
                if row is None or row[0] != RECEIVING:
                    continue
                ruled_out = counts_rule_out(int(row[2]), images_in_acquisition=row[1],
                                            carried=carried[uid])
                if ruled_out is None:
                    worth.add(uid)
                else:
                    self._log_waiting(uid, ruled_out)
        return worth

    def _log_waiting(self, uid: str, reason: str) -> None:
        log.info("series %s not provably complete at release (%s); waiting %.1f s",
                 uid, reason, self.settings.series_quiet_seconds)

    def tick(self, now: datetime | None = None) -> list[CompletedUnit]:
        """Complete what has been quiet long enough or passed its hard deadline."""
        now = now or utcnow()
        cfg = self.settings
        quiet = now - timedelta(seconds=cfg.series_quiet_seconds)
        study_quiet = now - timedelta(seconds=cfg.study_quiet_seconds)
        deadline = now - timedelta(seconds=cfg.hard_deadline_seconds)
        done: list[CompletedUnit] = []
        with self.engine.connect() as conn:
            due = (conn.scalar(_DUE_SERIES, {"quiet": quiet, "deadline": deadline}) is not None
                   or conn.scalar(_DUE_STUDY, {"quiet": study_quiet, "deadline": deadline})
                   is not None)
        if not due:
            return done  # the common case while instances stream in
        with self._lock, Session(self.engine) as session, session.begin():
            begin_write(session.connection())
            for series in session.scalars(
                select(SeriesRow).where(SeriesRow.state == RECEIVING)
                .with_for_update(skip_locked=True)
            ):
                if series.first_received_at <= deadline:
                    done.append(self._complete_series(session, series,
                                                      CompletionReasonValues.DEADLINE))
                elif series.last_received_at <= quiet:
                    done.append(self._complete_series(session, series,
                                                      CompletionReasonValues.QUIET))
            for study in session.scalars(select(StudyRow).where(StudyRow.state == RECEIVING)
                                         .with_for_update(skip_locked=True)):
                open_series = session.scalars(
                    select(SeriesRow).where(
                        SeriesRow.study_instance_uid == study.study_instance_uid,
                        SeriesRow.state == RECEIVING,
                    )
                ).first()
                if study.first_received_at <= deadline:
                    done.append(self._complete_study(session, study,
                                                     CompletionReasonValues.DEADLINE))
                elif open_series is None and study.last_received_at <= study_quiet:
                    done.append(self._complete_study(session, study, CompletionReasonValues.QUIET))
        return done

    def _verdict(self, session: Session, series: SeriesRow, carried: int) -> Verdict:
        rows = session.execute(
            select(InstanceRow.instance_number, InstanceRow.position_x, InstanceRow.position_y,
                   InstanceRow.position_z, InstanceRow.orientation)
            .where(InstanceRow.series_instance_uid == series.series_instance_uid)
        ).all()
        return check_series(rows, images_in_acquisition=series.images_in_acquisition,
                            tolerance=self.settings.slice_spacing_tolerance, carried=carried)

    def _complete_series(
        self, session: Session, series: SeriesRow, reason: CompletionReasonValues
    ) -> CompletedUnit:
        now = utcnow()
        series.state = COMPLETE
        series.completed_at = now
        series.completion_reason = reason.value
        unit = CompletedUnit("series", series.study_instance_uid, series.series_instance_uid,
                             series.generation, reason, now)
        log.info("series %s complete (%s, generation %d)", series.series_instance_uid,
                 reason.value, series.generation)
        self.planner.plan(session, unit)
        return unit

    def _complete_study(
        self, session: Session, study: StudyRow, reason: CompletionReasonValues
    ) -> CompletedUnit:
        now = utcnow()
        if reason is CompletionReasonValues.DEADLINE:
            for series in session.scalars(select(SeriesRow).where(
                    SeriesRow.study_instance_uid == study.study_instance_uid,
                    SeriesRow.state == RECEIVING)):
                self._complete_series(session, series, reason)
        study.state = COMPLETE
        study.completed_at = now
        study.completion_reason = reason.value
        unit = CompletedUnit("study", study.study_instance_uid, None, study.generation, reason, now)
        log.info("study %s complete (%s, generation %d)", study.study_instance_uid,
                 reason.value, study.generation)
        self.planner.plan(session, unit)
        return unit
