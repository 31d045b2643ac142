"""The streamed sliding window (node/inference/sliding.py): the same labels and
probabilities as MONAI's whole-volume sliding window, and memory that stays flat as the
study grows. The reference comparison is MONAI's own ``sliding_window_inference`` over
the whole (windowed) volume, followed by argmax and softmax, as the runner did before."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.inferers.utils import sliding_window_inference

from node import synth
from node.inference.runner import TorchRunner
from node.inference.sliding import Window, stream_labels, streamable
from node.inference.volume import Volume, volume_from_datasets
from node.settings import ModelSettings

ROOT = Path(__file__).resolve().parents[2]
BUNDLE = ROOT / "models" / "lesion_ct"


def monai_whole(array: np.ndarray, network: torch.nn.Module, window: Window,
                ) -> tuple[np.ndarray, np.ndarray]:
    """MONAI's sliding window over the whole volume, then argmax and softmax."""
    image = torch.from_numpy(np.array(array, dtype=np.float32))
    if window.intensity is not None:
        lo, hi = window.intensity
        image = (image.clamp(lo, hi) - lo) / (hi - lo)
    with torch.inference_mode():
        scores = sliding_window_inference(image[None, None], window.roi_size,
                                          window.sw_batch_size, network,
                                          overlap=window.overlap, mode=window.mode)
        assert isinstance(scores, torch.Tensor)
        labels = scores.argmax(dim=1)[0].to(torch.uint8).numpy()
        probabilities = torch.softmax(scores, dim=1)[0, 1:].to(torch.float16).numpy()
    return labels, probabilities


@pytest.fixture(scope="module")
def phantom() -> Volume:
    """A CT phantom with lesions, deeper than the window along the slices (140 slices,
    3 window rows of 64 along the slice axis, 2 x 2 in plane)."""
    spec = synth.SeriesSpec(slices=140, rows=72, columns=80, pixel_spacing_mm=1.0,
                            slice_thickness_mm=1.0)
    return volume_from_datasets(synth.make_study(spec, seed=11).series[0].datasets)


def test_reference_model_streamed_equals_whole_volume(phantom: Volume) -> None:
    runner = TorchRunner(ModelSettings(name="lesion", path=BUNDLE, device="cpu",
                                       seg_type="fractional", sw_batch_size=3))
    info = runner.info
    assert streamable(phantom.array.shape, info.roi_size)
    prediction = runner.predict(phantom)                  # the streamed path
    assert runner._network is not None
    window = Window(info.roi_size, info.overlap, info.blend_mode, 3, "cpu", False,
                    info.window)
    labels, probabilities = monai_whole(phantom.array, runner._network, window)
    assert labels.any(), "the phantom's lesions should be found (else the test is weak)"
    assert prediction.labels is not None and prediction.probabilities is not None
    agreement = float((prediction.labels == labels).mean())
    assert agreement == 1.0, f"voxel agreement {agreement}"
    difference = np.abs(prediction.probabilities.astype(np.float32)
                        - probabilities.astype(np.float32)).max()
    assert difference == 0.0, f"largest probability difference {difference}"


@pytest.mark.parametrize(("batch", "mode", "overlap"), [(1, "constant", 0.5),
                                                        (4, "gaussian", 0.25),
                                                        (7, "gaussian", 0.6)])
def test_random_network_streamed_equals_whole_volume(batch: int, mode: str,
                                                     overlap: float) -> None:
    """Three classes, odd sizes, windows whose batches span several window rows."""
    torch.manual_seed(batch)
    network = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.ReLU(),
                                  torch.nn.Conv3d(4, 3, 3, padding=1)).eval()
    array = np.random.default_rng(batch).normal(0, 100, (61, 23, 19)).astype(np.float32)
    window = Window((9, 11, 8), overlap, mode, batch, "cpu", False, (-150.0, 150.0),
                    fractional=True)
    with torch.inference_mode():
        labels, probabilities = stream_labels(array, network, window)
    expected, expected_probabilities = monai_whole(array, network, window)
    assert set(np.unique(expected)) == {0, 1, 2}
    assert np.array_equal(labels, expected)
    assert probabilities is not None
    assert np.array_equal(probabilities, expected_probabilities)


