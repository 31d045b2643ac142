"""Two "scanners" of synthetic CT phantoms for the fine-tuning experiment and the
regression set.

Family A is what the reference model was trained on: ``node.synth`` phantoms as they come
(12 HU noise, lesions 60-120 HU from soft tissue). Family B is another scanner and
protocol: 3 mm slices, 1.5 mm pixels, more noise, and fainter (40 % of the contrast),
textured lesions of 8-13 mm radius (``offset_hu`` can add a calibration offset too).
B is made from the same phantom geometry, so its ground truth is synth's own lesion mask.
Everything is deterministic in the seed.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset

from node.synth import Lesion, PatientInfo, SeriesSpec, make_series, make_study

_TISSUE_HU = 40.0


@dataclass(frozen=True)
class FamilyB:
    """How scanner B differs from A (the phantom geometry is shared)."""

    slice_thickness_mm: float = 3.0
    pixel_spacing_mm: float = 1.5
    offset_hu: float = 0.0           # calibration offset of the whole image
    extra_noise_hu: float = 8.0       # added to the 12 HU of node.synth
    lesion_contrast: float = 0.4     # fraction of the lesion's contrast that remains
    texture_hu: float = 5.0          # speckle inside lesions


@dataclass(frozen=True, eq=False)
class Phantom:
    """Data sets of one series (slice order = InstanceNumber) and its lesion mask."""

    datasets: tuple[Dataset, ...]
    mask: npt.NDArray[np.bool_]
    series_instance_uid: str


def family_a(seed: int, shape: tuple[int, int, int] = (48, 96, 96), *,
             patient: PatientInfo | None = None) -> Phantom:
    slices, rows, columns = shape
    spec = SeriesSpec(slices=slices, rows=rows, columns=columns, pixel_spacing_mm=1.0,
                      slice_thickness_mm=1.5, seed=seed)
    series = make_study(spec, seed=seed, patient=patient).series[0]
    return Phantom(series.datasets, series.present_mask(), series.series_instance_uid)


def family_b(seed: int, shape: tuple[int, int, int] = (48, 96, 96), *,
             patient: PatientInfo, study_instance_uid: str, study_date: str = "20260101",
             scanner: FamilyB = FamilyB()) -> Phantom:
    """A family B series of ``patient`` in study ``study_instance_uid``."""
    slices, rows, columns = shape
    rng = np.random.default_rng([seed, 7])
    fov = min(rows, columns) * scanner.pixel_spacing_mm
    half_z = (slices - 1) * scanner.slice_thickness_mm / 2
    lesions = []
    # one lesion in the liver-like organ, one in the soft tissue on the other side
    # (node.synth puts the organ at x = -0.168 fov, semi-axes 0.147 x 0.155 fov)
    for x, y, r_max in ((-0.168 * fov, -0.016 * fov, 0.09 * fov),
                        (0.17 * fov, -0.03 * fov, 0.08 * fov)):
        r = float(rng.uniform(0.6, 1.0)) * min(r_max, 0.8 * half_z)
        z = float(rng.uniform(-1, 1)) * max(half_z - r, 0.0)
        sign = 1.0 if rng.uniform() < 0.5 else -1.0
        lesions.append(Lesion((round(x, 2), round(y, 2), round(z, 2)), round(r, 2),
                              _TISSUE_HU + sign * float(rng.uniform(60, 120))))
    spec = SeriesSpec(slices=slices, rows=rows, columns=columns,
                      pixel_spacing_mm=scanner.pixel_spacing_mm,
                      slice_thickness_mm=scanner.slice_thickness_mm, seed=seed,
                      lesions=tuple(lesions), series_description="SCANNER B ABDOMEN")
    series = make_series(spec, patient=patient, study_instance_uid=study_instance_uid,
                         study_date=study_date)
    mask = series.present_mask()
    out = []
    for k, ds in enumerate(series.datasets):
        new = copy.deepcopy(ds)
        hu = ds.pixel_array.astype(np.float32) - 1024.0
        lesion = mask[k]
        hu[lesion] = _TISSUE_HU + (hu[lesion] - _TISSUE_HU) * scanner.lesion_contrast \
            + rng.standard_normal(int(lesion.sum())).astype(np.float32) * scanner.texture_hu
        hu += scanner.offset_hu
        hu += rng.standard_normal(hu.shape).astype(np.float32) * scanner.extra_noise_hu
        stored = np.clip(np.rint(hu + 1024.0), 0, 4095).astype("<u2")
        new.PixelData = stored.tobytes()
        new.Manufacturer, new.ManufacturerModelName = "pacsnode-synth", "Phantom B"
        new.ConvolutionKernel = "SHARP"
        out.append(new)
    return Phantom(tuple(out), mask, series.series_instance_uid)
