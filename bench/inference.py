"""Inference benchmark: pacsnode's inference path against bare MONAI on the same model
and volume, in the same run; and what the second job on a resident model pays.

Rows (median of --repeat runs, after one warm-up):
- bare MONAI: the volume already windowed into a tensor, then
  ``sliding_window_inference`` + argmax, with the network built once by hand;
- pacsnode predict: ``ModelPool.predict`` on the node's ``Volume`` (window, optional
  resampling, sliding window, resampling back, argmax, to uint8);
- pacsnode job path: ``load_volume`` from the DICOM files + predict + ``save_prediction``;
- first job / second job: a fresh ``ModelPool``'s first predict (includes loading the
  model) and its second.

    .venv/bin/python bench/inference.py [--bundle models/lesion_ct] [--slices 96] [--size 256]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np
import torch
from monai.inferers.utils import sliding_window_inference

from node import synth
from node.inference.runner import ModelPool, TorchRunner
from node.inference.service import save_prediction
from node.inference.volume import load_volume
from node.settings import ModelSettings


def machine(device: str) -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if device.startswith("cuda") else "no GPU used"
    return (f"nproc {os.cpu_count()}, {cpu}, kernel {platform.release()}, torch "
            f"{torch.__version__}, device {device} ({gpu})")


def timed(fn: object, repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()  # type: ignore[operator]
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        out.append(time.perf_counter() - start)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", default=str(ROOT / "models" / "lesion_ct"))
    parser.add_argument("--slices", type=int, default=96)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--sw-batch", type=int, default=4, help="sliding-window batch size")
    parser.add_argument("--results", default=str(ROOT / "bench" / "RESULTS.md"))
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args()

    settings = ModelSettings(name="bench", path=Path(args.bundle), device=args.device,
                             sw_batch_size=args.sw_batch)
    spec = synth.SeriesSpec(slices=args.slices, rows=args.size, columns=args.size,
                            pixel_spacing_mm=350 / args.size, slice_thickness_mm=1.5, seed=9)
    study = synth.make_study(spec, seed=901)
    with tempfile.TemporaryDirectory() as tmp:
        files = synth.write_study(study, Path(tmp))
        volume = load_volume(files)

        cold = ModelPool({"bench": settings})
        first = timed(lambda: cold.predict("bench", volume), 1)[0]
        second = timed(lambda: cold.predict("bench", volume), 1)[0]

        runner = TorchRunner(settings)
        runner.load()
        network, info, device = runner._network, runner.info, runner.device  # noqa: SLF001
        assert network is not None
        lo, hi = info.window or (volume.array.min(), volume.array.max())
        tensor = torch.from_numpy(np.clip((volume.array - lo) / (hi - lo), 0, 1)
                                  .astype(np.float32))[None, None].to(device)

        amp = device.startswith("cuda") and settings.mixed_precision  # as the node does

        def bare() -> np.ndarray:
            with torch.inference_mode(), torch.autocast(device_type="cuda" if amp else "cpu",
                                                        enabled=amp):
                scores = sliding_window_inference(tensor, info.roi_size,
                                                  settings.sw_batch_size, network,
                                                  overlap=info.overlap, mode=info.blend_mode)
                assert isinstance(scores, torch.Tensor)
                return np.asarray(scores.argmax(dim=1)[0].cpu().numpy())

        def node_predict() -> np.ndarray:
            labels = runner.predict(volume).labels
            assert labels is not None
            return labels

        out_dir = Path(tmp) / "out"

        def node_job() -> None:
            save_prediction(out_dir, runner.predict(load_volume(files)), volume)

        agreement = float((bare() == node_predict()).mean())  # also the warm-up
        rows = {}
        for name, fn in (("bare MONAI sliding_window_inference", bare),
                         ("pacsnode predict (ModelPool/TorchRunner)", node_predict),
                         ("pacsnode job path (read DICOM + predict + save)", node_job)):
            rows[name] = statistics.median(timed(fn, args.repeat))
    base = rows["bare MONAI sliding_window_inference"]
    resampled = "yes" if info.target_spacing else "no"
    lines = [
        f"\n## {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC: inference, "
        f"{args.slices} × {args.size}×{args.size} CT, median of {args.repeat}\n",
        f"- command: `.venv/bin/python bench/inference.py {' '.join(sys.argv[1:])}`".rstrip(),
        f"- machine: {machine(device)}",
        f"- model: {info.name} {info.version} ({args.bundle}), roi {info.roi_size}, "
        f"overlap {info.overlap}, sw batch {settings.sw_batch_size}, resampling {resampled}, "
        f"mixed precision {'on (both paths)' if amp else 'off'}",
        f"- masks: the node's and bare MONAI's agree on {agreement * 100:.4f} % of voxels",
        "",
        "| path | seconds | × bare MONAI |",
        "|---|---:|---:|",
    ]
    lines += [f"| {name} | {sec:.3f} | {sec / base:.3f} |" for name, sec in rows.items()]
    lines += [f"| first job on a fresh pool (loads the model) | {first:.3f} | "
              f"{first / base:.3f} |",
              f"| second job on the same pool | {second:.3f} | {second / base:.3f} |"]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_append:
        with open(args.results, "a") as fh:
            fh.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
