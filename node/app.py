"""Composition root: build the node from settings and run it."""

from __future__ import annotations

import logging
import os
import queue
import signal
import threading
from pathlib import Path
from types import FrameType

from sqlalchemy import Engine

from adapters.dimse import DimseReceiver, DimseSender
from node.assembly import Assembly
from node.db import make_engine
from node.forward import make_forward_handler
from node.intake import Intake
from node.jobs import JobRunner, JobStore
from node.routing import RoutePlanner
from node.errors import ConfigError
from node.settings import Settings, load_settings
from node.spool import Spool

log = logging.getLogger(__name__)


def pid_file(settings: Settings) -> Path:
    """Where a running node leaves its process ID (for ``pacsnode config reload``)."""
    return settings.storage.spool / ".pacsnode.pid"


class Node:
    """Every stage of the receiver role, wired together; :meth:`start` / :meth:`stop`."""

    def __init__(self, settings: Settings, *, engine: Engine | None = None) -> None:
        self.settings = settings
        storage = settings.storage
        self.engine = engine or make_engine(storage.database)
        self.spool = Spool(storage.spool, fsync=storage.fsync,
                           min_free_bytes=storage.min_free_mb * 1024 * 1024)
        lock = threading.Lock()
        self.intake = Intake(self.spool, self.engine, lock=lock)
        self.jobs = JobStore(self.engine, settings.jobs)
        self.planner = RoutePlanner(settings.routes, self.jobs, storage.spool)
        self.assembly = Assembly(self.engine, settings.assembly, self.planner, lock=lock)
        self.sender = DimseSender(ae_title=settings.node.ae_title)
        self.runner = JobRunner(
            self.jobs,
            {"forward": make_forward_handler(self.engine, lambda: self.settings, self.sender)},
            workers=settings.jobs.workers,
        )
        self._released: queue.Queue[set[str]] = queue.Queue()
        self.receiver = DimseReceiver(settings.node, self.intake, on_released=self._released.put)
        self._stop = threading.Event()
        self._reload = threading.Event()
        self._assembly_thread: threading.Thread | None = None

    def start(self) -> None:
        self.spool.root.mkdir(parents=True, exist_ok=True)
        self.spool.prepare()
        self.intake.reconcile()
        self.jobs.recover()
        self._assembly_thread = threading.Thread(target=self._assembly_loop, name="assembly",
                                                 daemon=True)
        self._assembly_thread.start()
        self.runner.start()
        self.receiver.start()
        pid_file(self.settings).write_text(f"{os.getpid()}\n")

    def reload(self) -> bool:
        """Load the configuration file again and swap routes and destinations.

        A file that does not validate is refused and the rules in force stay. Listener,
        storage and other settings need a restart; a change there is logged.
        """
        source = self.settings.source_file
        try:
            new = load_settings(source)
        except ConfigError as exc:
            log.error("reload refused, the current routes stay in force: %s", exc)
            return False
        for section in ("node", "storage", "http", "assembly", "jobs"):
            if getattr(new, section) != getattr(self.settings, section):
                log.warning("reload: [%s] changed; it takes effect at the next restart", section)
        self.planner.replace_routes(new.routes)
        self.settings = self.settings.model_copy(update={
            "routes": new.routes, "models": new.models, "destinations": new.destinations,
            "sources": new.sources})
        log.info("reloaded %s: %d route(s), %d destination(s)", source, len(new.routes),
                 len(new.destinations))
        return True

    def stop(self) -> None:
        log.info("stopping: no new associations")
        self.receiver.stop()
        self._stop.set()
        if self._assembly_thread is not None:
            self._assembly_thread.join(10)
        self.runner.stop()
        self.intake.close()
        self.engine.dispose()
        pid_file(self.settings).unlink(missing_ok=True)
        log.info("stopped")

    def _assembly_loop(self) -> None:
        interval = self.settings.assembly.check_interval_seconds
        while not self._stop.is_set():
            try:
                series = self._released.get(timeout=interval)
            except queue.Empty:
                series = None
            try:
                done = self.assembly.on_association_released(series) if series else []
                done += self.assembly.tick()
            except Exception:
                log.exception("assembly error")
                continue
            if done:
                self.runner.wake()

    def serve_forever(self) -> None:
        """Run until SIGTERM or SIGINT."""
        def _signal(signum: int, _frame: FrameType | None) -> None:
            log.info("signal %d received", signum)
            self._stop.set()

        def _hangup(signum: int, _frame: FrameType | None) -> None:
            self._reload.set()

        signal.signal(signal.SIGTERM, _signal)
        signal.signal(signal.SIGINT, _signal)
        signal.signal(signal.SIGHUP, _hangup)
        self.start()
        try:
            while not self._stop.wait(0.2):
                if self._reload.is_set():
                    self._reload.clear()
                    self.reload()
        finally:
            self.stop()
