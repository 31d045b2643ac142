"""Schema of the index and job table (SQLAlchemy 2), and engine creation.

Patient identifiers live only in their own columns of ``studies``; no other table or
JSON column holds them.
"""

from __future__ import annotations

import sqlite3
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    BigInteger,
    Connection,
    DateTime,
    Engine,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    inspect,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from node.errors import ConfigError
from node.settings import StorageSettings

# How long a connection waits for SQLite's write lock before "database is locked".
BUSY_TIMEOUT_MS = 30000
# The first waits of begin_immediate, seconds (~14 ms in all), before busy_timeout's.
QUICK_WAITS = (0.00005, 0.0001, 0.0002) + (0.0004,) * 35


class Base(DeclarativeBase):
    pass


class StudyRow(Base):
    __tablename__ = "studies"

    study_instance_uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    patient_id: Mapped[str | None] = mapped_column(String(64))
    patient_name: Mapped[str | None] = mapped_column(String(324))
    patient_birth_date: Mapped[str | None] = mapped_column(String(8))
    patient_sex: Mapped[str | None] = mapped_column(String(16))
    accession_number: Mapped[str | None] = mapped_column(String(16))
    study_date: Mapped[str | None] = mapped_column(String(8))
    study_description: Mapped[str | None] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), default="receiving")
    generation: Mapped[int] = mapped_column(Integer, default=1)
    first_received_at: Mapped[datetime] = mapped_column(DateTime)
    last_received_at: Mapped[datetime] = mapped_column(DateTime)
    completed_at: Mapped[datetime | None] = mapped_column(DateTime)
    completion_reason: Mapped[str | None] = mapped_column(String(32))


class SeriesRow(Base):
    __tablename__ = "series"

    series_instance_uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(
        ForeignKey("studies.study_instance_uid"), index=True
    )
    modality: Mapped[str | None] = mapped_column(String(16))
    series_number: Mapped[int | None] = mapped_column(Integer)
    series_description: Mapped[str | None] = mapped_column(String(64))
    body_part_examined: Mapped[str | None] = mapped_column(String(16))
    frame_of_reference_uid: Mapped[str | None] = mapped_column(String(64))
    images_in_acquisition: Mapped[int | None] = mapped_column(Integer)
    calling_ae_title: Mapped[str | None] = mapped_column(String(16))
    called_ae_title: Mapped[str | None] = mapped_column(String(16))
    source_address: Mapped[str | None] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), default="receiving")
    generation: Mapped[int] = mapped_column(Integer, default=1)
    first_received_at: Mapped[datetime] = mapped_column(DateTime)
    last_received_at: Mapped[datetime] = mapped_column(DateTime)
    completed_at: Mapped[datetime | None] = mapped_column(DateTime)
    completion_reason: Mapped[str | None] = mapped_column(String(32))


class InstanceRow(Base):
    __tablename__ = "instances"

    sop_instance_uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(
        ForeignKey("series.series_instance_uid"), index=True
    )
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    instance_number: Mapped[int | None] = mapped_column(Integer)
    position_x: Mapped[float | None] = mapped_column(Float)
    position_y: Mapped[float | None] = mapped_column(Float)
    position_z: Mapped[float | None] = mapped_column(Float)
    orientation: Mapped[str | None] = mapped_column(String(128))
    number_of_frames: Mapped[int | None] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(Text)
    size: Mapped[int] = mapped_column(BigInteger)
    # BLAKE3 of the file's bytes, "blake3:<hex>" (node/digest.py); rows indexed before
    # digests became BLAKE3 have it empty and their SHA-256 in sha256 (empty otherwise)
    digest: Mapped[str | None] = mapped_column(String(80))
    sha256: Mapped[str] = mapped_column(String(64), default="")
    generation: Mapped[int] = mapped_column(Integer, default=1)
    received_at: Mapped[datetime] = mapped_column(DateTime)


class JobRow(Base):
    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_state_priority", "state", "priority", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    key: Mapped[str] = mapped_column(String(255), unique=True)
    kind: Mapped[str] = mapped_column(String(32))
    route: Mapped[str] = mapped_column(String(64))
    study_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    series_instance_uid: Mapped[str | None] = mapped_column(String(64))
    generation: Mapped[int] = mapped_column(Integer, default=1)
    payload: Mapped[str] = mapped_column(Text, default="{}")
    state: Mapped[str] = mapped_column(String(16))
    step: Mapped[str | None] = mapped_column(String(64))
    priority: Mapped[int] = mapped_column(Integer, default=50)
    queue: Mapped[str] = mapped_column(String(32), default="default")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    owner: Mapped[str | None] = mapped_column(String(128))     # who claimed it (host:role)
    not_before: Mapped[datetime | None] = mapped_column(DateTime)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime)
    updated_at: Mapped[datetime] = mapped_column(DateTime)