def test_volume_smaller_than_the_window_takes_the_whole_volume_path(phantom: Volume) -> None:
    assert not streamable((40, 200, 200), (64, 64, 64))
    with pytest.raises(ValueError, match="smaller than the window"):
        stream_labels(np.zeros((40, 200, 200), np.float32), torch.nn.Identity(),
                      Window((64, 64, 64), 0.25, "constant", 1, "cpu", False))


CHILD = textwrap.dedent("""
    import json, os, sys
    import numpy as np, torch
    from node.inference.runner import TorchRunner
    from node.inference.volume import Volume
    from node.settings import ModelSettings
    from tests.support import proc_status_kib
    torch.set_num_threads(1)
    model, slices, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    settings = ModelSettings(name="m", path=path, format="torchscript", device="cpu",
                             window=(-200, 300), roi_size=(16, 32, 32), sw_batch_size=4,
                             target_spacing=(1.0, 0.5, 0.5) if model == "whole" else None)
    runner = TorchRunner(settings)
    runner.load()
    array = np.random.default_rng(0).standard_normal((slices, 96, 96), dtype=np.float32)
    array *= 100    # no float64 temporary: VmHWM counts from the process start
    array.flags.writeable = False
    volume = Volume(array, np.eye(4), (1.0, 0.5, 0.5), "1.2.3", ("1.2.3.4",) * slices,
                    (1,) * slices, "CT", (1.0, 0.0, 0.0, 0.0, 1.0, 0.0))
    runner.predict(Volume(array[:16], np.eye(4), (1.0, 0.5, 0.5), "1.2.3", ("1.2.3.4",) * 16,
                          (1,) * 16, "CT", (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)))   # warm up
    before = proc_status_kib(os.getpid(), "VmRSS")
    labels = runner.predict(volume).labels
    print(json.dumps({"extra_kib": proc_status_kib(os.getpid(), "VmHWM") - before,
                      "labels_kib": labels.nbytes // 1024}))
""")


def predict_extra_kib(network: Path, model: str, slices: int) -> tuple[int, int]:
    """Peak memory a predict call adds over the process before it (VmHWM - VmRSS)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", CHILD, model, str(slices), str(network)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    return int(out["extra_kib"]), int(out["labels_kib"])


def test_predict_memory_does_not_grow_with_the_slices_beyond_the_label_map(
        tmp_path: Path) -> None:
    """96 x 96 slices, 200 then 1,600 of them (a 56 MiB float32 volume): the streamed
    predict step grows by the label map (uint8) and a few MiB, far less than one float32
    volume; the whole-volume pass (a model that resamples, kept on that path) grows by
    about four float32 volumes, which shows the measurement can tell the difference."""
    torch.manual_seed(0)
    network = torch.jit.script(torch.nn.Conv3d(1, 2, 3, padding=1))
    path = tmp_path / "net.ts"
    network.save(str(path))
    small, small_labels = predict_extra_kib(path, "stream", 200)
    large, large_labels = predict_extra_kib(path, "stream", 1600)
    growth, labels_growth = large - small, large_labels - small_labels
    volume_kib = 1400 * 96 * 96 * 4 // 1024                     # the float32 volume's growth
    # measured: +18 MiB for +12.3 MiB of labels (the volume grows by 49 MiB); whole: +197 MiB
    assert growth < labels_growth + volume_kib // 4, (small, large, labels_growth)
    whole_small, _ = predict_extra_kib(path, "whole", 200)
    whole_large, _ = predict_extra_kib(path, "whole", 1600)
    assert whole_large - whole_small > 2 * volume_kib, (whole_small, whole_large)
