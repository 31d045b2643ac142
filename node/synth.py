"""Synthetic CT and MR studies with real geometry and known lesion ground truth.

Test and demo data for the whole project; nothing is downloaded. A phantom (air, a body
of fat and soft tissue, a liver-like organ, a spine) is defined in patient coordinates
(LPS, mm) and sampled at the voxel centres of each series' grid, which is computed from
the very ImagePositionPatient / ImageOrientationPatient / PixelSpacing values written to
the files (PS3.3 C.7.6.2.1.1). Spherical lesions are painted into the pixels and into
``lesion_mask`` from the same voxel centres, so the two agree voxel for voxel. The body
scales with the in-plane field of view, so series of one study with the same matrix and
pixel spacing show the same anatomy. Same spec and seed give the same bytes, UIDs too.
"""

from __future__ import annotations

import copy
import logging
import math
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels.encoders.base import get_encoder
from pydicom.uid import (
    UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    MRImageStorage,
    RLELossless,
)
from pydicom.valuerep import format_number_as_ds

log = logging.getLogger(__name__)

Vec = tuple[float, float, float]
FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]

_MODALITIES = ("CT", "MR")
_ORIENTATIONS = ("axial", "sagittal", "coronal")
_MAX_STORED = 4095  # BitsStored 12, unsigned
_UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian)
_LOSSLESS = (RLELossless, JPEG2000Lossless, JPEGLSLossless)
_EQUIPMENT: tuple[tuple[str, object], ...] = (
    ("Manufacturer", "pacsnode-synth"), ("ManufacturerModelName", "Phantom"),
    ("DeviceSerialNumber", "SYN0001"), ("SoftwareVersions", "pacsnode-synth 1"),
    ("InstitutionName", "pacsnode synthetic data"), ("StationName", "SYNTH01"),
    ("ReferringPhysicianName", "SYNTH^REFERRER"), ("StudyID", "1"),
    ("StudyDescription", "SYNTHETIC PHANTOM"), ("BodyPartExamined", "ABDOMEN"),
    ("PatientPosition", "HFS"), ("PositionReferenceIndicator", ""), ("AcquisitionNumber", 1),
    ("BurnedInAnnotation", "NO"), ("LossyImageCompression", "00"),
    ("ImageComments", "synthetic phantom, not a patient"), ("SamplesPerPixel", 1),
    ("PhotometricInterpretation", "MONOCHROME2"), ("BitsAllocated", 16), ("BitsStored", 12),
    ("HighBit", 11), ("PixelRepresentation", 0),
)
_CT_ATTRS: tuple[tuple[str, object], ...] = (
    ("KVP", "120"), ("ScanOptions", "HELICAL MODE"), ("DataCollectionDiameter", "500"),
    ("DistanceSourceToDetector", "1085.6"), ("DistanceSourceToPatient", "595"),
    ("GantryDetectorTilt", "0"), ("TableHeight", "150"), ("RotationDirection", "CW"),
    ("ExposureTime", 500), ("XRayTubeCurrent", 200), ("Exposure", 100),
    ("FilterType", "BODY"), ("GeneratorPower", 24), ("FocalSpots", "1.2"),
    ("ConvolutionKernel", "STANDARD"), ("CTDIvol", 8.5), ("RescaleIntercept", "-1024"),
    ("RescaleSlope", "1"), ("RescaleType", "HU"), ("WindowCenter", "40"),
    ("WindowWidth", "400"), ("WindowCenterWidthExplanation", "ABDOMEN"),
)
_MR_ATTRS: tuple[tuple[str, object], ...] = (
    ("ScanningSequence", "SE"), ("SequenceVariant", "NONE"), ("ScanOptions", ""),
    ("MRAcquisitionType", "2D"), ("SequenceName", "se2d1"), ("AngioFlag", "N"),
    ("RepetitionTime", "500"), ("EchoTime", "15"), ("EchoTrainLength", 1),
    ("NumberOfAverages", "1"), ("ImagingFrequency", "63.87"), ("ImagedNucleus", "1H"),
    ("EchoNumbers", "1"), ("MagneticFieldStrength", "1.5"), ("PercentSampling", "100"),
    ("PercentPhaseFieldOfView", "100"), ("PixelBandwidth", "130"), ("FlipAngle", "90"),
    ("ReceiveCoilName", "Body"), ("TransmitCoilName", "Body"),
    ("InPlanePhaseEncodingDirection", "ROW"), ("WindowCenter", "600"), ("WindowWidth", "1200"),
)


