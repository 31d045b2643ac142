"""Composition root: build the node from settings and run it."""

from __future__ import annotations

import functools
import logging
import os
import queue
import secrets
import selectors
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from collections.abc import Callable, Mapping
from types import FrameType

from sqlalchemy import Engine

from adapters.dimse import DimseReceiver
from adapters.http import AdminServer
from adapters.senders import AnySender
from adapters.sources import AnySource
from node.assembly import Assembly
from node.audit import AuditLog
from node.db import is_postgresql, open_database
from node.forward import make_forward_handler
from node.heap import settle_heap
from node.intake import Intake
from node.listener import listener_counters, read_release, remove_statuses
from node.metrics import Metrics, exposition
from node.notify import notify, watchdog_interval
from node.jobs import Job, JobRunner, JobStateValues, JobStore, owner_name
from node.routing import RoutePlanner
from node.errors import ConfigError, DeliveryError, SourceError
from node.settings import Settings, load_settings
from node.pull import Puller
from node.retention import Retention
from node.schedule import Scheduler, Task, cron, every
from node.spool import Spool, worker_statuses
from node.stow import StowReceiver

log = logging.getLogger(__name__)


def admin_token(settings: Settings) -> str:
    """The admin API token: from http.token_file, else one generated on first start and
    kept (mode 0600) in the spool, whose path is logged."""
    if settings.http.token_file is not None:
        try:
            return settings.http.token_file.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"http.token_file {settings.http.token_file}: cannot read "
                              f"({exc.strerror})") from exc
    path = settings.storage.spool / ".admin-token"
    if not path.exists():
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:     # another receiver on the shared spool made it first
            fd = -1
        if fd >= 0:
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_urlsafe(32) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            log.info("generated an admin API token in %s", path)
    return path.read_text().strip()


def stow_token(settings: Settings) -> str | None:
    """The STOW-RS-only token from http.stow_token_file, if one is configured."""
    path = settings.http.stow_token_file
    if path is None:
        return None
    try:
        return path.read_text().strip() or None
    except OSError as exc:
        raise ConfigError(f"http.stow_token_file {path}: cannot read ({exc.strerror})") from exc


def worker_environment(base: Mapping[str, str], parent_pid: int) -> dict[str, str]:
    """The environment of a worker process.

    NUMPY_MADVISE_HUGEPAGE=0 unless the admin set it: numpy asks for transparent huge
    pages for every large array, and where THP defrag is "madvise" (Debian's default) the
    first ~300 MB volume a worker allocates after memory was used otherwise waits for the
    kernel to compact memory: the volume stage of a 300 × 512² CT measured 0.8-1.8 s
    with, a steady 0.54-0.64 s without (bench/RESULTS.md, issue 9).
    """
    env = dict(base)
    env.setdefault("NUMPY_MADVISE_HUGEPAGE", "0")
    env["PACSNODE_PARENT_PID"] = str(parent_pid)
    return env


def wake_workers(spool: Path) -> None:
    """Tell the worker processes that new jobs may be waiting, so a job starts at once
    instead of at their next poll of the job table. Workers announce themselves in
    ``<spool>/.worker-status*.json``; the signal (SIGUSR1) goes only to a live process
    that is a pacsnode worker, never to whatever reused a stale pid."""
    for status in worker_statuses(spool):
        try:
            pid = int(status["pid"])
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError, KeyError, TypeError):
            continue
        ours = any(a == b"node.cli" or a.rsplit(b"/", 1)[-1] == b"pacsnode" for a in cmdline)
        if ours and b"worker" in cmdline:
            try:
                os.kill(pid, signal.SIGUSR1)
            except OSError:
                pass


def pid_file(settings: Settings) -> Path:
    """Where a running node leaves its process ID (for ``pacsnode config reload``); one
    per listener port where receivers may share the spool (a PostgreSQL database)."""
    if settings.storage.database.startswith("postgresql"):
        return settings.storage.spool / f".pacsnode-{settings.node.port}.pid"
    return settings.storage.spool / ".pacsnode.pid"


