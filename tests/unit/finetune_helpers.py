"""Shared helpers for the fine-tuning tests: reference SEGs written like a viewer would,
and a node store filled through the real intake."""

from __future__ import annotations

from collections.abc import Sequence
from io import BytesIO
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from node.db import make_engine
from node.intake import Intake
from node.settings import Settings
from node.spool import Spool

LESION_CATEGORY = hd.sr.CodedConcept("49755003", "SCT", "Morphologically abnormal structure")
LESION_TYPE = hd.sr.CodedConcept("52988006", "SCT", "Lesion")


def reference_seg(source: Sequence[Dataset], mask: np.ndarray, *,
                  algorithm: str = "MANUAL", label: str = "Tumour",
                  property_type: hd.sr.CodedConcept = LESION_TYPE) -> hd.seg.Segmentation:
    """A SEG of ``mask`` (slices in the order of ``source``) as a person's viewer would
    write it; ``label`` is deliberately not the model's label name (codes must match)."""
    kind = hd.seg.SegmentAlgorithmTypeValues[algorithm]
    ident = None
    if kind != hd.seg.SegmentAlgorithmTypeValues.MANUAL:
        ident = hd.AlgorithmIdentificationSequence(
            name="other-ai" if algorithm == "AUTOMATIC" else "contour tool", version="1",
            family=codes.cid7162.ArtificialIntelligence)
    description = hd.seg.SegmentDescription(
        segment_number=1, segment_label=label, segmented_property_category=LESION_CATEGORY,
        segmented_property_type=property_type, algorithm_type=kind,
        algorithm_identification=ident)
    key = [str(source[0].SeriesInstanceUID), algorithm, label]   # same inputs, same UIDs
    return hd.seg.Segmentation(
        source_images=list(source), pixel_array=mask.astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description],
        series_instance_uid=generate_uid(entropy_srcs=["series", *key]),
        series_number=950, sop_instance_uid=generate_uid(entropy_srcs=["instance", *key]),
        instance_number=1,
        manufacturer="Reading room", manufacturer_model_name="Viewer",
        software_versions="1", device_serial_number="1", omit_empty_frames=True)


def part10(ds: Dataset) -> bytes:
    buffer = BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def store_all(settings: Settings, datasets: Sequence[Dataset]) -> None:
    """Put data sets into the node's spool and index through the node's own intake."""
    spool = Spool(settings.storage.spool, fsync=False)
    spool.prepare()
    engine = make_engine(settings.storage.database)
    intake = Intake(spool, engine)
    try:
        for ds in datasets:
            intake.store(part10(ds))
    finally:
        intake.close()
        engine.dispose()


def files_of(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.dcm") if p.is_file())
