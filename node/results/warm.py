"""Warm the result writers once, when a worker starts, instead of in its first job.

highdicom reads its tables of the standard (IOD modules, module attributes: JSON files of
several MB) the first time a SEG or SR is built, and pydicom builds its code dictionaries
on first use; together 0.5-2 s that the first job of a resident worker would otherwise
pay. ``warm_up`` builds a two-slice SEG and SR in memory and throws them away.
"""

from __future__ import annotations

import io
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from node.results.seg import build_seg
from node.results.sr import build_sr
from node.synth import SeriesSpec, make_patient, make_series

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Label:
    value: int = 1
    name: str = "warm-up"
    category: tuple[str, str, str] = ("49755003", "SCT", "Morphologically abnormal structure")
    type: tuple[str, str, str] = ("52988006", "SCT", "Lesion")


def warm_up() -> float:
    """Build and encode a tiny SEG + SR through the same code as a job; seconds taken."""
    start = time.perf_counter()
    series = make_series(SeriesSpec(slices=2, rows=8, columns=8, lesions=()),
                         patient=make_patient(0), study_instance_uid="2.25.1")
    labels = np.zeros((2, 8, 8), dtype=np.uint8)
    labels[1, 3:5, 3:5] = 1
    common: dict[str, Any] = dict(model="warm-up", version="0", weights_sha256="0" * 64,
                                  job_key="warm-up")
    seg = build_seg(series.datasets, labels, [_Label()], **common)
    sr = build_sr(seg, series.datasets, labels, labels.astype(np.float32), (1.0, 1.0, 1.0),
                  [_Label()], **common)
    for ds in (seg, sr):
        if ds is not None:
            ds.save_as(io.BytesIO(), enforce_file_format=True)
    seconds = time.perf_counter() - start
    log.debug("result writers warmed up in %.2f s", seconds)
    return seconds