class Node:
    """Every stage of the receiver role, wired together; :meth:`start` / :meth:`stop`."""

    def __init__(self, settings: Settings, *, engine: Engine | None = None,
                 spawn_worker: bool = True) -> None:
        self.settings = settings
        self.spawn_worker = spawn_worker
        storage = settings.storage
        self.engine = engine or open_database(storage)
        # A shared database means a possibly shared spool: an owner name for the jobs this
        # receiver claims and a staging folder of its own.
        owner = owner_name(f"receiver-{settings.node.port}") if is_postgresql(self.engine) \
            else None
        self.spool = Spool(storage.spool, fsync=storage.fsync, direct_io=storage.direct_io,
                           min_free_bytes=storage.min_free_mb * 1024 * 1024,
                           staging=owner.replace(":", "-") if owner else None)
        lock = threading.Lock()
        self.intake = Intake(self.spool, self.engine, lock=lock)
        self.jobs = JobStore(self.engine, settings.jobs, owner=owner)
        self.audit = AuditLog(storage.audit_log)
        self.planner = RoutePlanner(settings.routes, self.jobs, storage.spool, settings.models,
                                    self.audit)
        self.assembly = Assembly(self.engine, settings.assembly, self.planner, lock=lock)
        self.sender = AnySender(ae_title=settings.node.ae_title)
        self.runner = JobRunner(
            self.jobs,
            {"forward": make_forward_handler(self.engine, lambda: self.settings, self.sender,
                                             self.audit),
             "fetch_priors": self._fetch_priors},
            workers=settings.jobs.workers, audit=self.audit,
        )
        # released associations, STOW-RS requests and pulls: series UID -> instances carried
        self._released: queue.Queue[dict[str, int]] = queue.Queue()
        self.metrics = Metrics()
        self.receiver = DimseReceiver(settings.node, self.intake, on_released=self._released.put,
                                      metrics=self.metrics, moved_from=self._moving_source)
        # STOW-RS: the end of a request counts as an association release (fast path)
        self.stow = StowReceiver(self.intake, ae_title=settings.node.ae_title,
                                 on_released=self._released.put, metrics=self.metrics) \
            if settings.http.stow else None
        self.puller = Puller(self.intake, self.engine, AnySource(ae_title=settings.node.ae_title),
                             on_released=self._released.put, metrics=self.metrics,
                             ae_title=settings.node.ae_title)
        self.retention = Retention(self.engine, self.spool, settings.retention, lock=lock)
        self.scheduler = Scheduler(self.engine, settings.schedule, owner=owner)
        # the fine-tuning work plugs its nightly entry point in here
        self.finetune: Callable[[], object] | None = None
        self.admin: AdminServer | None = None
        self._stop = threading.Event()
        self._reload = threading.Event()
        self.worker: WorkerSupervisor | None = None
        self.listeners: ListenerSupervisor | None = None
        self._assembly_thread: threading.Thread | None = None

    def start(self) -> None:
        self.spool.root.mkdir(parents=True, exist_ok=True)
        self.spool.prepare()
        self.intake.reconcile()
        self.jobs.recover(kinds=set(self.runner.handlers))
        self._assembly_thread = threading.Thread(target=self._assembly_loop, name="assembly",
                                                 daemon=True)
        self._assembly_thread.start()
        self.runner.start()
        self.receiver.start()
        if self.settings.node.listener_processes > 1 and self.settings.source_file is None:
            # the children load the settings from the file (settings made in code: tests)
            log.warning("listener_processes = %d, but the settings were not loaded from a "
                        "file for the listener processes to read: this process listens alone",
                        self.settings.node.listener_processes)
        elif self.settings.node.listener_processes > 1:
            remove_statuses(self.settings)
            self.listeners = ListenerSupervisor(self.settings, on_released=self._released.put,
                                                listen_fd=self.receiver.listening_fd)
            self.listeners.start()
        self.admin = AdminServer(
            self.settings.http.host, self.settings.http.port, token=admin_token(self.settings),
            ready=self.readiness, jobs=self.jobs,
            metrics=lambda: exposition(self.metrics, self.engine, self.spool.root,
                                       listener_counters(self.settings)),
            stow=self.stow, stow_token=stow_token(self.settings))
        self.admin.start()
        pid_file(self.settings).write_text(f"{os.getpid()}\n")
        self.scheduler.start(self.scheduled_tasks())
        if self.spawn_worker and self.settings.models:
            self.worker = WorkerSupervisor(self.settings)
            self.worker.start()

    def scheduled_tasks(self) -> list[Task]:
        """The periodic work of this node (see node/schedule.py)."""
        s = self.settings.schedule
        tasks = [
            Task("retry-sweep", self.runner.wake, every(s.retry_sweep_seconds)),
            Task("stale-jobs", self._requeue_stale, every(s.stale_check_seconds)),
        ]
        # once: on one receiver at a time where several share the database
        tasks += [Task(f"poll:{source.name}", functools.partial(self._poll, source.name),
                       every(source.interval_seconds), once=True)
                  for source in self.settings.sources]
        if self.retention.enabled:
            tasks.append(Task("retention", self.retention.run,
                              every(self.settings.retention.check_interval_minutes * 60),
                              once=True))
        if s.finetune_cron:
            tasks.append(Task("finetune-nightly", self._finetune_nightly, cron(s.finetune_cron),
                              once=True))
        return tasks

    def _moving_source(self, calling_ae_title: str) -> str | None:
        """The C-MOVE source (with the settings in force now) whose PACS is this caller."""
        return next((s.name for s in self.settings.sources if s.kind == "dimse"
                     and s.retrieve == "move" and s.ae_title == calling_ae_title), None)

    def _poll(self, name: str) -> None:
        """Poll a source by name, with the settings in force now (reload may change them)."""
        source = next((s for s in self.settings.sources if s.name == name), None)
        if source is None:
            log.info("poll:%s: the source is no longer configured", name)
            return
        self.puller.poll(source)

    def _fetch_priors(self, job: Job, store: JobStore) -> None:
        """A fetch_priors job: earlier studies of the patient from a source (node/pull.py)."""
        name = str(job.payload.get("source"))
        source = next((s for s in self.settings.sources if s.name == name), None)
        if source is None:
            raise ConfigError(f"job {job.id}: source {name!r} is no longer configured")
        try:
            report = self.puller.fetch_priors(source, job.study_instance_uid,
                                              int(job.payload.get("priors", 1)))
        except SourceError as exc:
            raise DeliveryError(f"fetching priors: {exc}", retryable=True) from exc
        if report.error:
            raise DeliveryError(f"fetching priors: {report.error}", retryable=True)
        store.advance(job.id, JobStateValues.DONE,
                      step=f"fetched:{report.fetched} series,{report.instances} instances")

    def _requeue_stale(self) -> None:
        if self.jobs.requeue_stale(self.settings.schedule.stale_after_seconds):
            self.runner.wake()

    def _finetune_nightly(self) -> None:
        if self.finetune is None:
            log.info("finetune_nightly: no finetune configured")
            return
        self.finetune()

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
        for section in ("node", "storage", "http", "assembly", "jobs", "schedule", "retention"):
            if getattr(new, section) != getattr(self.settings, section):
                log.warning("reload: [%s] changed; it takes effect at the next restart", section)
        self.planner.replace_routes(new.routes, new.models)
        models_changed = new.models != self.settings.models
        self.settings = self.settings.model_copy(update={
            "routes": new.routes, "models": new.models, "destinations": new.destinations,
            "sources": new.sources})
        log.info("reloaded %s: %d route(s), %d destination(s)", source, len(new.routes),
                 len(new.destinations))
        if self.scheduler.running:
            self.scheduler.update(self.scheduled_tasks())     # sources added or removed
        if models_changed and self.spawn_worker:
            log.info("models changed: restarting the worker process")
            if self.worker is not None:
                self.worker.stop()
            self.worker = WorkerSupervisor(self.settings) if self.settings.models else None
            if self.worker is not None:
                self.worker.start()
        return True

    def readiness(self) -> dict[str, tuple[bool, str]]:
        """Database reachable, spool writable, disk above the threshold, workers alive."""
        checks: dict[str, tuple[bool, str]] = {}
        try:
            with self.engine.connect() as conn:
                conn.exec_driver_sql("SELECT 1")
            checks["database"] = (True, "reachable")
        except Exception as exc:  # noqa: BLE001  any driver error means not ready
            checks["database"] = (False, f"{type(exc).__name__}: {exc}")
        probe = self.spool.root / ".tmp" / f"ready-{os.getpid()}"
        try:
            probe.write_bytes(b"ok")
            probe.unlink()
            checks["spool"] = (True, f"{self.spool.root} writable")
        except OSError as exc:
            checks["spool"] = (False, f"{self.spool.root} not writable: {exc.strerror}")
        free = self.spool.free_bytes()
        floor = self.settings.storage.min_free_mb * 1024 * 1024
        checks["disk"] = (free > floor, f"{free // (1024 * 1024)} MiB free, minimum "
                          f"{self.settings.storage.min_free_mb} MiB")
        for name, supervisor in (("workers", self.worker), ("listeners", self.listeners)):
            if supervisor is not None:
                dead = [d for d, p in supervisor.procs.items() if p.poll() is not None]
                checks[name] = (not dead, f"not running: {', '.join(dead)}" if dead
                                else f"{len(supervisor.procs)} running")
        return checks

    def stop(self) -> None:
        log.info("stopping: no new associations")
        self.scheduler.stop()
        self.receiver.stop()
        if self.listeners is not None:
            self.listeners.stop()
        if self.admin is not None:
            self.admin.stop()
        if self.worker is not None:
            self.worker.stop()
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
                wake_workers(self.settings.storage.spool)

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
        settle_heap()
        notify("READY=1", f"STATUS=listening on port {self.receiver.port}")
        watchdog = watchdog_interval()
        last_ping = 0.0
        try:
            while not self._stop.wait(0.2):
                if watchdog is not None and time.monotonic() - last_ping >= watchdog:
                    notify("WATCHDOG=1")        # the main loop is alive
                    last_ping = time.monotonic()
                if self._reload.is_set():
                    self._reload.clear()
                    self.reload()
                if self.worker is not None:
                    self.worker.check()
                if self.listeners is not None:
                    self.listeners.check()
        finally:
            notify("STOPPING=1")
            self.stop()


