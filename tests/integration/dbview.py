"""Read a node's SQLite index directly (tests only)."""

from __future__ import annotations

import sqlite3
from datetime import datetime
from pathlib import Path
from typing import Any


class IndexView:
    def __init__(self, db: Path) -> None:
        self.db = db

    def _query(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        if not self.db.exists():
            return []
        con = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=30)
        try:
            return con.execute(sql, args).fetchall()
        except sqlite3.OperationalError:
            return []
        finally:
            con.close()

    def counts(self) -> tuple[int, int, int]:
        return (self._query("select count(*) from studies")[0][0],
                self._query("select count(*) from series")[0][0],
                self._query("select count(*) from instances")[0][0])

    def sop_uids(self) -> set[str]:
        return {r[0] for r in self._query("select sop_instance_uid from instances")}

    def paths(self) -> dict[str, str]:
        return dict(self._query("select sop_instance_uid, path from instances"))

    def series(self, uid: str) -> dict[str, Any] | None:
        rows = self._query("select state, completion_reason, completed_at, generation "
                           "from series where series_instance_uid = ?", uid)
        if not rows:
            return None
        state, reason, completed, generation = rows[0]
        return {"state": state, "completion_reason": reason, "generation": generation,
                "completed_at": datetime.fromisoformat(completed) if completed else None}

    def jobs(self) -> list[dict[str, Any]]:
        rows = self._query("select id, kind, state, step, attempts, last_error, series_instance_uid"
                           " from jobs order by id")
        keys = ("id", "kind", "state", "step", "attempts", "last_error", "series_instance_uid")
        return [dict(zip(keys, r)) for r in rows]