@dataclass(frozen=True)
class Lesion:
    """A spherical lesion: centre in patient coordinates (LPS, mm), HU (CT) or signal (MR)."""

    center_mm: tuple[float, float, float]
    radius_mm: float
    intensity: float

    def __post_init__(self) -> None:
        values = (*self.center_mm, self.radius_mm, self.intensity)
        if len(self.center_mm) != 3 or not all(math.isfinite(v) for v in values):
            raise ValueError(f"Lesion: expected 3 finite centre coordinates, a finite radius "
                             f"and intensity, got {self!r}")
        if self.radius_mm <= 0:
            raise ValueError(f"Lesion.radius_mm: expected > 0 mm, got {self.radius_mm}")


@dataclass(frozen=True)
class PatientInfo:
    """Clearly synthetic patient identity (defaults equal ``make_patient(0)``)."""

    patient_id: str = "SYN000000"
    patient_name: str = "SYNTH^PATIENT0000"
    birth_date: str = "19400101"
    sex: str = "M"

    def __post_init__(self) -> None:
        if self.birth_date and not _is_date(self.birth_date):
            raise ValueError(f"PatientInfo.birth_date: expected YYYYMMDD, got {self.birth_date!r}")
        if self.sex not in ("M", "F", "O", ""):
            raise ValueError(f"PatientInfo.sex: expected 'M', 'F', 'O' or '', got {self.sex!r}")
        if not self.patient_id or len(self.patient_id) > 64:
            raise ValueError(f"PatientInfo.patient_id: expected 1-64 characters, got "
                             f"{self.patient_id!r}")


