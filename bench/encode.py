"""Worker overhead benchmark: the volume and encode stages of an ``infer`` job, without
Orthanc, the receiver or (by default) the model.

The worker's own code path (``node.inference.service.infer_series``) runs on a synthetic
CT written to a temporary folder. By default the model is replaced by the series' ground
truth (its lesion mask as the label map: compact spheres), so ``predict`` costs nothing;
``--model`` encodes the reference model's prediction instead (predicted once, before the
first round's encode), which has the scattered false positives a real model gives and
which some encode steps (lesion counting) are sensitive to. Rounds run one after the other
in this process, like jobs in the resident worker: the first pays whatever is loaded once
(highdicom's tables), unless the worker warms it at start (``--cold`` skips the warm-up).

Stages, seconds, as the worker reports them to the audit log: volume = read and stack
the files; encode = save the prediction (.npz), build and write SEG and SR. With
``--profile N`` the last round runs under cProfile and the N functions with the largest
cumulative time are printed (not appended).

    .venv/bin/python bench/encode.py [--slices 300] [--size 512] [--rounds 3] [--model]"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from bench.common import append_results, command_line, machine, revision  # noqa: E402
from node import synth  # noqa: E402
from node.inference.runner import ModelInfo, ModelPool, Prediction, read_info  # noqa: E402
from node.inference.service import SavedPrediction, infer_series  # noqa: E402
from node.inference.volume import Volume  # noqa: E402
from node.jobs import Job, JobStateValues  # noqa: E402
from node.settings import ModelSettings  # noqa: E402

BUNDLE = ROOT / "models" / "lesion_ct"


@dataclass(frozen=True)
class _Runner:
    info: ModelInfo


class GroundTruthPool:
    """Stands in for the model pool: 'predicts' the synthetic series' lesion mask, or with
    ``model`` the reference model's label map, predicted once (the first round, not part
    of its volume/encode figures) and reused. Keeps the mask and the slice of each SOP
    instance only, not the synthetic data sets (a worker holds no such objects; they
    would slow Python's garbage collector)."""

    def __init__(self, info: ModelInfo, series: synth.SyntheticSeries, *,
                 model: ModelPool | None = None) -> None:
        self.info = info
        self._mask = series.lesion_mask
        self._row = {str(ds.SOPInstanceUID): int(ds.InstanceNumber) - 1
                     for ds in series.datasets}
        self._model = model
        self._predicted: Prediction | None = None

    def runner(self, _model: str) -> _Runner:
        return _Runner(self.info)

    def predict(self, model: str, volume: Volume) -> Prediction:
        if self._model is not None:
            if self._predicted is None:
                self._predicted = self._model.predict(model, volume)
            return self._predicted
        rows = [self._row[u] for u in volume.sop_instance_uids]
        labels = self._mask[rows].astype(np.uint8)
        return Prediction(labels, model, self.info.version, self.info.weights_sha256, "cpu",
                          0.0, 1)


def _job(series_uid: str, study_uid: str, n: int) -> Job:
    now = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
    return Job(n, f"bench-encode-{n}", "infer", "bench", study_uid, series_uid, 1,
               {"model": "bench"}, JobStateValues.RUNNING, None, 0, 0, None, None, now, now)


def _warm() -> float:
    """The worker's start-up warm-up, when this revision has one; seconds it took."""
    try:
        from node.results.warm import warm_up
    except ImportError:       # a revision from before the warm-up: its first job pays
        return 0.0
    return warm_up()


def run_round(pool: Any, files: Sequence[Path], series_uid: str, study_uid: str,
              out: Path, n: int) -> SavedPrediction:
    saved: SavedPrediction = infer_series(pool, _job(series_uid, study_uid, n), files,
                                          out / f"job-{n}")
    return saved


def table(rows: Sequence[tuple[str, dict[str, float], int]]) -> str:
    lines = ["| round | volume | encode | volume + encode | SEG KiB |",
             "|---|---:|---:|---:|---:|"]
    for name, sec, seg_bytes in rows:
        lines.append(f"| {name} | {sec['volume']:.2f} | {sec['encode']:.2f} | "
                     f"{sec['volume'] + sec['encode']:.2f} | {seg_bytes / 1024:.0f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=7201)
    parser.add_argument("--cold", action="store_true",
                        help="skip the worker's start-up warm-up (if this revision has one)")
    parser.add_argument("--model", action="store_true",
                        help="encode the reference model's prediction (run once, on the "
                             "CPU unless CUDA is there) instead of the ground-truth mask")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="profile the last round, print the N largest cumulative times")
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args(argv)
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    settings = ModelSettings(name="bench", path=BUNDLE)
    info = read_info(settings)
    study = synth.make_study(synth.SeriesSpec(slices=args.slices, rows=args.size,
                                              columns=args.size), seed=args.seed)
    series = study.series[0]
    pool = GroundTruthPool(info, series, model=ModelPool({"bench": settings})
                           if args.model else None)
    voxels, lesions = int(np.count_nonzero(series.lesion_mask)), len(series.lesions)
    series_uid, study_uid = series.series_instance_uid, study.study_instance_uid
    warm = 0.0 if args.cold else _warm()
    rows = []
    predicted = 0
    with tempfile.TemporaryDirectory(prefix="pacsnode-encode-") as tmp:
        files = synth.write_study(study, Path(tmp) / "in")
        del study, series          # the worker holds no synthetic data sets either
        for n in range(1, args.rounds + 1):
            profiler = cProfile.Profile() if args.profile and n == args.rounds else None
            if profiler:
                profiler.enable()
            saved = run_round(pool, files, series_uid, study_uid, Path(tmp), n)
            if profiler:
                profiler.disable()
            seg = saved.path.parent / "seg.dcm"
            name = ("first" if n == 1 else f"{n}") + (" (profiled)" if profiler else "")
            if args.model and n == 1:
                predicted = saved.voxels.get(1, 0)
            rows.append((name, saved.seconds, seg.stat().st_size if seg.exists() else 0))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
            if profiler:
                text = io.StringIO()
                pstats.Stats(profiler, stream=text).sort_stats("cumulative") \
                    .print_stats(args.profile)
                print(text.getvalue())
    result = table(rows)
    print(result)
    section = (
        f"## {now}: worker volume + encode, {args.slices} × {args.size}² CT\n\n"
        f"- command: `{command_line(__file__)}`\n- machine: {machine()}\n"
        f"- revision: {revision()}\n"
        f"- data: synthetic CT (seed {args.seed}, {lesions} lesion(s), {voxels} lesion "
        f"voxels); label map = " + (f"the reference model's prediction ({predicted} "
                                    f"voxels), predicted once before round 1's encode"
                                    if args.model else "the lesion mask (no model)") + "\n"
        f"- start-up warm-up: {'skipped (--cold)' if args.cold else f'{warm:.2f} s'}\n\n"
        f"{result}\n")
    if not args.no_append:
        append_results(section, ROOT / "bench" / "RESULTS.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
