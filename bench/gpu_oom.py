"""A real CUDA out-of-memory, and what the node's runner does about it (GPU machines only).

The runner's answer to ``torch.cuda.OutOfMemoryError`` is: halve the sliding-window batch
and retry, and at batch 1 retry on the CPU. The unit tests can only simulate the error; here
the GPU's memory is really capped (``torch.cuda.set_per_process_memory_fraction``):

1. peak GPU memory of one prediction is measured per sliding-window batch size;
2. cap between the peaks of batch 8 and 16, ask for batch 64: the runner must finish
   on the GPU at a batch of 16 or less;
3. cap below the peak of batch 1: the runner must finish on the CPU;

and each mask must agree with the uncapped GPU mask (mixed precision on the GPU, float32 on
the CPU: a few boundary voxels may differ; the agreement is printed and must be >= 99.9 %).

    python bench/gpu_oom.py [--slices 96] [--size 256]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch

from node import synth
from node.inference.runner import Prediction, TorchRunner
from node.inference.volume import Volume, load_volume
from node.settings import ModelSettings


def run(volume: Volume, batch: int, bundle: Path) -> tuple[Prediction, int]:
    """One prediction from a fresh runner; returns it and the GPU peak bytes."""
    settings = ModelSettings(name="oom", path=bundle, device="cuda", sw_batch_size=batch)
    runner = TorchRunner(settings)
    runner.load()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    prediction = runner.predict(volume)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del runner
    torch.cuda.empty_cache()
    return prediction, peak


def agreement(a: Prediction, b: Prediction) -> float:
    assert a.labels is not None and b.labels is not None
    return float((a.labels == b.labels).mean())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=ROOT / "models" / "lesion_ct")
    parser.add_argument("--slices", type=int, default=96)
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 2
    total = torch.cuda.get_device_properties(0).total_memory
    spec = synth.SeriesSpec(slices=args.slices, rows=args.size, columns=args.size,
                            pixel_spacing_mm=350 / args.size, slice_thickness_mm=1.5, seed=9)
    with tempfile.TemporaryDirectory() as tmp:
        volume = load_volume(synth.write_study(synth.make_study(spec, seed=902), Path(tmp)))
    peaks = {}
    reference = None
    for batch in (1, 8, 16, 64):
        prediction, peaks[batch] = run(volume, batch, args.bundle)
        reference = reference or prediction
        print(f"batch {batch:>2}: peak GPU memory {peaks[batch] / 2**20:8.1f} MiB, "
              f"{prediction.seconds:.2f} s")
    assert reference is not None
    failures = 0
    cases = (("cap between batch 8 and 16", (peaks[8] + peaks[16]) / 2,
              lambda p: p.device.startswith("cuda") and p.sw_batch_size <= 16),
             ("cap below batch 1", peaks[1] * 0.5, lambda p: p.device == "cpu"))
    for name, cap, expected in cases:
        torch.cuda.set_per_process_memory_fraction(cap / total)
        try:
            prediction, _ = run(volume, 64, args.bundle)
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0)
        agree = agreement(prediction, reference)
        ok = expected(prediction) and agree >= 0.999
        failures += not ok
        print(f"{name} ({cap / 2**20:.0f} MiB), asked batch 64: ran on {prediction.device} "
              f"at batch {prediction.sw_batch_size} in {prediction.seconds:.2f} s; "
              f"mask agreement with the uncapped GPU mask {agree * 100:.4f} %: "
              f"{'as expected' if ok else 'NOT as expected'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