class WorkerSupervisor:
    """Runs one worker process per device queue (the distinct ``device`` values of the
    models) and restarts any that dies, with a backoff doubling up to a minute: a CUDA
    crash or an OOM kill there must not stop intake."""

    what = "worker process"

    def __init__(self, settings: Settings, *, keys: list[str] | None = None) -> None:
        """``keys``: the processes to run (default: one per device queue)."""
        self.settings = settings
        # executor "ray": one process dispatches to the cluster's model actors
        self.devices = keys if keys is not None else ["ray"] \
            if settings.executor.kind == "ray" else sorted({m.device for m in settings.models})
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._backoff = {d: 1.0 for d in self.devices}
        self._next_start = {d: 0.0 for d in self.devices}
        self._started = {d: 0.0 for d in self.devices}

    def start(self) -> None:
        for device in self.devices:
            self._start(device)

    def _start(self, device: str) -> None:
        assert self.settings.source_file is not None
        queue = [] if device == "ray" else ["--device", device]
        proc = subprocess.Popen(
            [sys.executable, "-m", "node.cli", "serve", "--role", "worker", *queue,
             "-c", str(self.settings.source_file)],
            env=worker_environment(os.environ, os.getpid()))
        self.procs[device] = proc
        self._started[device] = time.monotonic()
        log.info("worker process %d started for device queue %s", proc.pid, device)

    def check(self) -> None:
        now = time.monotonic()
        for device, proc in list(self.procs.items()):
            if proc.poll() is None:
                continue
            if self._next_start[device] == 0.0:
                if now - self._started[device] > 60:
                    self._backoff[device] = 1.0
                log.error("%s %d (%s) exited with %s; restarting in %.0f s", self.what,
                          proc.pid, device, proc.returncode, self._backoff[device])
                self._next_start[device] = now + self._backoff[device]
                self._backoff[device] = min(60.0, self._backoff[device] * 2)
            elif now >= self._next_start[device]:
                self._next_start[device] = 0.0
                self._start(device)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


