"""Sliding-window segmentation whose memory does not grow with the number of slices.

``stream_labels`` visits the same windows, in the same order and the same batches, as
MONAI's ``sliding_window_inference`` over the whole volume, and blends them with the same
importance map. Windows are enumerated slice-axis first, so once a batch is done every
slice above the next window's first slice has received all its contributions: those
slices are divided by their weight sum, reduced to labels (argmax, uint8) and, for
fractional SEG, float16 probabilities, and written into arrays allocated once. Only a
rolling buffer of about one window depth plus one step stays in float32, and the input
is windowed (intensity clamp) per batch, never as a whole-volume copy.

``whole_labels`` is the plain whole-volume call, kept for models that resample to their
own spacing and for volumes smaller than the window; it reduces to labels in chunks too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F  # noqa: N812  (the usual name)
from monai.data.utils import compute_importance_map, dense_patch_slices
from monai.inferers.utils import sliding_window_inference

from node.errors import ModelError

FLUSH_SLICES = 8     # slices reduced to labels at a time (bounds the argmax/softmax temporaries)


@dataclass(frozen=True)
class Window:
    """How to slide: window size, overlap, blending, batch, device and precision."""

    roi_size: tuple[int, int, int]
    overlap: float
    mode: str
    sw_batch_size: int
    device: str
    amp: bool
    intensity: tuple[float, float] | None = None    # clamp to [lo, hi], then scale to [0, 1]
    fractional: bool = False                        # also return float16 class probabilities


def streamable(shape: Sequence[int], roi_size: Sequence[int]) -> bool:
    """True where the streamed pass applies: no padding (every side at least the window)."""
    return all(n >= r for n, r in zip(shape, roi_size, strict=True))


def _intensity(batch: torch.Tensor, window: tuple[float, float] | None) -> torch.Tensor:
    if window is not None:
        lo, hi = window
        batch.clamp_(lo, hi).sub_(lo).div_(hi - lo)
    return batch


def _outputs(shape: Sequence[int], classes: int, fractional: bool,
             ) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.float16] | None]:
    labels = np.empty(tuple(shape), dtype=np.uint8)
    probabilities = np.empty((classes - 1, *shape), dtype=np.float16) if fractional else None
    return labels, probabilities


def _argmax(scores: torch.Tensor) -> torch.Tensor:
    """``scores.argmax(dim=0)`` as uint8 (the first class wins a tie, as argmax does), by
    elementwise comparisons: torch's argmax across the leading axis is several times slower."""
    best = scores[0]
    index = torch.zeros(best.shape, dtype=torch.uint8, device=scores.device)
    for c in range(1, scores.shape[0]):
        higher = scores[c] > best
        index.masked_fill_(higher, c)
        best = torch.where(higher, scores[c], best)
    return index


def _reduce(scores: torch.Tensor, labels: npt.NDArray[np.uint8],
            probabilities: npt.NDArray[np.float16] | None) -> None:
    """Blended class scores (classes, n, rows, cols) → labels[:n] and probabilities[:, :n]."""
    labels[...] = _argmax(scores).to("cpu").numpy()
    if probabilities is not None:
        probabilities[...] = torch.softmax(scores, dim=0)[1:].to("cpu", torch.float16).numpy()


def _scan_interval(roi_size: Sequence[int], shape: Sequence[int], overlap: float) -> list[int]:
    """As MONAI's sliding window computes it (monai.inferers.utils._get_scan_interval)."""
    return [r if r == n else max(1, int(r * (1 - overlap)))
            for r, n in zip(roi_size, shape, strict=True)]


