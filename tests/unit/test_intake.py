from __future__ import annotations

import dataclasses
import os
from datetime import datetime
from pathlib import Path
from typing import Any

import blake3
import pytest
from pydicom.encaps import encapsulate
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from node.db import InstanceRow, SeriesRow, StudyRow
from node.domain import StoreResultValues
from node.errors import (
    DatasetMismatchError,
    InvalidInstanceError,
    StorageError,
    StorageFullError,
)
from node import intake as intake_module
from node import spool as spool_module
from node.spool import MAX_SPARES, Spool, safe_component
from tests.support import half_written
from tests.unit.helpers import Rig, encode, small_series


def _count(rig: Rig) -> int:
    with Session(rig.engine) as s:
        return int(s.scalar(select(func.count()).select_from(InstanceRow)) or 0)


def test_store_writes_exact_bytes_and_indexes(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    series = small_series(3)
    for ds in series.datasets:
        data = encode(ds)
        outcome = rig.intake.store(data)
        assert outcome.result is StoreResultValues.STORED
        assert (rig.spool.root / outcome.path).read_bytes() == data
    assert _count(rig) == 3
    with Session(rig.engine) as s:
        row = s.get(SeriesRow, series.series_instance_uid)
        assert row is not None and row.modality == "CT" and row.images_in_acquisition == 3
        study = s.get(StudyRow, series.datasets[0].StudyInstanceUID)
        assert study is not None and study.patient_id == series.datasets[0].PatientID
    assert half_written(rig.spool.root / ".tmp") == []


def test_duplicate_same_bytes_is_success_without_second_copy(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    data = encode(small_series(1).datasets[0])
    first = rig.intake.store(data)
    second = rig.intake.store(data)
    assert second.result is StoreResultValues.DUPLICATE and second.path == first.path
    assert _count(rig) == 1
    assert sum(1 for _ in rig.spool.iter_files()) == 1


def test_duplicate_with_different_bytes_keeps_newest(tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    rig = Rig(tmp_path)
    ds = small_series(1).datasets[0]
    rig.intake.store(encode(ds))
    ds.SeriesDescription = "corrected"
    newer = encode(ds)
    outcome = rig.intake.store(newer)
    assert outcome.result is StoreResultValues.REPLACED
    assert (rig.spool.root / outcome.path).read_bytes() == newer
    assert _count(rig) == 1
    assert any("different content" in r.getMessage() for r in caplog.records)


def test_mismatched_uid_is_refused(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    data = encode(small_series(1).datasets[0])
    with pytest.raises(DatasetMismatchError, match="Affected SOP Instance UID"):
        rig.intake.store(data, expected_sop_instance_uid="1.2.3")
    assert _count(rig) == 0


def test_garbage_and_missing_uids_are_refused(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    with pytest.raises(InvalidInstanceError):
        rig.intake.store(b"\x00" * 10)
    ds = small_series(1).datasets[0]
    del ds.SeriesInstanceUID
    with pytest.raises(InvalidInstanceError, match="SeriesInstanceUID"):
        rig.intake.store(encode(ds))
    assert _count(rig) == 0 and list(rig.spool.iter_files()) == []


def test_min_free_space_refuses_before_writing(tmp_path: Path) -> None:
    spool = Spool(tmp_path, min_free_bytes=1 << 62)
    spool.prepare()
    with pytest.raises(StorageFullError):
        spool.stage(b"x" * 10)
    assert half_written(tmp_path / ".tmp") == []


def test_prepare_removes_half_written_files(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    (tmp_path / ".tmp").mkdir()
    (tmp_path / ".tmp" / "abc.part").write_bytes(b"half")
    assert spool.prepare() == 1
    assert half_written(tmp_path / ".tmp") == []


def test_reconcile_indexes_a_file_whose_row_was_lost(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    series = small_series(2)
    rig.intake.store(encode(series.datasets[0]))
    orphan = encode(series.datasets[1])
    staged = rig.spool.stage(orphan)   # a crash between rename and commit
    from node.spool import relative_path
    d = series.datasets[1]
    rig.spool.commit(staged, relative_path(d.StudyInstanceUID, d.SeriesInstanceUID,
                                           d.SOPInstanceUID))
    assert _count(rig) == 1
    assert rig.intake.reconcile() == 1
    assert _count(rig) == 2
    assert rig.intake.reconcile() == 0


def test_unsafe_uid_never_becomes_a_path() -> None:
    assert safe_component("1.2.3") == "1.2.3"
    evil = safe_component("../../etc/passwd")
    assert "/" not in evil and ".." not in evil and evil.startswith("x-")


def test_spool_files_are_not_world_readable(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    out = rig.intake.store(encode(small_series(1).datasets[0]))
    mode = os.stat(rig.spool.root / out.path).st_mode
    assert mode & 0o007 == 0


@pytest.mark.parametrize("path", ["general", "sqlite common case"])
def test_failed_replacement_leaves_the_stored_version_intact(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, path: str) -> None:
    """The index write fails (disk full at COMMIT on SQLAlchemy's path; a database that
    refuses writes on the DBAPI path of the common case): the spool is put back."""
    import sqlite3

    from sqlalchemy import event
    from sqlalchemy.exc import OperationalError

    import node.intake

    rig = Rig(tmp_path)
    ds = small_series(1).datasets[0]
    first = encode(ds)
    stored = rig.intake.store(first)
    ds.SeriesDescription = "second version"

    def refuse_commit(conn: object) -> None:
        raise OperationalError("COMMIT", {}, sqlite3.OperationalError("database or disk is full"))

    def pragma(value: str) -> None:   # on the intake's own connection
        conn = rig.intake._connection()
        conn.exec_driver_sql(f"PRAGMA query_only = {value}")
        conn.commit()

    def failing() -> Any:
        if path == "general":
            monkeypatch.setattr(node.intake, "_index_sqlite_common", lambda *a: None)
            event.listen(rig.engine, "commit", refuse_commit)
            return pytest.raises(StorageFullError)
        pragma("ON")
        return pytest.raises(StorageError, match="readonly")

    def healed() -> None:
        if path == "general":
            event.remove(rig.engine, "commit", refuse_commit)
            monkeypatch.undo()
        else:
            pragma("OFF")

    with failing():
        rig.intake.store(encode(ds))
    healed()
    assert (rig.spool.root / stored.path).read_bytes() == first
    with Session(rig.engine) as s:
        row = s.get(InstanceRow, ds.SOPInstanceUID)
        assert row is not None and row.size == len(first)
    assert half_written(rig.spool.root / ".tmp") == []
    # and a refused brand-new instance (of the same series) leaves no file behind
    other = small_series(2).datasets[1]
    with failing():
        rig.intake.store(encode(other))
    healed()
    assert sum(1 for _ in rig.spool.iter_files()) == 1
    rig.intake.store(encode(other))                       # and the index works again
    assert _count(rig) == 2


def test_the_sqlite_common_case_writes_what_the_general_path_writes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import node.intake

    def rows(rig: Rig) -> list[dict[str, object]]:
        with Session(rig.engine) as s:
            return [{c.key: getattr(r, c.key) for c in InstanceRow.__table__.columns
                     if c.key not in ("received_at", "path")}
                    for r in s.scalars(select(InstanceRow).order_by(
                        InstanceRow.sop_instance_uid))]

    series = small_series(4)
    fast, general = Rig(tmp_path / "fast"), Rig(tmp_path / "general")
    calls: list[object] = []
    common = node.intake._index_sqlite_common

    def counted(*args: Any) -> Any:
        outcome = common(*args)
        calls.append(outcome)
        return outcome

    monkeypatch.setattr(node.intake, "_index_sqlite_common", counted)
    for ds in series.datasets:
        fast.intake.store(encode(ds))
    ds = series.datasets[0]
    ds.SeriesDescription = "corrected"                  # a replacement, on both paths
    fast.intake.store(encode(ds))
    assert [c is None for c in calls] == [True, False, False, False, False]  # 1st: new series
    monkeypatch.setattr(node.intake, "_index_sqlite_common", lambda *a: None)
    ds.SeriesDescription = None
    for ds in small_series(4).datasets:
        general.intake.store(encode(ds))
    ds = small_series(4).datasets[0]
    ds.SeriesDescription = "corrected"
    general.intake.store(encode(ds))
    assert rows(fast) == rows(general)
    with Session(fast.engine) as s:
        stamps = [r.received_at for r in s.scalars(select(InstanceRow))]
    assert all(isinstance(t, datetime) for t in stamps)  # read back as SQLAlchemy writes


def test_concurrent_versions_of_one_instance_leave_file_and_row_in_agreement(
        tmp_path: Path) -> None:
    import threading

    rig = Rig(tmp_path)
    ds = small_series(1).datasets[0]
    versions = []
    for i in range(4):
        ds.SeriesDescription = f"version {i}"
        versions.append(encode(ds))
    for _ in range(5):
        barrier = threading.Barrier(len(versions))

        def send(data: bytes, barrier: threading.Barrier) -> None:
            barrier.wait()
            rig.intake.store(data)

        threads = [threading.Thread(target=send, args=(v, barrier)) for v in versions]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        with Session(rig.engine) as s:
            row = s.get(InstanceRow, ds.SOPInstanceUID)
        assert row is not None
        on_disk = (rig.spool.root / row.path).read_bytes()
        assert "blake3:" + blake3.blake3(on_disk).hexdigest() == row.digest
        assert on_disk in versions
    assert _count(rig) == 1
    assert sum(1 for _ in rig.spool.iter_files()) == 1
    assert half_written(rig.spool.root / ".tmp") == []


def _pieces(data: bytes, meta_end: int, size: int) -> list[bytes]:
    return [data[i:i + size] for i in range(meta_end, len(data), size)]


def _arrived(rig: Rig, data: bytes, size: int, **expected: Any) -> Any:
    """``data`` handed to Intake.receive in pieces of ``size`` bytes, not finished yet."""
    incoming = rig.intake.receive(data[:_meta_end(data)], **expected)
    for piece in _pieces(data, _meta_end(data), size):
        incoming.add(piece)
    return incoming


def _meta_end(data: bytes) -> int:
    """Offset of the data set in Part 10 bytes (after the File Meta group)."""
    length = int.from_bytes(data[140:144], "little")   # (0002,0000) UL, explicit VR
    return 144 + length


@pytest.mark.parametrize("size", [100, 4096, 1 << 20])
def test_receive_in_pieces_stores_what_store_would(tmp_path: Path, size: int) -> None:
    rig = Rig(tmp_path)
    other = Rig(tmp_path / "whole")
    expected = {}
    for ds in small_series(2).datasets:
        data = encode(ds)
        expected[ds.SOPInstanceUID] = "blake3:" + blake3.blake3(data).hexdigest()
        meta_end = _meta_end(data)
        incoming = rig.intake.receive(data[:meta_end], expected_sop_instance_uid=ds.SOPInstanceUID,
                                      expected_sop_class_uid=ds.SOPClassUID)
        for piece in _pieces(data, meta_end, size):
            incoming.add(memoryview(piece))
        outcome = incoming.finish()
        whole = other.intake.store(data)
        assert outcome == dataclasses.replace(whole, path=outcome.path)
        assert (rig.spool.root / outcome.path).read_bytes() == data
    with Session(rig.engine) as s:
        rows = {r.sop_instance_uid: r.digest for r in s.scalars(select(InstanceRow))}
    with Session(other.engine) as s:
        assert rows == {r.sop_instance_uid: r.digest for r in s.scalars(select(InstanceRow))}
    assert rows == expected
    assert half_written(rig.spool.root / ".tmp") == []


def test_receive_refuses_at_the_end_and_leaves_nothing(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    ds = small_series(1).datasets[0]
    data = encode(ds)
    meta_end = _meta_end(data)
    # the request named another instance: refused once everything has arrived
    incoming = _arrived(rig, data, 256, expected_sop_instance_uid="1.2.3")
    with pytest.raises(DatasetMismatchError):
        incoming.finish()
    # garbage: nothing the header reader can use
    incoming = rig.intake.receive(data[:meta_end])
    incoming.add(b"\x00" * 300)
    with pytest.raises(InvalidInstanceError):
        incoming.finish()
    # given up half way (the association ended)
    incoming = rig.intake.receive(data[:meta_end])
    incoming.add(data[meta_end:meta_end + 100])
    assert len(half_written(rig.spool.root / ".tmp")) == 1
    incoming.abandon()
    assert half_written(rig.spool.root / ".tmp") == []
    assert _count(rig) == 0 and not list(rig.spool.iter_files())


def _compressed(ds: Any, fragment: bytes) -> bytes:
    """``ds`` with its pixel data as one JPEG 2000 fragment (never decoded here): a
    transfer syntax the fast header reader leaves to pydicom."""
    ds.PixelData = encapsulate([fragment])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.90"
    return encode(ds)


def test_a_long_instance_keeps_only_a_window_and_its_header_is_read_from_the_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(intake_module, "HEADER_WINDOW", 4096)
    rig = Rig(tmp_path)
    first, second, third = small_series(3).datasets
    data = _compressed(first, os.urandom(64 * 1024))
    incoming = _arrived(rig, data, 1000, expected_sop_instance_uid=first.SOPInstanceUID)
    assert incoming._pieces is None                      # dropped after the window
    outcome = incoming.finish()
    assert outcome.result is StoreResultValues.STORED
    assert outcome.header.sop_instance_uid == first.SOPInstanceUID
    assert outcome.header.transfer_syntax_uid == "1.2.840.10008.1.2.4.90"
    assert (rig.spool.root / outcome.path).read_bytes() == data
    # refusals found only in the file still leave nothing behind
    data = _compressed(second, os.urandom(64 * 1024))
    with pytest.raises(DatasetMismatchError):
        _arrived(rig, data, 1000, expected_sop_instance_uid="1.2.3").finish()
    incoming = rig.intake.receive(data[:_meta_end(data)])
    for _ in range(10):
        incoming.add(b"\xff" * 1000)                    # no data set at all
    with pytest.raises(InvalidInstanceError):
        incoming.finish()
    assert half_written(rig.spool.root / ".tmp") == [] and _count(rig) == 1
    # within the window, the kept pieces are read as before (no file read)
    incoming = _arrived(rig, _compressed(third, b"\x00" * 1000), 500)
    monkeypatch.setattr(intake_module, "read_header_file", None)   # would fail if called
    assert incoming.finish().header.sop_instance_uid == third.SOPInstanceUID


def test_receive_with_no_space_answers_full_after_the_last_piece(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.spool.min_free_bytes = 1 << 62                 # more than any disk has
    data = encode(small_series(1).datasets[0])
    incoming = rig.intake.receive(data[:_meta_end(data)])
    for piece in _pieces(data, _meta_end(data), 512):
        incoming.add(piece)                       # taken (and dropped) without raising
    with pytest.raises(StorageFullError):
        incoming.finish()
    assert half_written(rig.spool.root / ".tmp") == [] and _count(rig) == 0


def test_the_spool_keeps_empty_temporary_files_ready(tmp_path: Path) -> None:
    spool = Spool(tmp_path, fsync=True)
    spool.prepare()
    first = spool.open_stage()                    # none ready yet: created on the spot
    assert first.path.suffix == ".part"
    tmp = tmp_path / ".tmp"
    spool.make_spare()
    (spare,) = tmp.glob("*.spare")
    assert spare.stat().st_size == 0
    second = spool.open_stage()                   # takes the one kept ready
    assert second.path == spare
    second.write(b"abc")
    assert second.finish("").size == 3 and spare.read_bytes() == b"abc"
    for _ in range(MAX_SPARES + 3):               # no more than MAX_SPARES are kept
        spool.make_spare()
    assert len([p for p in tmp.glob("*.spare") if p != spare]) == MAX_SPARES
    first.discard()
    spool.close()                                 # stop: spares removed, nothing else
    assert sorted(p.name for p in tmp.iterdir()) == [spare.name]
    spool.make_spare()                            # a closed spool makes none
    assert sorted(p.name for p in tmp.iterdir()) == [spare.name]
    assert Spool(tmp_path).prepare() == 1 and list(tmp.iterdir()) == []  # start: all gone


def test_a_new_series_folder_is_made_durable_with_its_first_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[Path] = []
    monkeypatch.setattr(spool_module, "_fsync_dir", synced.append)
    spool = Spool(tmp_path, fsync=True)
    spool.prepare()

    def commit(rel: str) -> None:
        writer = spool.open_stage()
        writer.write(b"x")
        spool.commit(writer.finish(""), rel)

    commit("1.2/1.2.3/1.2.3.4.dcm")                 # new study and series folders
    assert synced == [tmp_path / "1.2" / "1.2.3", tmp_path / "1.2", tmp_path]
    synced.clear()
    commit("1.2/1.2.3/1.2.3.5.dcm")                 # the same series: its folder only
    assert synced == [tmp_path / "1.2" / "1.2.3"]
    synced.clear()
    commit("1.2/1.2.4/1.2.4.1.dcm")                 # a new series of a known study
    assert synced == [tmp_path / "1.2" / "1.2.4", tmp_path / "1.2"]
    assert (tmp_path / "1.2" / "1.2.4" / "1.2.4.1.dcm").read_bytes() == b"x"


def test_the_common_index_statements_are_compiled_when_intake_starts(tmp_path: Path) -> None:
    """Intake compiles the SQLite fast path's statements up front, with the very column
    lists that storing uses: storing after that compiles nothing more (insert, update)."""
    from node import intake as intake_module
    intake_module._sqlite_sql.cache_clear()
    rig = Rig(tmp_path)
    compiled = intake_module._sqlite_sql.cache_info().misses
    assert compiled == 5
    series = small_series(3)
    for ds in series.datasets:                  # the first creates study and series rows
        rig.intake.store(encode(ds))
    changed = series.datasets[2].copy()
    changed.SeriesDescription = "changed"       # the same UID again: the update path
    assert rig.intake.store(encode(changed)).result is StoreResultValues.REPLACED
    assert intake_module._sqlite_sql.cache_info().misses == compiled
