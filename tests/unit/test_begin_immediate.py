"""node.db.begin_immediate: SQLite's write lock taken in short steps while another
connection (another listener process, in production) holds it for a moment."""

from __future__ import annotations

import sqlite3
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy.exc import OperationalError

from node import db
from node.db import begin_immediate, make_engine


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, check_same_thread=False)
    conn.execute(f"PRAGMA busy_timeout={db.BUSY_TIMEOUT_MS}")
    return conn


def _busy_timeout(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA busy_timeout").fetchone()[0])


@pytest.fixture()
def database(tmp_path: Path) -> Path:
    path = tmp_path / "index.db"
    make_engine(f"sqlite:///{path}").dispose()      # WAL, as the node's index
    return path


def _hold(path: Path, seconds: float) -> tuple[threading.Thread, threading.Event]:
    """Another connection takes the write lock and releases it after ``seconds``."""
    taken = threading.Event()

    def run() -> None:
        other = _connect(path)
        other.execute("BEGIN IMMEDIATE")
        taken.set()
        time.sleep(seconds)
        other.commit()
        other.close()

    thread = threading.Thread(target=run)
    thread.start()
    assert taken.wait(10)
    return thread, taken


@pytest.mark.parametrize("hold", [0.02, 0.2])     # within the quick waits, and past them
def test_waits_for_a_lock_released_later(database: Path, hold: float) -> None:
    conn = _connect(database)
    thread, _ = _hold(database, hold)
    start = time.monotonic()
    begin_immediate(conn)
    waited = time.monotonic() - start
    thread.join()
    assert conn.in_transaction
    assert waited >= hold * 0.5         # it did wait for the other connection
    conn.execute("CREATE TABLE IF NOT EXISTS probe (x)")     # and may write now
    conn.commit()
    assert _busy_timeout(conn) == db.BUSY_TIMEOUT_MS
    conn.close()


def test_gives_up_after_busy_timeout(database: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(db, "BUSY_TIMEOUT_MS", 150)
    conn = _connect(database)
    thread, _ = _hold(database, 1.0)
    start = time.monotonic()
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        begin_immediate(conn)
    assert 0.1 < time.monotonic() - start < 0.9
    thread.join()
    assert not conn.in_transaction
    assert _busy_timeout(conn) == 150
    conn.close()


def test_other_errors_are_raised_at_once(database: Path) -> None:
    conn = _connect(database)
    conn.execute("BEGIN")
    start = time.monotonic()
    with pytest.raises(sqlite3.OperationalError, match="within a transaction"):
        begin_immediate(conn)
    assert time.monotonic() - start < 0.005 + sum(db.QUICK_WAITS[:1])
    assert _busy_timeout(conn) == db.BUSY_TIMEOUT_MS
    conn.rollback()
    conn.close()


def _median_wait(database: Path, begin: Callable[[sqlite3.Connection], None],
                 hold: float, rounds: int) -> float:
    conn = _connect(database)
    waits = []
    for _ in range(rounds):
        thread, _ = _hold(database, hold)
        start = time.monotonic()
        begin(conn)
        waits.append(time.monotonic() - start)
        conn.rollback()
        thread.join()
    conn.close()
    return statistics.median(waits)


def test_takes_a_briefly_held_lock_sooner_than_sqlites_busy_handler(database: Path) -> None:
    # A lock held ~1.5 ms: SQLite's handler tries again after 1 ms, then after 3 ms in
    # all; the quick waits try at 0.05, 0.15, 0.35 ms, then every 0.4 ms.
    def plain(conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")

    quick = _median_wait(database, begin_immediate, 0.0015, 15)
    handler = _median_wait(database, plain, 0.0015, 15)
    assert quick < handler, (quick, handler)


def test_begin_write_raises_sqlalchemys_error(database: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Callers of begin_write (intake, assembly, retention) catch SQLAlchemy's
    OperationalError, as conn.exec_driver_sql raised it."""
    monkeypatch.setattr(db, "BUSY_TIMEOUT_MS", 100)
    engine = make_engine(f"sqlite:///{database}")
    thread, _ = _hold(database, 0.6)
    try:
        with engine.connect() as conn, pytest.raises(OperationalError, match="locked"):
            with conn.begin():
                db.begin_write(conn)
    finally:
        thread.join()
        engine.dispose()