def stream_labels(array: npt.NDArray[np.float32], network: torch.nn.Module, window: Window,
                  ) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.float16] | None]:
    """Labels (and probabilities) for ``array`` (slices, rows, cols), equal to the argmax of
    MONAI's whole-volume sliding window; needs ``streamable(array.shape, roi_size)``."""
    shape, roi = tuple(array.shape), window.roi_size
    if not streamable(shape, roi):
        raise ValueError(f"volume {shape} is smaller than the window {roi}")
    patches = dense_patch_slices(shape, roi, _scan_interval(roi, shape, window.overlap))
    device = torch.device(window.device)
    weight = compute_importance_map(roi, mode=window.mode, sigma_scale=0.125, device=device,
                                    dtype=torch.float32)
    step = window.sw_batch_size
    batches = [patches[i:i + step] for i in range(0, len(patches), step)]
    # the buffer spans from a batch's first window to the deepest window of that batch
    depth = max(max(p[0].stop for p in b) - b[0][0].start for b in batches)
    rows, cols = shape[1:]
    out: torch.Tensor | None = None
    count = torch.zeros((depth, rows, cols), dtype=torch.float32, device=device)
    labels: npt.NDArray[np.uint8] = np.empty(0, np.uint8)
    probabilities: npt.NDArray[np.float16] | None = None
    base = 0                                       # slice index of the buffer's first plane
    # On a GPU the whole volume goes over once and is windowed there, and the windows are
    # cut on the device (a copy and a CPU windowing pass per batch would hold up the GPU);
    # on the CPU each batch of windows is cut into one reused buffer and windowed there.
    source = _on_device(array, device, window.intensity) if device.type == "cuda" else None
    staging = torch.empty((step, 1, *roi), dtype=torch.float32, device=device)
    for n, batch in enumerate(batches):
        inputs = staging[:len(batch)]
        for i, p in enumerate(batch):
            if source is not None:
                inputs[i, 0] = source[p]
            else:
                inputs.numpy()[i, 0] = array[p]
        if source is None:
            _intensity(inputs, window.intensity)
        with torch.autocast(device_type="cuda" if window.amp else "cpu", enabled=window.amp):
            scores = network(inputs)
        if not isinstance(scores, torch.Tensor) or tuple(scores.shape[2:]) != roi:
            got = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores)
            raise ModelError(f"the network must return one tensor of class scores per window "
                             f"(batch, classes, {', '.join(map(str, roi))}); got {got}")
        if out is None:
            classes = scores.shape[1]
            out = torch.zeros((classes, depth, rows, cols), dtype=torch.float32,
                              device=device)
            labels, probabilities = _outputs(shape, classes, window.fractional)
        scores *= weight
        for p, s in zip(batch, scores, strict=True):
            z = slice(p[0].start - base, p[0].stop - base)
            out[(slice(None), z, p[1], p[2])] += s
            count[(z, p[1], p[2])] += weight
        final = batches[n + 1][0][0].start if n + 1 < len(batches) else shape[0]
        if final > base:
            _flush(out, count, final - base, labels[base:final],
                   None if probabilities is None else probabilities[:, base:final])
            base = final
    return labels, probabilities


def _on_device(array: npt.NDArray[np.float32], device: torch.device,
               intensity: tuple[float, float] | None) -> torch.Tensor:
    """The volume on ``device``, windowed there; copied a slab at a time so that host
    memory never holds a second copy of it."""
    source = torch.empty(array.shape, dtype=torch.float32, device=device)
    for a in range(0, array.shape[0], FLUSH_SLICES):
        slab = torch.from_numpy(np.array(array[a:a + FLUSH_SLICES], dtype=np.float32))
        source[a:a + FLUSH_SLICES].copy_(slab)
    return _intensity(source, intensity)


def _flush(out: torch.Tensor, count: torch.Tensor, done: int, labels: npt.NDArray[np.uint8],
           probabilities: npt.NDArray[np.float16] | None) -> None:
    """Reduce the buffer's first ``done`` planes, then move the rest to the front."""
    for a in range(0, done, FLUSH_SLICES):
        b = min(done, a + FLUSH_SLICES)
        _reduce(out[:, a:b] / count[a:b], labels[a:b],
                None if probabilities is None else probabilities[:, a:b])
    rest = out.shape[1] - done
    step = min(done, FLUSH_SLICES)         # chunks that never overlap their source
    for a in range(0, rest, step):
        b = min(rest, a + step)
        out[:, a:b] = out[:, done + a:done + b]
        count[a:b] = count[done + a:done + b]
    out[:, rest:] = 0
    count[rest:] = 0


def whole_labels(array: npt.NDArray[np.float32], network: torch.nn.Module, window: Window, *,
                 size: Sequence[int] | None = None,
                 ) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.float16] | None]:
    """MONAI's sliding window over the whole volume, resampled (trilinear) to ``size``
    first and the class scores back to the source grid after, when ``size`` is given."""
    device = torch.device(window.device)
    image = _intensity(torch.from_numpy(np.array(array, dtype=np.float32)),
                       window.intensity)[None, None]
    source_shape = tuple(image.shape[2:])
    if size is not None and tuple(size) != source_shape:
        image = F.interpolate(image, size=list(size), mode="trilinear", align_corners=False)
    with torch.autocast(device_type="cuda" if window.amp else "cpu", enabled=window.amp):
        scores = sliding_window_inference(image.to(device), window.roi_size,
                                          window.sw_batch_size, network,
                                          overlap=window.overlap, mode=window.mode)
    del image
    assert isinstance(scores, torch.Tensor)
    scores = scores.float()
    if tuple(scores.shape[2:]) != source_shape:
        scores = F.interpolate(scores, size=source_shape, mode="trilinear",
                               align_corners=False)
    labels, probabilities = _outputs(source_shape, scores.shape[1], window.fractional)
    for a in range(0, source_shape[0], FLUSH_SLICES):
        b = min(source_shape[0], a + FLUSH_SLICES)
        _reduce(scores[0, :, a:b], labels[a:b],
                None if probabilities is None else probabilities[:, a:b])
    return labels, probabilities
