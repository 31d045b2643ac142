"""Listener children: more processes accepting associations on the receiver's DICOM port.

One Python process stores on one core (one GIL). With ``[node] listener_processes = N``
the receiver starts N-1 children (``pacsnode serve --role listener``, supervised by
node/app.py's ListenerSupervisor) that inherit its listening socket; all N accept from
it, and a new association goes to whichever is free first (adapters/dimse.py
SharedSocketServer). A child runs only C-STORE intake: the
same AE checks and TLS (adapters/dimse.py), the same spool and index (node/intake.py),
its own staging folder. Everything else (assembly, routing, jobs, delivery, the admin
API) stays in the receiver.

What a child tells the receiver:

- released associations: one JSON line per release (an object: each series it carried
  and how many instances of it) on a pipe
  the supervisor made, which the receiver feeds to assembly's fast path as if its own
  listener had seen the release. A line lost with a killed child costs only the fast
  path: the quiet period completes the series;
- counters: ``<spool>/.listener-status-<host>-<port>-<index>.json``, rewritten every
  second and at exit, added into the receiver's /metrics. A restarted child continues
  from its file, so the sums only lose what a killed child counted in its last second.

The audit log is appended to with one O_APPEND write per line from every process
(node/audit.py); intake itself writes none.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

from adapters.dimse import DimseReceiver
from node.db import open_database
from node.heap import settle_heap
from node.intake import Intake
from node.jobs import owner_name
from node.metrics import CounterKey, Metrics
from node.settings import Settings
from node.spool import Spool, write_status_file

log = logging.getLogger(__name__)

STATUS_INTERVAL = 1.0


def read_release(line: bytes) -> dict[str, int]:
    """A release line of :meth:`ListenerNode._announce`: {series UID: instances carried}.
    A plain list of series UIDs (a child of an earlier version, during an upgrade) carries
    counts of 0: not known, so that only ImagesInAcquisition can prove those series
    complete. Raises ValueError or TypeError for anything else."""
    message = json.loads(line)
    if isinstance(message, dict):
        return {str(uid): int(count) for uid, count in message.items()}
    if isinstance(message, list):
        return {str(uid): 0 for uid in message}
    raise TypeError(f"a JSON object or list, not {type(message).__name__}")


def status_prefix(settings: Settings) -> str:
    """File name start of the status files of this receiver's children (one receiver per
    port and host may share a spool with others: PostgreSQL)."""
    return f".listener-status-{socket.gethostname()}-{settings.node.port}-"


def status_path(settings: Settings, index: int) -> Path:
    return settings.storage.spool / f"{status_prefix(settings)}{index}.json"


def write_status(path: Path, *, pid: int, index: int, metrics: Metrics) -> None:
    """Replace the status file atomically (a reader never sees half of it)."""
    counters = [[name, dict(labels), value]
                for (name, labels), value in sorted(metrics.snapshot().items())]
    write_status_file(path, {"pid": pid, "index": index, "counters": counters})


def read_counters(path: Path) -> dict[CounterKey, float]:
    """The counters in one status file; an unreadable or malformed file counts as none."""
    try:
        data = json.loads(path.read_text())
        return {(str(name), tuple(sorted((str(k), str(v)) for k, v in labels.items()))):
                float(value) for name, labels, value in data["counters"]}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def listener_counters(settings: Settings) -> Iterator[tuple[CounterKey, float]]:
    """Every counter of this receiver's children, for the receiver's /metrics."""
    for path in sorted(settings.storage.spool.glob(status_prefix(settings) + "*.json")):
        yield from read_counters(path).items()


def remove_statuses(settings: Settings) -> None:
    """At the receiver's start: counters of an earlier run do not carry over."""
    for path in settings.storage.spool.glob(status_prefix(settings) + "*"):
        path.unlink(missing_ok=True)


class ListenerNode:
    """One listener child: the DICOM listener and intake, nothing else."""

    def __init__(self, settings: Settings, *, index: int, release_fd: int | None,
                 listen_fd: int) -> None:
        self.settings = settings
        self.index = index
        storage = settings.storage
        self.engine = open_database(storage)
        owner = owner_name(f"listener-{settings.node.port}-{index}")
        self.spool = Spool(storage.spool, fsync=storage.fsync, direct_io=storage.direct_io,
                           min_free_bytes=storage.min_free_mb * 1024 * 1024,
                           staging=owner.replace(":", "-"))
        self.intake = Intake(self.spool, self.engine)
        self.metrics = Metrics()
        self.status = status_path(settings, index)
        for (name, labels), value in read_counters(self.status).items():
            self.metrics.inc(name, value, **dict(labels))   # a restart continues the sums
        self.receiver = DimseReceiver(settings.node, self.intake, on_released=self._announce,
                                      metrics=self.metrics, moved_from=self._moving_source,
                                      listen_fd=listen_fd)
        self._release_fd = release_fd
        self._release_lock = threading.Lock()
        self._stop = threading.Event()

    def _moving_source(self, calling_ae_title: str) -> str | None:
        return next((s.name for s in self.settings.sources if s.kind == "dimse"
                     and s.retrieve == "move" and s.ae_title == calling_ae_title), None)

    def _announce(self, carried: dict[str, int]) -> None:
        """Hand a released association's series, with the instances it carried of each,
        to the receiver (assembly's fast path)."""
        if self._release_fd is None:
            return
        view = memoryview((json.dumps(carried, sort_keys=True) + "\n").encode())
        with self._release_lock:
            try:
                while view:
                    view = view[os.write(self._release_fd, view):]
            except OSError as exc:      # the receiver is gone; the quiet period remains
                log.warning("cannot tell the receiver about a released association: %s", exc)

    def _write_status(self) -> None:
        try:
            write_status(self.status, pid=os.getpid(), index=self.index, metrics=self.metrics)
        except OSError as exc:
            log.warning("listener status %s not written: %s", self.status, exc)

    def serve_forever(self) -> None:
        """Run until SIGTERM/SIGINT, or until the receiver that started it is gone."""
        def _signal(signum: int, _frame: FrameType | None) -> None:
            log.info("listener %d: signal %d received", self.index, signum)
            self._stop.set()

        signal.signal(signal.SIGTERM, _signal)
        signal.signal(signal.SIGINT, _signal)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)        # reload is the receiver's
        parent = int(os.environ.get("PACSNODE_PARENT_PID", "0") or 0)
        self.spool.root.mkdir(parents=True, exist_ok=True)
        self.spool.prepare()
        self.receiver.start()
        settle_heap()
        log.info("listener %d (pid %d) ready on port %d", self.index, os.getpid(),
                 self.receiver.port)
        try:
            while not self._stop.wait(STATUS_INTERVAL):
                self._write_status()
                if parent and os.getppid() != parent:
                    log.warning("listener %d: the receiver that started it is gone; stopping",
                                self.index)
                    break
        finally:
            self.receiver.stop()
            self.intake.close()
            self._write_status()
            self.engine.dispose()
            if self._release_fd is not None:
                os.close(self._release_fd)
            log.info("listener %d stopped", self.index)