class DeliveryRow(Base):
    """The outbox: one row per (job, destination), each with its own tries and backoff
    (node/outbox.py). Added after ``jobs``; ``create_all`` adds the table to older
    databases (an additive migration)."""

    __tablename__ = "deliveries"
    __table_args__ = (UniqueConstraint("job_id", "destination",
                                       name="uq_deliveries_job_destination"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    destination: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    next_attempt_at: Mapped[datetime | None] = mapped_column(DateTime)
    sent_at: Mapped[datetime | None] = mapped_column(DateTime)
    instances: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime)
    updated_at: Mapped[datetime] = mapped_column(DateTime)


class PulledSeriesRow(Base):
    """What pull mode has fetched from each source (node/pull.py): never fetched twice."""

    __tablename__ = "pulled_series"

    source: Mapped[str] = mapped_column(String(64), primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    instances: Mapped[int] = mapped_column(Integer)
    fetched_at: Mapped[datetime] = mapped_column(DateTime)
    last_seen_at: Mapped[datetime] = mapped_column(DateTime)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    # WAL + NORMAL survives a killed process; the spool files themselves are fsync'd,
    # and startup reconciliation indexes any file whose row was lost with the OS.
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    cur.close()


def begin_write(conn: Connection) -> None:
    """Take SQLite's write lock now, at the start of a read-then-write transaction.

    pysqlite begins a transaction only at the first write, so the reads before it see
    whatever other processes (listener children, node/listener.py) commit meanwhile;
    BEGIN IMMEDIATE makes the whole transaction one consistent step, waiting for the
    lock as :func:`begin_immediate` does. PostgreSQL locks rows instead (FOR UPDATE)."""
    if conn.dialect.name == "sqlite":
        try:
            begin_immediate(conn.connection.dbapi_connection)
        except sqlite3.Error as exc:
            # raised as conn.exec_driver_sql would: callers catch SQLAlchemy's errors
            raise DBAPIError.instance("BEGIN IMMEDIATE", None, exc, sqlite3.Error) from exc


def begin_immediate(dbapi_connection: Any) -> None:
    """BEGIN IMMEDIATE on a pysqlite connection, retried in short steps while another
    connection holds the write lock, before SQLite's own busy handler takes over.

    That handler sleeps 1, 2, 5, 10, ... ms between tries. An instance's index write holds
    the lock for a fraction of a millisecond, so when two listener processes met there,
    the later one slept 1-3 ms for a lock free again after ~0.2 ms, on the critical path
    of its sender's next C-STORE (measured: BEGIN IMMEDIATE took 0.34 ms on average
    with four senders, up to 19 ms). The first tries here come at :data:`QUICK_WAITS`
    (busy_timeout 0 meanwhile); after them the usual wait of up to busy_timeout."""
    cur = dbapi_connection.cursor()
    try:
        cur.execute("PRAGMA busy_timeout=0")
        try:
            for wait in QUICK_WAITS:
                try:
                    cur.execute("BEGIN IMMEDIATE")
                    return
                except sqlite3.OperationalError as exc:
                    if exc.sqlite_errorcode != sqlite3.SQLITE_BUSY:
                        raise
                time.sleep(wait)
        finally:
            cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        cur.execute("BEGIN IMMEDIATE")
    finally:
        cur.close()


def is_postgresql(engine: Engine) -> bool:
    return engine.dialect.name == "postgresql"


def open_database(storage: StorageSettings) -> Engine:
    """The engine for ``[storage] database``, with the password from
    ``database_password_file`` when one is given (never inline in the TOML)."""
    return make_engine(storage.database, password_file=storage.database_password_file)


def make_engine(url: str, *, password_file: Path | None = None) -> Engine:
    """Create the engine, the tables if missing, and SQLite's WAL settings."""
    if password_file is not None:
        try:
            password = password_file.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"storage.database_password_file {password_file}: cannot read "
                              f"({exc.strerror})") from exc
        url = make_url(url).set(password=password).render_as_string(hide_password=False)
    if url.startswith("sqlite:///"):
        path = url.removeprefix("sqlite:///")
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
    else:
        # Several receivers and workers share one PostgreSQL: a dropped connection is
        # noticed before use (pre-ping) and replaced, so a database restart heals itself.
        engine = create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=10)
    Base.metadata.create_all(engine)
    _add_missing_columns(engine)
    return engine


def _add_missing_columns(engine: Engine) -> None:
    """Columns added after a table was first created (additive changes only; a new
    table, such as ``deliveries``, is created by ``create_all``)."""
    added = {("jobs", "queue"): "VARCHAR(32) NOT NULL DEFAULT 'default'",
             ("jobs", "owner"): "VARCHAR(128)",
             ("instances", "digest"): "VARCHAR(80)"}
    inspector = inspect(engine)
    with engine.begin() as conn:
        for (table, column), ddl in added.items():
            if column not in {c["name"] for c in inspector.get_columns(table)}:
                conn.exec_driver_sql(f"ALTER TABLE {table} ADD COLUMN {column} {ddl}")
