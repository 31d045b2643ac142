"""Intake: put one received instance safely on disk and in the index.

The order is what makes "Success" true: stage (write + fsync) → rename into the spool
→ commit the index row. Only after the commit does the caller answer Success. A crash
between rename and commit leaves a file without a row; :meth:`Intake.reconcile` indexes
it at the next start (the sender, not having seen Success, resends the same bytes,
which is then a harmless duplicate).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import sqlite3
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, bindparam, insert, select, update
from sqlalchemy.dialects.sqlite import dialect as sqlite_dialect
from sqlalchemy.exc import IntegrityError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session

from node.db import InstanceRow, SeriesRow, StudyRow, begin_immediate, begin_write
from node.digest import digest_of, hasher, hexdigest, same_content
from node.domain import (
    AssociationInfo,
    InstanceHeader,
    StoreOutcome,
    StoreResultValues,
    UnitStateValues,
)
from node.errors import DatasetMismatchError, IntakeError, StorageError, StorageFullError
from node.header import read_header, read_header_fast, read_header_file
from node.spool import Spool, StagedFile, StageWriter, relative_path

log = logging.getLogger(__name__)


_RECEIVING = UnitStateValues.RECEIVING.value
# Built once: constructing SQLAlchemy statements costs more than running them.
_SELECT_DIGEST = select(InstanceRow.digest, InstanceRow.sha256).where(
    InstanceRow.sop_instance_uid == bindparam("uid"))
_TOUCH_STUDY = (
    update(StudyRow)
    .where(StudyRow.study_instance_uid == bindparam("uid"), StudyRow.state == _RECEIVING)
    .values(last_received_at=bindparam("now"))
)
_TOUCH_SERIES = (
    update(SeriesRow)
    .where(SeriesRow.series_instance_uid == bindparam("uid"), SeriesRow.state == _RECEIVING)
    .values(last_received_at=bindparam("now"))
    .returning(SeriesRow.generation)
)
_INSERT_INSTANCE = insert(InstanceRow)
_UPDATE_INSTANCE = (
    update(InstanceRow)
    .where(InstanceRow.sop_instance_uid == bindparam("where_uid"))
)


_CONFLICT_TRIES = 4


class _Conflict(Exception):
    """A concurrent insert of the same key by another process; nothing was changed."""


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def _clip(value: str | None, length: int) -> str | None:
    return value[:length] if value is not None else None


class Intake:
    """Stores instances; thread-safe (one call per association thread at a time)."""

    def __init__(self, spool: Spool, engine: Engine, *, lock: threading.Lock | None = None,
                 writers: int = 4) -> None:
        self.spool = spool
        self.engine = engine
        self._lock = lock or threading.Lock()
        self._stripes = tuple(threading.Lock() for _ in range(64))
        self._conn: Connection | None = None
        self._closed = False
        # Writing and fsync'ing release the GIL: they run beside header parsing.
        self._writers = ThreadPoolExecutor(max_workers=writers, thread_name_prefix="spool-writer")
        if engine.dialect.name == "sqlite":
            compile_common_statements()

    def close(self) -> None:
        self._closed = True
        self._writers.shutdown(wait=True)
        self.spool.close()
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def _connection(self) -> Connection:
        """One connection for all index writes (callers hold the lock): no pool round trip."""
        if self._conn is None or self._conn.closed or self._conn.invalidated:
            self._conn = self.engine.connect()
        return self._conn

    def _drop_connection(self) -> None:
        """After a failed commit the driver may still hold the transaction open: start
        the next store on a fresh connection (closing this one rolls it back)."""
        if self._conn is not None:
            self._conn.invalidate()
            self._conn = None

    def store(
        self,
        data: bytes,
        *,
        peer: AssociationInfo | None = None,
        expected_sop_instance_uid: str | None = None,
        expected_sop_class_uid: str | None = None,
        expected_study_instance_uid: str | None = None,
    ) -> StoreOutcome:
        """Store one Part 10 byte string. Raises an IntakeError subclass on failure.

        ``expected_*``: what the request that carried the bytes said (C-STORE's Affected
        SOP Instance/Class UID, the study of a STOW-RS URL); a contradiction is refused.
        """
        self._check_open()
        # The writer runs while this thread parses the header, but it needs the GIL to get
        # going, which parsing would hold: wait until it has the bytes and only their way
        # to the disk is left (the O_DIRECT write and the fsync release the GIL), then
        # parse and hash beside it (BLAKE3 of a 512 KB instance is ~0.1 ms; it releases
        # the GIL too).
        fsyncing = threading.Event()
        writing = self._writers.submit(self._stage, data, fsyncing)
        fsyncing.wait()
        try:
            header = read_header(data)
            _check_request(header, expected_sop_instance_uid, expected_sop_class_uid,
                           expected_study_instance_uid)
            digest = digest_of(data)
        except IntakeError:
            try:
                self.spool.discard(writing.result())
            except IntakeError:
                pass
            raise
        return self._commit(header, dataclasses.replace(writing.result(), digest=digest), peer)

    def receive(
        self,
        prefix: bytes,
        *,
        peer: AssociationInfo | None = None,
        expected_sop_instance_uid: str | None = None,
        expected_sop_class_uid: str | None = None,
        expected_study_instance_uid: str | None = None,
    ) -> IncomingInstance:
        """Store one instance that arrives in pieces: ``prefix`` (its File Meta), then
        :meth:`IncomingInstance.add` per piece, then :meth:`IncomingInstance.finish`.

        The same checks and durability as :meth:`store`, with the work moved to while the
        pieces arrive: each is written and hashed at once, and the header is read from the
        first ones, so that after the last only the fsync, rename and index are left.
        Errors (disk full, a stopping receiver, a bad instance) are raised by ``finish``.
        """
        return IncomingInstance(self, prefix, peer, expected_sop_instance_uid,
                                expected_sop_class_uid, expected_study_instance_uid)

    def _check_open(self) -> None:
        if self._closed:
            raise StorageError("the receiver is stopping; send again once it is back")

    def _stage(self, data: bytes, fsyncing: threading.Event) -> StagedFile:
        try:
            return self.spool.stage(data, before_fsync=fsyncing.set, digest=False)
        finally:
            fsyncing.set()

    def _commit(
        self, header: InstanceHeader, staged: StagedFile, peer: AssociationInfo | None
    ) -> StoreOutcome:
        """Move the staged file into place and index it; the staged file is gone after,
        either way (moved, or removed)."""
        try:
            return self._move_and_index(header, staged, peer)
        except BaseException:
            self.spool.discard(staged)      # (once moved, its temporary name is free)
            raise

    def _move_and_index(
        self, header: InstanceHeader, staged: StagedFile, peer: AssociationInfo | None
    ) -> StoreOutcome:
        rel = relative_path(
            header.study_instance_uid, header.series_instance_uid, header.sop_instance_uid
        )
        # The rename and its directory fsync run outside the lock shared with assembly,
        # so that parallel associations fsync at the same time; stores of the same file
        # name are serialized by their own stripe lock instead.
        with self._stripes[hash(rel) % len(self._stripes)]:
            previous = self.spool.keep_previous(rel)
            try:
                self.spool.commit(staged, rel)
                with self._lock:
                    outcome = self._index_retrying(header, rel, staged, peer)
            except IntakeError:
                self._undo(rel, previous=previous)
                raise
            finally:
                if previous is not None:
                    previous.unlink(missing_ok=True)
        if outcome.result is StoreResultValues.REPLACED:
            log.warning(
                "instance %s received again with different content; kept the newest",
                header.sop_instance_uid,
            )
        return outcome

    def _index_retrying(self, header: InstanceHeader, rel: str, staged: StagedFile,
                        peer: AssociationInfo | None) -> StoreOutcome:
        conflict = _Conflict()
        for _ in range(_CONFLICT_TRIES):
            try:
                return self._index(header, rel, staged, peer)
            except _Conflict as exc:
                # another receiver sharing the database inserted the same study, series
                # or instance first: the next try finds its rows
                conflict = exc
        raise StorageError(f"indexing failed: {conflict}") from conflict

    def _index(self, header: InstanceHeader, rel: str, staged: StagedFile,
               peer: AssociationInfo | None) -> StoreOutcome:
        """The index row for a file already in place (callers hold the lock)."""
        now = utcnow()
        try:
            conn = self._connection()
            if conn.dialect.name == "sqlite":
                try:
                    done = _index_sqlite_common(conn.connection.dbapi_connection, header,
                                                rel, staged, now, self._sha256_of(rel))
                except IntakeError:
                    self._drop_connection()
                    raise
                if done is not None:
                    return done
            with conn.begin():
                begin_write(conn)   # listener processes index the same series at once
                existing = conn.execute(_SELECT_DIGEST,
                                        {"uid": header.sop_instance_uid}).first()
                if existing is not None and same_content(existing[0], existing[1], staged.digest,
                                                         self._sha256_of(rel)):
                    return StoreOutcome(StoreResultValues.DUPLICATE, header, rel, staged.size)
                generation = self._touch_receiving(conn, header, now)
                if generation is None:
                    with Session(bind=conn) as session:
                        generation = self._touch_units(session, header, peer, now)
                        session.flush()
                values = _instance_values(header, rel, staged, generation, now)
                if existing is None:
                    conn.execute(_INSERT_INSTANCE, values)
                else:
                    values["where_uid"] = values.pop("sop_instance_uid")
                    conn.execute(_UPDATE_INSTANCE, values)
        except OperationalError as exc:
            self._drop_connection()
            raise _operational_failure(exc.orig) from exc
        except IntegrityError as exc:
            raise _Conflict(str(exc.orig)) from exc
        except SQLAlchemyError as exc:
            self._drop_connection()
            raise StorageError(f"indexing failed: {exc}") from exc
        return _written(existing, header, rel, staged)

    def _sha256_of(self, rel: str) -> Callable[[], str | None]:
        """SHA-256 of the file just moved to ``rel`` (the new bytes), computed only if
        called: for an instance whose row predates BLAKE3 digests (node/digest.py)."""
        return functools.partial(self.spool.sha256_of, rel)

    def _undo(self, rel: str, *, previous: Path | None) -> None:
        """The file could not be indexed (or moved): put the spool back as it was."""
        if previous is not None:
            self.spool.restore_previous(previous, rel)
        else:
            self.spool.remove(rel)

    @staticmethod
    def _touch_receiving(conn: Connection, h: InstanceHeader, now: datetime) -> int | None:
        """The common case in two statements: study and series exist and are receiving."""
        study = conn.execute(_TOUCH_STUDY, {"uid": h.study_instance_uid, "now": now})
        if study.rowcount != 1:
            return None
        generation = conn.scalar(_TOUCH_SERIES, {"uid": h.series_instance_uid, "now": now})
        return int(generation) if generation is not None else None

    def _touch_units(
        self, session: Session, h: InstanceHeader, peer: AssociationInfo | None, now: datetime
    ) -> int:
        """Create or refresh the study and series rows; reopen completed ones (follow-up)."""
        study = session.get(StudyRow, h.study_instance_uid)
        if study is None:
            study = StudyRow(
                study_instance_uid=h.study_instance_uid,
                patient_id=_clip(h.patient_id, 64),
                patient_name=_clip(h.patient_name, 324),
                patient_birth_date=_clip(h.patient_birth_date, 8),
                patient_sex=_clip(h.patient_sex, 16),
                accession_number=_clip(h.accession_number, 16),
                study_date=_clip(h.study_date, 8),
                study_description=_clip(h.study_description, 64),
                state=UnitStateValues.RECEIVING.value,
                generation=1,
                first_received_at=now,
                last_received_at=now,
            )
            session.add(study)
        else:
            if study.state == UnitStateValues.COMPLETE.value:
                study.state = UnitStateValues.RECEIVING.value
                study.generation += 1
                study.first_received_at = now
                log.info("study %s: late instance opens follow-up generation %d",
                         h.study_instance_uid, study.generation)
            study.last_received_at = now
        series = session.get(SeriesRow, h.series_instance_uid)
        if series is None:
            series = SeriesRow(
                series_instance_uid=h.series_instance_uid,
                study_instance_uid=h.study_instance_uid,
                modality=_clip(h.modality, 16),
                series_number=h.series_number,
                series_description=_clip(h.series_description, 64),
                body_part_examined=_clip(h.body_part_examined, 16),
                frame_of_reference_uid=_clip(h.frame_of_reference_uid, 64),
                images_in_acquisition=h.images_in_acquisition,
                calling_ae_title=peer.calling_ae_title if peer else None,
                called_ae_title=peer.called_ae_title if peer else None,
                source_address=peer.address if peer else None,
                state=UnitStateValues.RECEIVING.value,
                generation=1,
                first_received_at=now,
                last_received_at=now,
            )
            session.add(series)
        else:
            if series.state == UnitStateValues.COMPLETE.value:
                series.state = UnitStateValues.RECEIVING.value
                series.generation += 1
                series.first_received_at = now
                log.info("series %s: late instance opens follow-up generation %d",
                         h.series_instance_uid, series.generation)
            series.last_received_at = now
            if series.images_in_acquisition is None and h.images_in_acquisition:
                series.images_in_acquisition = h.images_in_acquisition
        return series.generation

    def reconcile(self) -> int:
        """Index spool files that have no row (a crash between rename and commit)."""
        with Session(self.engine) as session:
            known = set(session.scalars(select(InstanceRow.path)))
        added = 0
        for rel in self.spool.iter_files():
            if rel in known:
                continue
            path = self.spool.root / rel
            try:
                data = path.read_bytes()
                header = read_header(data)
            except (OSError, ValueError) as exc:
                log.error("spool file %s cannot be indexed (%s); left in place", rel, exc)
                continue
            staged = StagedFile(path, len(data), digest_of(data))
            with self._lock, Session(self.engine) as session, session.begin():
                begin_write(session.connection())
                if session.get(InstanceRow, header.sop_instance_uid) is not None:
                    continue
                generation = self._touch_units(session, header, None, utcnow())
                session.flush()
                session.execute(_INSERT_INSTANCE,
                                _instance_values(header, rel, staged, generation, utcnow()))
            added += 1
        if added:
            log.warning("indexed %d spool file(s) that had no index row", added)
        return added


def _check_request(header: InstanceHeader, sop_instance_uid: str | None,
                   sop_class_uid: str | None, study_instance_uid: str | None = None) -> None:
    if sop_instance_uid and header.sop_instance_uid != sop_instance_uid:
        raise DatasetMismatchError(
            f"SOP Instance UID in the data set ({header.sop_instance_uid}) differs from "
            f"the request's Affected SOP Instance UID ({sop_instance_uid})"
        )
    if sop_class_uid and header.sop_class_uid != sop_class_uid:
        raise DatasetMismatchError(
            f"SOP Class UID in the data set ({header.sop_class_uid}) differs from "
            f"the request's Affected SOP Class UID ({sop_class_uid})"
        )
    if study_instance_uid and header.study_instance_uid != study_instance_uid:
        raise DatasetMismatchError(
            f"Study Instance UID in the data set ({header.study_instance_uid}) differs "
            f"from the study in the request ({study_instance_uid})")


# The keys of _instance_values, in its order (tests/unit/test_intake.py checks).
INSTANCE_COLUMNS = ("sop_instance_uid", "series_instance_uid", "sop_class_uid",
                    "transfer_syntax_uid", "instance_number", "position_x", "position_y",
                    "position_z", "orientation", "number_of_frames", "path", "size", "digest",
                    "sha256", "generation", "received_at")


def _instance_values(
    h: InstanceHeader, rel: str, staged: StagedFile, generation: int, now: datetime
) -> dict[str, object]:
    pos = h.image_position
    return {
        "sop_instance_uid": h.sop_instance_uid,
        "series_instance_uid": h.series_instance_uid,
        "sop_class_uid": h.sop_class_uid,
        "transfer_syntax_uid": h.transfer_syntax_uid,
        "instance_number": h.instance_number,
        "position_x": pos[0] if pos else None,
        "position_y": pos[1] if pos else None,
        "position_z": pos[2] if pos else None,
        "orientation": (
            "\\".join(f"{v:.6f}" for v in h.image_orientation) if h.image_orientation else None
        ),
        "number_of_frames": h.number_of_frames,
        "path": rel,
        "size": staged.size,
        "digest": staged.digest,
        "sha256": "",           # (rows from before BLAKE3 digests only)
        "generation": generation,
        "received_at": now,
    }


# Bytes of an arriving instance kept in memory for its header when the fast reader cannot
# read it from the first pieces (compressed transfer syntaxes, odd data sets); beyond
# this, the header is read from the written file instead.
HEADER_WINDOW = 8 << 20


class IncomingInstance:
    """One instance being received piece by piece (see :meth:`Intake.receive`).

    An error while the pieces arrive (disk full, say) is kept and raised by
    :meth:`finish`: the sender is answered once it has sent everything, as the protocol
    wants. Call :meth:`abandon` when the rest will never come.
    """

    def __init__(self, intake: Intake, prefix: bytes, peer: AssociationInfo | None,
                 expected_sop_instance_uid: str | None,
                 expected_sop_class_uid: str | None,
                 expected_study_instance_uid: str | None = None) -> None:
        self._intake = intake
        self._peer = peer
        self._expected = (expected_sop_instance_uid, expected_sop_class_uid,
                          expected_study_instance_uid)
        # the first pieces, kept for the header until it is read (at most HEADER_WINDOW
        # bytes; then finish() reads it from the written file): never the whole instance
        self._pieces: list[bytes | memoryview] | None = [prefix]
        self._kept = len(prefix)
        self._hasher = hasher(prefix)
        self._header: InstanceHeader | None = None
        self._error: IntakeError | None = None
        self._writer: StageWriter | None = None
        try:
            intake._check_open()
            self._writer = intake.spool.open_stage()
            self._writer.write(prefix)
        except IntakeError as exc:
            self._fail(exc)

    def add(self, piece: bytes | memoryview) -> None:
        """The next piece. It is written and hashed at once; the first ones are kept
        (unchanged: not copied) until the header is read."""
        if self._error is not None:
            return
        self._hasher.update(piece)
        try:
            assert self._writer is not None
            self._writer.write(piece)
        except IntakeError as exc:
            self._fail(exc)
            return
        pieces = self._pieces
        if pieces is None:
            return
        pieces.append(piece)
        self._kept += len(piece)
        if len(pieces) == 2:
            # the attributes intake needs come early in the data set: usually the fast
            # reader finds them all in the first piece; if not, finish() reads them
            self._header = read_header_fast(b"".join(pieces), start_only=True)
        if self._header is not None or self._kept > HEADER_WINDOW:
            self._pieces = None

    def finish(self) -> StoreOutcome:
        """fsync, check, move into place and index. Raises an IntakeError subclass."""
        if self._error is not None:
            raise self._error
        assert self._writer is not None
        writer, self._writer = self._writer, None
        try:
            header = self._header
            if header is None and self._pieces is not None:     # all of it is here
                header = read_header(b"".join(self._pieces))
            if header is not None:
                _check_request(header, *self._expected)
            staged = writer.finish(hexdigest(self._hasher))
            if header is None:          # a long instance with a header the fast reader
                header = read_header_file(staged.temp_path)     # could not read
                _check_request(header, *self._expected)
        except IntakeError:
            writer.discard()
            raise
        return self._intake._commit(header, staged, self._peer)

    def abandon(self) -> None:
        if self._writer is not None:
            self._writer.discard()
            self._writer = None

    def _fail(self, exc: IntakeError) -> None:
        self._error = exc
        self.abandon()


def _operational_failure(error: object) -> IntakeError:
    """The database refused a write (the driver's OperationalError)."""
    if "full" in str(error).lower():
        return StorageFullError("the index database's disk is full")
    return StorageError(f"indexing failed: {error}")


def _written(existing: object | None, header: InstanceHeader, rel: str,
             staged: StagedFile) -> StoreOutcome:
    """The outcome of an index write that inserted (no row before) or replaced a row."""
    result = StoreResultValues.STORED if existing is None else StoreResultValues.REPLACED
    return StoreOutcome(result, header, rel, staged.size)


# The common case of _index on SQLite in the driver's own terms: an instance of a study
# and series that are receiving already. The SQLAlchemy path's own statements, compiled
# once for SQLite and run on the DBAPI connection: SQLAlchemy's per-statement work was
# ~0.3 ms of each instance's 0.5 ms of indexing (three statements, a transaction), on the
# C-STORE critical path.
_SQLITE = sqlite_dialect(paramstyle="named")


@functools.cache
def _sqlite_sql(statement: Any, columns: tuple[str, ...] = ()) -> tuple[str, dict[str, Any]]:
    """One of the statements above as SQLite text with named parameters (columns: those
    an INSERT or UPDATE sets), and the values of its constant parameters."""
    compiled = statement.compile(dialect=_SQLITE, column_keys=list(columns) or None)
    constants = {name: bind.value for name, bind in compiled.binds.items()
                 if not bind.required}
    return str(compiled), constants


def compile_common_statements() -> None:
    """Compile the statements of :func:`_index_sqlite_common` now, as it will use them:
    a process's first instance would otherwise pay for it (~17 ms of CPU)."""
    for statement in (_SELECT_DIGEST, _TOUCH_STUDY, _TOUCH_SERIES):
        _sqlite_sql(statement, ())          # (as _bound calls it: the cache key has the ())
    _sqlite_sql(_INSERT_INSTANCE, INSTANCE_COLUMNS)
    update = tuple(c for c in INSTANCE_COLUMNS if c != "sop_instance_uid")
    _sqlite_sql(_UPDATE_INSTANCE, update)


def _sqlite_time(value: datetime) -> str:
    """A datetime as SQLAlchemy's SQLite DateTime type stores it (microseconds always)."""
    return value.strftime("%Y-%m-%d %H:%M:%S.%f")


def _index_sqlite_common(dbapi: Any, header: InstanceHeader, rel: str, staged: StagedFile,
                         now: datetime, sha256_of_new: Callable[[], str | None],
                         ) -> StoreOutcome | None:
    """:meth:`Intake._index` for the common case, or None (nothing changed) when the study
    or series is new or complete: the general path then does it all."""
    stamp = _sqlite_time(now)
    cur = dbapi.cursor()
    try:
        begin_immediate(dbapi)      # as begin_write: read-then-write, one step
        try:
            existing = cur.execute(*_bound(_SELECT_DIGEST, uid=header.sop_instance_uid)
                                   ).fetchone()
            if existing is not None and same_content(existing[0], existing[1], staged.digest,
                                                     sha256_of_new):
                dbapi.commit()
                return StoreOutcome(StoreResultValues.DUPLICATE, header, rel, staged.size)
            touched = cur.execute(*_bound(_TOUCH_STUDY, uid=header.study_instance_uid,
                                          now=stamp)).rowcount
            generation = cur.execute(*_bound(_TOUCH_SERIES, uid=header.series_instance_uid,
                                             now=stamp)).fetchone() if touched == 1 else None
            if generation is None:
                dbapi.rollback()
                return None
            values = _instance_values(header, rel, staged, int(generation[0]), now)
            values["received_at"] = stamp
            if existing is None:
                cur.execute(*_bound(_INSERT_INSTANCE, tuple(values), **values))
            else:
                values["where_uid"] = values.pop("sop_instance_uid")
                cur.execute(*_bound(_UPDATE_INSTANCE, tuple(values)[:-1], **values))
            dbapi.commit()
        except BaseException:
            dbapi.rollback()
            raise
    except sqlite3.IntegrityError as exc:
        raise _Conflict(str(exc)) from exc
    except sqlite3.OperationalError as exc:
        raise _operational_failure(exc) from exc
    except sqlite3.Error as exc:
        raise StorageError(f"indexing failed: {exc}") from exc
    finally:
        cur.close()
    return _written(existing, header, rel, staged)


def _bound(statement: Any, columns: tuple[str, ...] = (),
           **values: Any) -> tuple[str, dict[str, Any]]:
    """(SQL, parameters) of a statement for ``cursor.execute`` (see :func:`_sqlite_sql`)."""
    sql, constants = _sqlite_sql(statement, columns)
    return sql, {**constants, **values}
