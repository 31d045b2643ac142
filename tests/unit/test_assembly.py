from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from sqlalchemy.orm import Session

from node.assembly import check_series
from node.db import SeriesRow, StudyRow
from node.domain import CompletedUnit, CompletionReasonValues
from node.intake import utcnow
from tests.unit.helpers import Rig, encode, small_series

AXIAL = "1.000000\\0.000000\\0.000000\\0.000000\\1.000000\\0.000000"


def _rows(n: int, step: float = 2.0, start: int = 1) -> list[tuple[int | None, float | None,
                                                                   float | None, float | None,
                                                                   str | None]]:
    return [(start + i, 0.0, 0.0, i * step, AXIAL) for i in range(n)]


def test_contiguous_evenly_spaced_series_is_complete() -> None:
    assert check_series(_rows(10), images_in_acquisition=10,
                        tolerance=0.05, carried=10).complete
    assert check_series(_rows(10), images_in_acquisition=None,
                        tolerance=0.05, carried=10).complete


def test_count_below_images_in_acquisition_is_not_complete() -> None:
    verdict = check_series(_rows(9), images_in_acquisition=10,
                        tolerance=0.05, carried=9)
    assert not verdict.complete and "9 of 10" in verdict.reason


def test_gap_in_instance_numbers_is_not_complete() -> None:
    rows = _rows(10)
    del rows[4]
    verdict = check_series(rows, images_in_acquisition=None, tolerance=0.05,
                        carried=len(rows))
    assert not verdict.complete and "not contiguous" in verdict.reason


def test_uneven_spacing_is_not_complete() -> None:
    rows = [(i + 1, 0.0, 0.0, z, AXIAL) for i, z in enumerate([0, 2, 4, 7, 9, 11])]
    verdict = check_series(rows, images_in_acquisition=None, tolerance=0.05,
                        carried=len(rows))
    assert not verdict.complete and "uneven" in verdict.reason


def test_mixed_orientation_and_missing_position() -> None:
    rows = _rows(4)
    rows[1] = (2, 0.0, 0.0, 2.0, "0\\1\\0\\0\\0\\-1")
    assert not check_series(rows, images_in_acquisition=None, tolerance=0.05,
                        carried=len(rows)).complete
    rows = _rows(4)
    rows[2] = (3, None, None, None, AXIAL)
    assert not check_series(rows, images_in_acquisition=None, tolerance=0.05,
                        carried=len(rows)).complete


def test_duplicate_positions_and_single_instance() -> None:
    rows = [(i + 1, 0.0, 0.0, 0.0, AXIAL) for i in range(3)]
    assert not check_series(rows, images_in_acquisition=None, tolerance=0.05,
                        carried=len(rows)).complete
    assert not check_series(_rows(1), images_in_acquisition=None,
                        tolerance=0.05, carried=1).complete
    assert check_series(_rows(1), images_in_acquisition=1,
                        tolerance=0.05, carried=1).complete


def test_geometry_proves_only_what_one_association_carried() -> None:
    # one association per instance (or a series split over parallel associations): the
    # first two slices are as contiguous and evenly spaced as a whole series
    verdict = check_series(_rows(2), images_in_acquisition=None, tolerance=0.05, carried=1)
    assert not verdict.complete and "carried 1 of its 2" in verdict.reason
    assert not check_series(_rows(10), images_in_acquisition=None, tolerance=0.05,
                            carried=0).complete            # not known: no proof
    # with ImagesInAcquisition the count proves it, however many associations
    assert check_series(_rows(10), images_in_acquisition=10, tolerance=0.05,
                        carried=3).complete


def test_one_association_per_instance_completes_once_after_the_quiet_period(
        tmp_path: Path) -> None:
    rig = Rig(tmp_path, series_quiet_seconds=5.0, study_quiet_seconds=6.0)
    series = small_series(5)
    for ds in series.datasets:
        del ds.ImagesInAcquisition              # as many CT and MR series have none
        rig.intake.store(encode(ds))
        assert rig.assembly.on_association_released({series.series_instance_uid: 1}) == []
    assert rig.assembly.tick() == []
    done = rig.assembly.tick(utcnow() + timedelta(seconds=6.5))
    assert {(u.level, u.reason, u.generation) for u in done} == {
        ("series", CompletionReasonValues.QUIET, 1), ("study", CompletionReasonValues.QUIET, 1)}
    assert [u.level for u in rig.planner.units] == ["series", "study"]   # routed once


