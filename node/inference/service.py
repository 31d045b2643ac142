"""The worker role: claims ``infer`` jobs, runs them on resident models, saves predictions.

Runs in its own process (``pacsnode serve --role worker``, or spawned by the all-in-one
``serve``), so a CUDA crash or an out-of-memory kill here can never refuse an
association: the receiver keeps taking studies and the jobs wait in the table.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any, BinaryIO

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataset import Dataset
from sqlalchemy import select
from sqlalchemy.orm import Session

from node.audit import NO_AUDIT, AuditLog
from node.db import JobRow, is_postgresql, open_database
from node.errors import ModelError
from node.finetune.registry import active_model_settings
from node.forward import deliver, job_files
from node.inference.runner import ModelInfo, ModelPool, Prediction
from node.inference.volume import Volume, load_series
from node.jobs import Job, JobHandler, JobRunner, JobStateValues, JobStore, owner_name
from node.notify import notify
from node.ports import Sender
from node.results.seg import build_seg, label_counts
from node.results.sr import build_sr
from node.results.warm import warm_up
from node.settings import Settings
from node.spool import write_status_file

log = logging.getLogger(__name__)



def results_root(settings: Settings) -> Path:
    return settings.storage.spool.parent / "results"


def status_file(settings: Settings, device: str | None = None) -> Path:
    suffix = "" if device is None else "-" + device.replace(":", "")
    return settings.storage.spool / f".worker-status{suffix}.json"


@dataclass(frozen=True)
class SavedPrediction:
    path: Path
    voxels: dict[int, int]
    volume_mm3: dict[int, float]
    ran_on: str | None = None           # where it ran, when not in this process (Ray node)
    seconds: dict[str, float] = field(default_factory=dict)   # per stage (infer_series)


def save_prediction(directory: Path, prediction: Prediction, volume: Volume) -> SavedPrediction:
    """Write labels + geometry + provenance as one .npz, atomically (temp, fsync, rename)."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"{volume.series_instance_uid}.npz"
    temp = directory / f".{final.name}.part"
    arrays: dict[str, Any] = {"labels": prediction.labels} if prediction.labels is not None \
        else {"class_probabilities": np.asarray(prediction.class_probabilities or ())}
    with temp.open("wb") as fh:
        write_npz(
            fh, **arrays, affine=volume.affine,
            spacing=np.asarray(volume.spacing),
            sop_instance_uids=np.asarray(volume.sop_instance_uids),
            frame_numbers=np.asarray(volume.frame_numbers),
            provenance=np.asarray(json.dumps({
                "model": prediction.model, "version": prediction.version,
                "weights_sha256": prediction.weights_sha256, "device": prediction.device,
                "series_instance_uid": volume.series_instance_uid})))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(temp, final)
    voxel_mm3 = float(np.prod(volume.spacing))
    if prediction.labels is None:
        return SavedPrediction(final, {}, {})
    voxels = {v: c for v, c in label_counts(prediction.labels).items() if v != 0}
    return SavedPrediction(final, voxels, {v: c * voxel_mm3 for v, c in voxels.items()})


def write_npz(fh: BinaryIO, **arrays: npt.NDArray[Any]) -> None:
    """``np.savez_compressed`` at zlib level 1 instead of 6: a label map is mostly zeros,
    which level 1 packs about as well (hundreds of KiB for a 300-slice CT) in half the
    time. ``np.load`` reads it like any .npz."""
    with zipfile.ZipFile(fh, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for name, array in arrays.items():
            with zf.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)


