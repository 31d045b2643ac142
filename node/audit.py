"""The audit log: append-only JSON lines, one per event in a study's life (received,
routed, inferred, delivered, failed). It is the one place patient identifiers appear;
ordinary logs carry UIDs only.

Every process of a node appends to the same file; each event is one ``write`` on a file
opened with O_APPEND, so lines from several processes never interleave.
"""

from __future__ import annotations

import json
import os
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


class AuditLog:
    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._lock = threading.Lock()

    def write(self, event: str, study_instance_uid: str, **fields: Any) -> None:
        if self.path is None:
            return
        record = {"time": datetime.now(UTC).isoformat(timespec="milliseconds"),
                  "event": event, "study_instance_uid": study_instance_uid, **fields}
        line = (json.dumps(record, default=str, ensure_ascii=False) + "\n").encode()
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)


NO_AUDIT = AuditLog(None)