def test_a_release_the_counts_rule_out_takes_no_write_lock(tmp_path: Path) -> None:
    """Another process writing (a listener child indexing) holds SQLite's write lock: a
    release whose series its counts rule out is answered without waiting for it, and
    one that may complete waits for it as before."""
    import sqlite3
    import threading

    rig = Rig(tmp_path)
    series = small_series(5)
    for ds in series.datasets:
        del ds.ImagesInAcquisition
        rig.intake.store(encode(ds))
    uid = series.series_instance_uid
    writer = sqlite3.connect(tmp_path / "index.db", isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")
    results: list[list[CompletedUnit]] = []

    def release(count: int) -> threading.Thread:
        thread = threading.Thread(
            target=lambda: results.append(list(rig.assembly.on_association_released(
                {uid: count}))), daemon=True)
        thread.start()
        return thread

    try:
        ruled_out = release(1)              # carried 1 of 5, no ImagesInAcquisition
        ruled_out.join(5)
        assert not ruled_out.is_alive() and results == [[]]
        whole = release(5)                  # carried all 5: needs the lock to complete
        whole.join(0.5)
        assert whole.is_alive()
    finally:
        writer.execute("ROLLBACK")
        writer.close()
    whole.join(10)
    assert [(u.level, u.reason) for u in results[1]] == [
        ("series", CompletionReasonValues.FAST_PATH), ("study", CompletionReasonValues.FAST_PATH)]


def test_fast_path_on_release(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    series = small_series(5)
    for ds in series.datasets:
        rig.intake.store(encode(ds))
    done = rig.assembly.on_association_released({series.series_instance_uid: 5})
    reasons = {(u.level, u.reason) for u in done}
    assert ("series", CompletionReasonValues.FAST_PATH) in reasons
    assert ("study", CompletionReasonValues.FAST_PATH) in reasons
    assert [u.level for u in rig.planner.units] == ["series", "study"]


def test_missing_slice_waits_for_quiet_period(tmp_path: Path) -> None:
    rig = Rig(tmp_path, series_quiet_seconds=5.0, study_quiet_seconds=6.0)
    series = small_series(6, omit=(3,))
    for ds in series.datasets:
        rig.intake.store(encode(ds))
    assert rig.assembly.on_association_released({series.series_instance_uid: 5}) == []
    assert rig.assembly.tick() == []
    later = rig.assembly.tick(utcnow() + timedelta(seconds=5.5))
    assert [(u.level, u.reason) for u in later] == [("series", CompletionReasonValues.QUIET)]
    study_done = rig.assembly.tick(utcnow() + timedelta(seconds=6.5))
    assert [(u.level, u.reason) for u in study_done] == [("study", CompletionReasonValues.QUIET)]


def test_hard_deadline_completes_a_trickling_series(tmp_path: Path) -> None:
    rig = Rig(tmp_path, series_quiet_seconds=600.0, study_quiet_seconds=600.0,
              hard_deadline_seconds=100.0)
    series = small_series(4, omit=(2,))
    for ds in series.datasets:
        rig.intake.store(encode(ds))
    done = rig.assembly.tick(utcnow() + timedelta(seconds=101))
    assert {(u.level, u.reason) for u in done} == {
        ("series", CompletionReasonValues.DEADLINE), ("study", CompletionReasonValues.DEADLINE)}


def test_late_instance_opens_a_follow_up_generation(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    series = small_series(5)
    for ds in series.datasets[:4]:
        rig.intake.store(encode(ds))
    first = rig.assembly.on_association_released({series.series_instance_uid: 4})
    assert first == []   # 4 of 5 (ImagesInAcquisition) - not provable
    rig.assembly.tick(utcnow() + timedelta(seconds=60))
    with Session(rig.engine) as s:
        row = s.get(SeriesRow, series.series_instance_uid)
        assert row is not None and row.state == "complete" and row.generation == 1
    rig.intake.store(encode(series.datasets[4]))   # the late slice
    with Session(rig.engine) as s:
        row = s.get(SeriesRow, series.series_instance_uid)
        study = s.get(StudyRow, row.study_instance_uid if row else "")
        assert row is not None and row.state == "receiving" and row.generation == 2
        assert study is not None and study.generation == 2
    again = rig.assembly.on_association_released({series.series_instance_uid: 1})
    assert [(u.level, u.generation) for u in again] == [("series", 2), ("study", 2)]


def test_duplicate_after_completion_does_not_reopen(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    series = small_series(3)
    for ds in series.datasets:
        rig.intake.store(encode(ds))
    rig.assembly.on_association_released({series.series_instance_uid: 3})
    rig.intake.store(encode(series.datasets[0]))   # PACS resends the same instance
    with Session(rig.engine) as s:
        row = s.get(SeriesRow, series.series_instance_uid)
        assert row is not None and row.state == "complete" and row.generation == 1


def test_study_fast_path_needs_every_series_in_the_association(tmp_path: Path) -> None:
    from node import synth
    study = synth.make_study(synth.SeriesSpec(slices=3, rows=16, columns=16, series_number=1),
                             synth.SeriesSpec(slices=3, rows=16, columns=16, series_number=2,
                                              seed=1))
    rig = Rig(tmp_path)
    a, b = study.series
    for ds in a.datasets:
        rig.intake.store(encode(ds))
    for ds in b.datasets:
        rig.intake.store(encode(ds))
    done = rig.assembly.on_association_released({a.series_instance_uid: 3})
    assert [u.level for u in done] == ["series"]     # b still open: study waits
    done = rig.assembly.on_association_released({b.series_instance_uid: 3})
    assert [u.level for u in done] == ["series"]     # study not carried whole by one association