@dataclass(frozen=True)
class SeriesSpec:
    """What one synthetic series looks like; ``lesions=None`` lets the seed pick 1-3."""

    modality: str = "CT"
    slices: int = 64
    rows: int = 256
    columns: int = 256
    pixel_spacing_mm: float = 0.8
    slice_thickness_mm: float = 1.5
    lesions: tuple[Lesion, ...] | None = None
    seed: int = 0
    series_description: str | None = None
    series_number: int = 1
    orientation: str = "axial"
    omit_instance_numbers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        problems = []
        if self.modality not in _MODALITIES:
            problems.append(f"modality: expected one of {_MODALITIES}, got {self.modality!r}")
        if self.orientation not in _ORIENTATIONS:
            problems.append(f"orientation: expected one of {_ORIENTATIONS}, "
                            f"got {self.orientation!r}")
        for name in ("slices", "rows", "columns", "series_number"):
            value = getattr(self, name)
            if not 1 <= value <= 65535:
                problems.append(f"{name}: expected 1..65535, got {value}")
        for name in ("pixel_spacing_mm", "slice_thickness_mm"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                problems.append(f"{name}: expected a finite number > 0, got {value}")
        if self.seed < 0:
            problems.append(f"seed: expected >= 0, got {self.seed}")
        bad = [n for n in self.omit_instance_numbers if not 1 <= n <= self.slices]
        if bad:
            problems.append(f"omit_instance_numbers: expected values in 1..{self.slices}, "
                            f"got {bad}")
        elif len(set(self.omit_instance_numbers)) >= self.slices:
            problems.append("omit_instance_numbers: would omit every slice")
        if problems:
            raise ValueError("SeriesSpec." + "; SeriesSpec.".join(problems))


@dataclass(frozen=True, eq=False)
class SyntheticSeries:
    """A generated series and its ground truth.

    ``lesion_mask`` always covers the full grid, ``spec.slices`` deep: ``lesion_mask[k]``
    belongs to InstanceNumber ``k + 1`` whether or not that slice was omitted, and
    ``lesion_volume_mm3`` counts the whole mask. Use :meth:`present_mask` for the rows
    matching ``datasets``. ``lesions`` holds the lesions actually painted (the seeded
    picks where ``spec.lesions`` is None). The mask is read-only; treat the datasets as
    read-only too (copy before changing them).
    """

    spec: SeriesSpec
    datasets: tuple[Dataset, ...]
    series_instance_uid: str
    lesion_mask: BoolArray
    lesion_volume_mm3: float
    lesions: tuple[Lesion, ...] = ()

    def present_mask(self) -> BoolArray:
        """The mask rows of the slices present in ``datasets``, in the same order."""
        return self.lesion_mask[[int(ds.InstanceNumber) - 1 for ds in self.datasets]]


@dataclass(frozen=True)
class SyntheticStudy:
    """One synthetic patient's study."""

    patient: PatientInfo
    study_instance_uid: str
    series: tuple[SyntheticSeries, ...]


@dataclass(frozen=True)
class _Levels:
    """Phantom intensities per label (air, fat, tissue, organ, cortex, marrow)."""

    lut: tuple[float, float, float, float, float, float]
    noise: float
    offset: float  # stored value = intensity + offset
    contrast: tuple[float, float]  # random lesions: |intensity - tissue| range

    @property
    def tissue(self) -> float:
        return self.lut[2]


_CT = _Levels((-1000.0, -100.0, 40.0, 60.0, 700.0, 250.0), 12.0, 1024.0, (60.0, 120.0))
_MR = _Levels((0.0, 1100.0, 450.0, 550.0, 80.0, 700.0), 18.0, 0.0, (200.0, 400.0))


@dataclass(frozen=True, eq=False)
class _Grid:
    """Voxel grid geometry as written to the files (floats parsed back from the DS text)."""

    row_dir: FloatArray  # direction of increasing column index
    col_dir: FloatArray  # direction of increasing row index
    normal: FloatArray
    spacing: float
    thickness: float
    positions: tuple[tuple[str, ...], ...]  # ImagePositionPatient text per slice
    origins: FloatArray  # (slices, 3)
    fov: float
    half: FloatArray  # half extents of the voxel centres along row_dir, col_dir, normal

    def plane(self, k: int, rows: int, columns: int) -> tuple[FloatArray, ...]:
        """Patient x, y, z of the voxel centres of slice ``k``, broadcastable to (rows, cols).

        A component is only as wide as the axes it varies along, which keeps the
        per-slice arithmetic cheap for the axis-aligned orientations.
        """
        c = np.arange(columns, dtype=np.float64)[None, :] * self.spacing
        r = np.arange(rows, dtype=np.float64)[:, None] * self.spacing
        out = []
        for i in range(3):
            v = np.full((1, 1), self.origins[k, i])
            if self.row_dir[i]:
                v = v + c * self.row_dir[i]
            if self.col_dir[i]:
                v = v + r * self.col_dir[i]
            out.append(v)
        return tuple(out)


def _ds(value: float) -> str:
    return format_number_as_ds(round(float(value), 6) + 0.0)


def _vec(values: FloatArray) -> Vec:
    return float(values[0]), float(values[1]), float(values[2])


def _is_date(text: str) -> bool:
    if len(text) != 8 or not text.isdigit():
        return False
    y, m, d = int(text[:4]), int(text[4:6]), int(text[6:])
    return 1 <= m <= 12 and 1 <= d <= 31 and y >= 1800


def _tm(seconds: float) -> str:
    whole = int(seconds)
    frac = round((seconds - whole) * 1e6)
    text = f"{whole // 3600 % 24:02d}{whole // 60 % 60:02d}{whole % 60:02d}"
    return f"{text}.{frac:06d}" if frac else text


def _uid(*parts: str) -> UID:
    """A deterministic 2.25 UID from a name-based (SHA-1) UUID of ``parts`` (PS3.5 B.2).

    Not ``generate_uid(prefix=None, entropy_srcs=...)``: pydicom ignores the entropy
    sources when there is no prefix and returns a random UUID.
    """
    namespace = uuid.uuid5(uuid.NAMESPACE_URL, "urn:pacsnode:synth")
    return UID(f"2.25.{uuid.uuid5(namespace, chr(31).join(parts)).int}")


def _cosines(orientation: str) -> tuple[FloatArray, FloatArray]:
    """Row and column direction cosines (ImageOrientationPatient) per orientation."""
    row, col = {"axial": ((1, 0, 0), (0, 1, 0)), "sagittal": ((0, 1, 0), (0, 0, -1)),
                "coronal": ((1, 0, 0), (0, 0, -1))}[orientation]
    return np.array(row, dtype=np.float64), np.array(col, dtype=np.float64)


def _make_grid(spec: SeriesSpec) -> _Grid:
    row, col = _cosines(spec.orientation)
    normal = np.cross(row, col)
    ps, t = float(_ds(spec.pixel_spacing_mm)), float(_ds(spec.slice_thickness_mm))
    half = np.array([(spec.columns - 1) * ps, (spec.rows - 1) * ps, (spec.slices - 1) * t]) / 2
    start = -half[0] * row - half[1] * col - half[2] * normal
    positions = tuple(tuple(_ds(v) for v in start + k * t * normal) for k in range(spec.slices))
    origins = np.array([[float(v) for v in p] for p in positions], dtype=np.float64)
    return _Grid(row, col, normal, ps, t, positions, origins, min(spec.rows, spec.columns) * ps,
                 half)


def _labels(x: FloatArray, y: FloatArray, z: FloatArray, fov: float) -> npt.NDArray[np.uint8]:
    """Phantom label per point: 0 air, 1 fat, 2 tissue, 3 organ, 4 cortex, 5 marrow."""
    mod = 1.0 + 0.04 * np.sin(z * (2 * np.pi / 180.0))
    ax, ay, fat = 0.42 * fov * mod, 0.31 * fov * mod, 0.035 * fov
    spine_r, d2 = 0.11 * 0.31 * fov, x**2 + (y - 0.55 * 0.31 * fov) ** 2
    inner = (x / (ax - fat)) ** 2 + (y / (ay - fat)) ** 2 <= 1.0
    organ = ((x + 0.4 * ax) / (0.35 * ax)) ** 2 + ((y + 0.05 * ay) / (0.5 * ay)) ** 2 <= 1.0
    cortex = d2 <= spine_r**2  # the spine lies inside ``inner`` and apart from the organ
    labels = np.zeros(np.broadcast_shapes(x.shape, y.shape, z.shape), dtype=np.uint8)
    for region in ((x / ax) ** 2 + (y / ay) ** 2 <= 1.0, inner, organ & inner, cortex, cortex,
                   d2 <= (0.65 * spine_r) ** 2):
        labels += region  # nested regions: each one inside the previous adds one label step
    return labels


def _random_lesions(spec: SeriesSpec, grid: _Grid, levels: _Levels) -> tuple[Lesion, ...]:
    """1-3 seeded spheres fully inside the grid and inside soft tissue or the organ."""
    rng = np.random.default_rng([spec.seed, 0])
    r_hi = max(min(12.0, 0.08 * grid.fov, 0.9 * float(grid.half.min())), 2.0 * grid.spacing)
    n = 96  # directions on a Fibonacci sphere to test the lesion surface against the phantom
    i = np.arange(n) + 0.5
    polar, azimuth = np.arccos(1 - 2 * i / n), np.pi * (1 + 5**0.5) * i
    dirs = np.stack([np.cos(azimuth) * np.sin(polar), np.sin(azimuth) * np.sin(polar),
                     np.cos(polar)], axis=1)
    axes = np.stack([grid.row_dir, grid.col_dir, grid.normal])
    centre = grid.origins[0] + grid.half @ axes
    chosen: list[Lesion] = []
    for _ in range(int(rng.integers(1, 4))):
        for _try in range(200):
            r = float(rng.uniform(r_hi / 3, r_hi))
            c = centre + (rng.uniform(-1, 1, 3) * np.maximum(grid.half - r, 0.0)) @ axes
            pts = np.vstack([c, c + (r + 2.0) * dirs])
            ok = np.isin(_labels(pts[:, 0], pts[:, 1], pts[:, 2], grid.fov), (2, 3)).all()
            apart = all(np.linalg.norm(c - np.array(o.center_mm)) > r + o.radius_mm + 2.0
                        for o in chosen)
            if ok and apart:
                sign = 1.0 if rng.uniform() < 0.5 else -1.0
                value = levels.tissue + sign * float(rng.uniform(*levels.contrast))
                chosen.append(Lesion(_vec(np.round(c, 3)), round(r, 3), round(value, 1)))
                break
    if not chosen:  # grid too small or odd: the grid centre is soft tissue by construction
        value = levels.tissue + levels.contrast[1]
        chosen.append(Lesion(_vec(centre), r_hi / 3, value))
    return tuple(chosen)


def _check_lesions(lesions: tuple[Lesion, ...], spec: SeriesSpec, levels: _Levels) -> None:
    lo, hi = -levels.offset, _MAX_STORED - levels.offset
    for i, lesion in enumerate(lesions):
        if not lo <= lesion.intensity <= hi:
            raise ValueError(f"SeriesSpec.lesions[{i}].intensity: expected {lo:g}..{hi:g} for "
                             f"{spec.modality}, got {lesion.intensity:g}")


def _render_slice(k: int, spec: SeriesSpec, grid: _Grid, levels: _Levels,
                  lesions: tuple[Lesion, ...], mask: BoolArray,
                  rng: np.random.Generator) -> bytes:
    """Pixel bytes of slice ``k``; fills ``mask[k]`` from the same voxel centres."""
    x, y, z = grid.plane(k, spec.rows, spec.columns)
    img = np.asarray(levels.lut, dtype=np.float32)[_labels(x, y, z, grid.fov)]
    for lesion in lesions:
        c = np.asarray(lesion.center_mm, dtype=np.float64)
        if abs(float((c - grid.origins[k]) @ grid.normal)) > lesion.radius_mm:
            continue
        d2 = (x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2
        inside = np.broadcast_to(d2 <= lesion.radius_mm**2, img.shape)
        img[inside] = lesion.intensity
        mask[k] |= inside
    img += rng.standard_normal(img.shape, dtype=np.float32) * np.float32(levels.noise)
    if levels.offset == 0.0:  # magnitude image: Rician-like floor instead of negative values
        np.abs(img, out=img)
    img += np.float32(levels.offset + 0.5)  # + 0.5: the cast below truncates, so this rounds
    return np.clip(img, 0, _MAX_STORED, out=img).astype("<u2").tobytes()


@dataclass(frozen=True)
class _SeriesContext:
    spec: SeriesSpec
    patient: PatientInfo
    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str
    study_date: str
    grid: _Grid


def _patient_age(birth_date: str, study_date: str) -> str:
    if not birth_date:
        return ""
    years = int(study_date[:4]) - int(birth_date[:4])
    years -= int(study_date[4:] < birth_date[4:])
    return f"{max(years, 0):03d}Y"


def _slice_dataset(ctx: _SeriesContext, k: int, pixels: bytes) -> Dataset:
    """One complete CT or MR Image instance (PS3.3 A.3 / A.4)."""
    spec, grid, ct = ctx.spec, ctx.grid, ctx.spec.modality == "CT"
    sop_class = CTImageStorage if ct else MRImageStorage
    sop_uid = _uid("instance", ctx.series_instance_uid, str(k + 1))
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = _uid("implementation")
    meta.ImplementationVersionName = "PACSNODE_SYNTH1"
    ds = Dataset()
    ds.file_meta = meta
    for keyword, value in _EQUIPMENT + (_CT_ATTRS if ct else _MR_ATTRS):
        setattr(ds, keyword, value)
    ds.SpecificCharacterSet = "ISO_IR 192"
    if ct:
        axial = spec.orientation == "axial"
        # PS3.3 C.8.2.1.1.1: value 3 AXIAL is any tomographic CT image, reformats included
        ds.ImageType = ["ORIGINAL" if axial else "DERIVED",
                        "PRIMARY" if axial else "SECONDARY", "AXIAL"]
        if not axial:
            ds.DerivationDescription = f"synthetic {spec.orientation} reformat"
        ds.ReconstructionDiameter = _ds(grid.fov)
        phantom = Dataset()
        phantom.CodeValue, phantom.CodingSchemeDesignator = "113691", "DCM"
        phantom.CodeMeaning = "IEC Body Dosimetry Phantom"
        ds.CTDIPhantomTypeCodeSequence = [phantom]
    else:
        ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]  # PS3.3 C.8.3.1.1.1
        ds.AcquisitionMatrix = [0, min(spec.columns, 65535), min(spec.rows, 65535), 0]
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_uid
    series_start = 9 * 3600 + 300 * ((spec.series_number - 1) % 96)
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = ctx.study_date
    ds.InstanceCreationDate = ctx.study_date
    ds.StudyTime = "090000"
    ds.SeriesTime = ds.ContentTime = ds.InstanceCreationTime = _tm(series_start)
    ds.AcquisitionTime = _tm(series_start + 30 + 0.5 * k)
    ds.AccessionNumber = "SA" + ctx.study_instance_uid[-12:]
    ds.PatientName, ds.PatientID = ctx.patient.patient_name, ctx.patient.patient_id
    ds.PatientBirthDate, ds.PatientSex = ctx.patient.birth_date, ctx.patient.sex
    ds.PatientAge = _patient_age(ctx.patient.birth_date, ctx.study_date)
    ds.Modality = spec.modality
    ds.SeriesDescription = spec.series_description or f"SYNTH {spec.modality} {spec.orientation}"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = ctx.study_instance_uid, ctx.series_instance_uid
    ds.FrameOfReferenceUID = ctx.frame_of_reference_uid
    ds.SeriesNumber, ds.InstanceNumber = spec.series_number, k + 1
    ds.ImagesInAcquisition = spec.slices
    ds.ImagePositionPatient = list(grid.positions[k])
    ds.ImageOrientationPatient = [_ds(v) for v in (*grid.row_dir, *grid.col_dir)]
    ds.PixelSpacing = [_ds(grid.spacing)] * 2
    ds.SliceThickness = ds.SpacingBetweenSlices = _ds(grid.thickness)
    ds.SliceLocation = _ds(float(grid.origins[k] @ grid.normal))
    ds.Rows, ds.Columns = spec.rows, spec.columns
    ds.PixelData = pixels
    return ds


def make_patient(seed: int = 0) -> PatientInfo:
    """A deterministic, clearly synthetic patient ("SYNTH^PATIENT0042", "SYN000042")."""
    if seed < 0:
        raise ValueError(f"make_patient seed: expected >= 0, got {seed}")
    birth = f"{1940 + seed * 37 % 60:04d}{1 + seed * 7 % 12:02d}{1 + seed * 13 % 28:02d}"
    return PatientInfo(patient_id=f"SYN{seed:06d}", patient_name=f"SYNTH^PATIENT{seed:04d}",
                       birth_date=birth, sex="MF"[seed % 2])


def make_series(spec: SeriesSpec, *, patient: PatientInfo, study_instance_uid: str,
                frame_of_reference_uid: str | None = None,
                study_date: str = "20260101") -> SyntheticSeries:
    """Render one series; the frame of reference defaults to one per study and modality."""
    if not _is_date(study_date):
        raise ValueError(f"make_series study_date: expected YYYYMMDD, got {study_date!r}")
    grid = _make_grid(spec)
    levels = _CT if spec.modality == "CT" else _MR
    lesions = spec.lesions if spec.lesions is not None else _random_lesions(spec, grid, levels)
    _check_lesions(lesions, spec, levels)
    ctx = _SeriesContext(
        spec, patient, study_instance_uid,
        _uid("series", study_instance_uid, patient.patient_id, study_date, repr(spec)),
        frame_of_reference_uid or _uid("frame-of-reference", study_instance_uid, spec.modality),
        study_date, grid)
    mask = np.zeros((spec.slices, spec.rows, spec.columns), dtype=np.bool_)
    rng = np.random.default_rng([spec.seed, 1])
    omitted = set(spec.omit_instance_numbers)
    datasets = []
    for k in range(spec.slices):
        pixels = _render_slice(k, spec, grid, levels, lesions, mask, rng)
        if k + 1 not in omitted:
            datasets.append(_slice_dataset(ctx, k, pixels))
    mask.flags.writeable = False
    voxels = int(np.count_nonzero(mask))
    log.debug("synthetic series %s: %d of %d slices, %d lesion voxels",
              ctx.series_instance_uid, len(datasets), spec.slices, voxels)
    return SyntheticSeries(spec, tuple(datasets), ctx.series_instance_uid, mask,
                           voxels * grid.spacing**2 * grid.thickness, lesions)


def make_study(*specs: SeriesSpec, patient: PatientInfo | None = None,
               seed: int = 0) -> SyntheticStudy:
    """A study of the given series (default: one ``SeriesSpec()`` CT series)."""
    specs = specs or (SeriesSpec(),)
    seen: dict[int, int] = {}
    for i, spec in enumerate(specs):
        if spec.series_number in seen:
            raise ValueError(f"specs[{i}].series_number: {spec.series_number} is already used by "
                             f"specs[{seen[spec.series_number]}]; give each series its own number")
        seen[spec.series_number] = i
    patient = make_patient(seed) if patient is None else patient
    study_uid = _uid("study", patient.patient_id, str(seed), repr(specs))
    series = tuple(make_series(s, patient=patient, study_instance_uid=study_uid) for s in specs)
    return SyntheticStudy(patient, study_uid, series)


def iter_datasets(study: SyntheticStudy) -> Iterator[Dataset]:
    """Every instance of the study, series by series, in InstanceNumber order."""
    for series in study.series:
        yield from series.datasets


def available_transfer_syntaxes() -> tuple[UID, ...]:
    """Transfer syntaxes ``write_study`` can write here (lossless only)."""
    return _UNCOMPRESSED + tuple(u for u in _LOSSLESS if get_encoder(u).is_available)


def _resolve_transfer_syntax(text: str | None) -> UID:
    if text is None:
        return ExplicitVRLittleEndian
    available = available_transfer_syntaxes()
    for uid in (*_UNCOMPRESSED, *_LOSSLESS):
        if text in (str(uid), uid.keyword):
            if uid in available:
                return uid
            missing = ", ".join(get_encoder(uid).missing_dependencies)
            raise ValueError(f"transfer_syntax {text!r} ({uid.name}): no encoder available "
                             f"({missing})")
    names = ", ".join(f"{u} ({u.keyword})" for u in available)
    name = UID(text).name if re.fullmatch(r"\d+(\.\d+)+", text) else "not a UID"
    raise ValueError(f"transfer_syntax {text!r} ({name}): not supported for "
                     f"synthetic data (lossless with an available encoder only); "
                     f"expected one of: {names}")


def _encoded(ds: Dataset, uid: UID) -> Dataset:
    if uid == ExplicitVRLittleEndian:
        return ds
    out = copy.deepcopy(ds)
    if uid in _UNCOMPRESSED:
        out.file_meta.TransferSyntaxUID = uid
    else:
        out.compress(uid, generate_instance_uid=False)
    return out


def write_study(study: SyntheticStudy, out_dir: Path, *,
                transfer_syntax: str | None = None) -> list[Path]:
    """Write ``out_dir/<SeriesNumber>/<InstanceNumber:04d>.dcm``, optionally re-encoded."""
    uid = _resolve_transfer_syntax(transfer_syntax)
    paths = []
    for series in study.series:
        folder = Path(out_dir) / str(series.spec.series_number)
        folder.mkdir(parents=True, exist_ok=True)
        for ds in series.datasets:
            path = folder / f"{int(ds.InstanceNumber):04d}.dcm"
            pydicom.dcmwrite(path, _encoded(ds, uid), enforce_file_format=True)
            paths.append(path)
    return paths


def parse_lesion(text: str) -> Lesion:
    """Parse "x,y,z,radius,intensity" (mm, LPS; HU for CT, signal for MR)."""
    names = ("x", "y", "z", "radius", "intensity")
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != len(names):
        raise ValueError(f"lesion {text!r}: expected 5 comma-separated numbers "
                         f"'x,y,z,radius,intensity', got {len(parts)} field(s)")
    values = []
    for name, part in zip(names, parts, strict=True):
        try:
            values.append(float(part))
        except ValueError:
            raise ValueError(f"lesion {text!r}: {name} is not a number: {part!r}") from None
    x, y, z, radius, intensity = values
    return Lesion((x, y, z), radius, intensity)