class ListenerSupervisor(WorkerSupervisor):
    """The listener children of ``[node] listener_processes`` (node/listener.py), run and
    restarted like workers. Each gets the write end of a pipe on which it announces its
    released associations, one JSON object {series UID: instances carried} per line; a
    thread here reads them all and hands each to ``on_released`` (assembly's fast path).
    Each also inherits the receiver's listening socket, ``listen_fd``."""

    what = "listener process"

    def __init__(self, settings: Settings, *,
                 on_released: Callable[[dict[str, int]], None], listen_fd: int) -> None:
        super().__init__(settings, keys=[str(i) for i in
                                         range(1, settings.node.listener_processes)])
        self.on_released = on_released
        self.listen_fd = listen_fd
        self._selector = selectors.DefaultSelector()
        self._partial: dict[int, bytes] = {}
        self._closing = threading.Event()
        self._reader = threading.Thread(target=self._read_loop, name="listener-releases",
                                        daemon=True)

    def start(self) -> None:
        self._reader.start()
        super().start()

    def _start(self, device: str) -> None:
        assert self.settings.source_file is not None
        read_fd, write_fd = os.pipe()
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "node.cli", "serve", "--role", "listener",
                 "--listener-index", device, "-c", str(self.settings.source_file)],
                env={**os.environ, "PACSNODE_PARENT_PID": str(os.getpid()),
                     "PACSNODE_RELEASE_FD": str(write_fd),
                     "PACSNODE_LISTEN_FD": str(self.listen_fd)},
                pass_fds=(write_fd, self.listen_fd))
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        self._partial[read_fd] = b""
        self._selector.register(read_fd, selectors.EVENT_READ)
        self.procs[device] = proc
        self._started[device] = time.monotonic()
        log.info("listener process %d started (listener %s)", proc.pid, device)

    def _read_loop(self) -> None:
        while not self._closing.is_set():
            for key, _ in self._selector.select(timeout=0.5):
                self._read(int(key.fd))

    def _read(self, fd: int) -> None:
        try:
            chunk = os.read(fd, 65536)
        except OSError:
            chunk = b""
        if not chunk:                   # the child exited: its end is closed
            self._selector.unregister(fd)
            os.close(fd)
            self._partial.pop(fd, None)
            return
        *lines, rest = (self._partial[fd] + chunk).split(b"\n")
        self._partial[fd] = rest
        for line in lines:
            try:
                carried = read_release(line)
            except (ValueError, TypeError):
                log.error("listener pipe: unreadable line of %d bytes ignored", len(line))
                continue
            if carried:
                self.on_released(carried)

    def stop(self) -> None:
        super().stop()
        self._closing.set()
        if self._reader.is_alive():
            self._reader.join(5)
        for fd in list(self._partial):
            self._selector.unregister(fd)
            os.close(fd)
        self._partial.clear()
        self._selector.close()