def write_dicom(path: Path, ds: Dataset) -> Path:
    """Write a result object durably: temp file, fsync, rename."""
    temp = path.with_name(f".{path.name}.part")
    with temp.open("wb") as fh:
        ds.save_as(fh, enforce_file_format=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(temp, path)
    return path


def encode_results(job: Job, prediction: Prediction, volume: Volume,
                   files: Sequence[Path | Dataset],
                   info: ModelInfo, out_dir: Path, *,
                   predecessor: Dataset | None = None,
                   voxel_counts: Mapping[int, int] | None = None) -> list[Path]:
    """SEG (when the model segments and found something) and TID 1500 SR (measurements
    and/or class probabilities), with UIDs derived from the job key
    and the model version, so a re-encode after a crash produces the same objects. A
    follow-up (late images) names the earlier SR as its predecessor, superseding it."""
    source = [f if isinstance(f, Dataset) else pydicom.dcmread(f, stop_before_pixels=True)
              for f in files]     # headers only: the SEG references them, needs no pixels
    common: dict[str, Any] = {
        "model": prediction.model, "version": prediction.version,
        "weights_sha256": prediction.weights_sha256, "job_key": job.key,
        "sop_instance_uids": volume.sop_instance_uids, "content_datetime": job.created_at}
    seg = None
    if info.labels:
        if prediction.labels is None:
            raise ModelError(f"model {info.name}: declares labels but returned no label map")
        if voxel_counts is None:            # counted once, for SEG and SR
            voxel_counts = label_counts(prediction.labels)
        seg = build_seg(source, prediction.labels, info.labels,
                        probabilities=prediction.probabilities, voxel_counts=voxel_counts,
                        **common)
    sr = build_sr(seg, source, prediction.labels, volume.array, volume.spacing, info.labels,
                  classes=info.classes, class_probabilities=prediction.class_probabilities,
                  predecessor=predecessor, voxel_counts=voxel_counts, **common)
    written = []
    if seg is not None:
        written.append(write_dicom(out_dir / "seg.dcm", seg))
    written.append(write_dicom(out_dir / "sr.dcm", sr))
    return written


Predict = Callable[[Job, Settings, Path], "SavedPrediction"]


def make_infer_handler(engine: Any, current: Callable[[], Settings], pool: ModelPool,
                       sender: Sender | None = None,
                       on_predicted: Callable[[], None] = lambda: None,
                       audit: AuditLog = NO_AUDIT, *,
                       predict: Predict | None = None) -> JobHandler:
    """predict → encode SEG/SR → ENCODED → deliver → DONE. ``predict`` runs the model
    and writes the results into the job's folder: here by default, or on a Ray actor
    (node/inference/ray_executor.py)."""
    run: Predict = predict or (lambda job, settings, out_dir: _predict_and_encode(
        engine, settings, pool, job, out_dir))

    def handle(job: Job, store: JobStore) -> None:
        settings = current()
        served = set(pool.loaded())
        changed = pool.update({m.name: m for m in active_model_settings(settings)
                               if m.name in served})
        if changed:
            log.info("model(s) %s: a new version is active; reloading", ", ".join(changed))
        out_dir = results_root(settings) / f"job-{job.id}"
        if not (job.step or "").startswith("encoded"):
            started = datetime.now(UTC)
            saved = run(job, settings, out_dir)
            where = {"ran_on": saved.ran_on} if saved.ran_on else {}
            audit.write("inferred", job.study_instance_uid, job=job.id,
                        series_instance_uid=job.series_instance_uid,
                        model=job.payload.get("model"),
                        volume_mm3={str(k): round(v, 1) for k, v in saved.volume_mm3.items()},
                        results=[p.name for p in sorted(out_dir.glob("*.dcm"))],
                        started=started.isoformat(timespec="milliseconds"),
                        seconds={k: round(v, 3) for k, v in saved.seconds.items()}, **where)
            on_predicted()
            store.advance(job.id, JobStateValues.ENCODED, step="encoded;")
            job = store.get(job.id)
        objects = sorted(out_dir.glob("*.dcm"))
        if job.payload.get("destinations") and sender is not None:
            deliver(job, store, objects, settings, sender, step_prefix="encoded;",
                    audit=audit)
        else:
            store.advance(job.id, JobStateValues.DONE, step="encoded;")

    return handle


def _predict_and_encode(engine: Any, settings: Settings, pool: ModelPool, job: Job,
                        out_dir: Path) -> SavedPrediction:
    files = job_files(engine, settings.storage.spool, job)
    return infer_series(pool, job, files, out_dir,
                        predecessor=previous_sr(engine, settings, job))


def infer_series(pool: ModelPool, job: Job, files: Sequence[Path], out_dir: Path, *,
                 predecessor: Path | None = None) -> SavedPrediction:
    """The part of an ``infer`` job that needs the model and the files, not the database:
    load the series, predict, save the prediction, write SEG + SR into ``out_dir``. The
    result carries the seconds each stage took (the audit log and bench/latency.py read
    them): ``volume`` (read and stack the files), ``predict`` (model call, including a
    load if the model was not resident), ``encode`` (save the arrays, build and write SEG
    and SR)."""
    model = str(job.payload.get("model", ""))
    clock = time.perf_counter()
    if job.series_instance_uid is None:
        raise ModelError(f"route {job.route} runs {model} on a whole study; give the route "
                         f"a select block so the model gets one series")
    volume, headers = load_series(files, series_instance_uid=job.series_instance_uid)
    seconds = {"volume": time.perf_counter() - clock}
    clock = time.perf_counter()
    prediction = pool.predict(model, volume)
    seconds["predict"] = time.perf_counter() - clock
    clock = time.perf_counter()
    saved = save_prediction(out_dir, prediction, volume)
    log.info("job %d: %s %s on %s in %.2f s: %s", job.id, prediction.model,
             prediction.version, prediction.device, prediction.seconds,
             ", ".join(f"label {k}: {v:.0f} mm3" for k, v in saved.volume_mm3.items())
             or _classes_text(prediction) or "nothing found")
    by_uid = {str(ds.SOPInstanceUID): ds for ds in headers}
    ordered = [by_uid[uid] for uid in dict.fromkeys(volume.sop_instance_uids)]
    encode_results(job, prediction, volume, ordered, pool.runner(model).info, out_dir,
                   predecessor=pydicom.dcmread(predecessor) if predecessor else None,
                   voxel_counts=saved.voxels if prediction.labels is not None else None)
    seconds["encode"] = time.perf_counter() - clock
    return replace(saved, seconds=seconds)


def _classes_text(prediction: Prediction) -> str:
    if not prediction.class_probabilities:
        return ""
    return "class probabilities " + ", ".join(f"{p:.3f}"
                                              for p in prediction.class_probabilities)


def previous_sr(engine: Any, settings: Settings, job: Job) -> Path | None:
    """The SR of this route's job for an earlier generation of the same series and model."""
    with Session(engine) as session:
        rows = session.execute(
            select(JobRow.id, JobRow.payload).where(
                JobRow.route == job.route, JobRow.kind == job.kind,
                JobRow.series_instance_uid == job.series_instance_uid,
                JobRow.generation < job.generation)
            .order_by(JobRow.generation.desc())).all()
    for job_id, payload in rows:
        if json.loads(payload).get("model") != job.payload.get("model"):
            continue
        path = results_root(settings) / f"job-{job_id}" / "sr.dcm"
        if path.is_file():
            return path
    return None


def warm_results_in_background() -> threading.Thread:
    """Load what the SEG/SR writers load once (node/results/warm.py) beside the start-up,
    so that neither the worker's readiness nor its first job waits for it."""
    def run() -> None:
        try:
            warm_up()
        except Exception:  # noqa: BLE001 - optional work; the first job meets any real fault
            log.warning("warming up the result writers failed; the first job loads them",
                        exc_info=True)

    thread = threading.Thread(target=run, name="warm-results", daemon=True)
    thread.start()
    return thread


def write_status(settings: Settings, pool: ModelPool, device: str | None = None) -> None:
    write_status_file(status_file(settings, device),
                      {"pid": os.getpid(), "device": device, "loaded": pool.loaded(),
                       "seconds": pool.seconds, "runs": pool.runs})


class WorkerNode:
    def __init__(self, settings: Settings, *, sender: Sender | None = None,
                 device: str | None = None) -> None:
        """``device``: serve only the queue of the models configured with that device
        (one worker per device queue); None serves every model."""
        self.settings = settings
        self.device = device
        self.engine = open_database(settings.storage)
        self.jobs = JobStore(self.engine, settings.jobs, owner=owner_name(
            f"worker:{device or 'all'}") if is_postgresql(self.engine) else None)
        models = [m for m in settings.models if device is None or m.device == device]
        active = {m.name: m for m in active_model_settings(settings)}
        self.pool = ModelPool({m.name: active[m.name] for m in models})
        self.queues = {device} if device is not None else None
        self.audit = AuditLog(settings.storage.audit_log)
        self.runner = self._make_runner(sender)
        self._stop = threading.Event()

    def _make_runner(self, sender: Sender | None) -> JobRunner:
        return JobRunner(self.jobs, {"infer": make_infer_handler(
            self.engine, lambda: self.settings, self.pool, sender,
            lambda: write_status(self.settings, self.pool, self.device), self.audit)},
            workers=1, queues=self.queues, audit=self.audit)

    def close(self) -> None:
        """Release what the runner holds (the local pool needs nothing)."""

    def write_status(self) -> None:
        write_status(self.settings, self.pool, self.device)

    def serve_forever(self) -> None:
        def _signal(signum: int, _frame: FrameType | None) -> None:
            self._stop.set()

        signal.signal(signal.SIGTERM, _signal)
        signal.signal(signal.SIGINT, _signal)
        # the receiver's nudge when it has queued work (node/app.py wake_workers)
        signal.signal(signal.SIGUSR1, lambda _s, _f: self.runner.wake())
        self.settings.storage.spool.mkdir(parents=True, exist_ok=True)
        self.jobs.recover(kinds={"infer"}, queues=self.queues)   # only this worker's queue
        self.write_status()
        warm_results_in_background()
        self.runner.start()
        log.info("worker ready: %d model(s) configured", len(self.settings.models))
        notify("READY=1")
        parent = int(os.environ.get("PACSNODE_PARENT_PID", "0") or 0)
        try:
            while not self._stop.wait(0.5):
                if parent and os.getppid() != parent:
                    log.warning("the node that started this worker is gone; stopping")
                    break
        finally:
            self.runner.stop()
            self.close()
            status_file(self.settings, self.device).unlink(missing_ok=True)
            self.engine.dispose()
