"""The training store: de-identified DICOM, label arrays without PHI, and a manifest.

Layout under the store folder (``[finetune] store``, default ``var/training``)::

    manifest.json          pairs, the patient split, the locked test set
    dicom/<series>/*.dcm   de-identified source images and reference SEGs
    arrays/<pair>.npz      image (HU), labels, affine, spacing: no identifiers

Every pair is keyed by the de-identified UID of its SEG; the split is by patient
pseudonym. The locked test set is chosen once and kept across model versions; new patients
go to train or validation, never silently to test, until an admin rebuilds it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom

from node.finetune.deid import Deidentifier
from node.finetune.harvest import LabelledPair

SPLITS = ("train", "val", "test")


@dataclass(frozen=True, eq=False)
class Sample:
    """One training example from the store."""

    pair_id: str
    patient: str
    image: npt.NDArray[np.float32]
    labels: npt.NDArray[np.uint8]
    affine: npt.NDArray[np.float64]
    spacing: tuple[float, float, float]


def _write_atomic(path: Path, data: bytes) -> None:
    temp = path.with_name(f".{path.name}.part")
    with temp.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(temp, path)


class TrainingStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.manifest_path = root / "manifest.json"
        self.manifest: dict[str, Any] = {"format": 1, "pairs": {}, "patients": {},
                                         "test_set": None}
        if self.manifest_path.is_file():
            self.manifest = json.loads(self.manifest_path.read_text())

    def save(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        _write_atomic(self.manifest_path,
                      (json.dumps(self.manifest, indent=2, sort_keys=True) + "\n").encode())

    def pair_id(self, deid: Deidentifier, seg_sop_instance_uid: str) -> str:
        return deid.uid(seg_sop_instance_uid)

    def has(self, pair_id: str) -> bool:
        return pair_id in self.manifest["pairs"]

    def add(self, pair: LabelledPair, deid: Deidentifier) -> str:
        """De-identify and store one pair (idempotent); returns its pair id."""
        pair_id = self.pair_id(deid, pair.seg.sop_instance_uid)
        if self.has(pair_id):
            return pair_id
        patient = deid.pseudonym(pair.seg.patient_id)
        series_uid = deid.uid(pair.volume.series_instance_uid)
        folder = self.root / "dicom" / series_uid
        folder.mkdir(parents=True, exist_ok=True)
        for path in (*pair.source_files, pair.seg.path):
            ds = deid(pydicom.dcmread(path))
            out = self.root / "dicom" / str(ds.SeriesInstanceUID) / f"{ds.SOPInstanceUID}.dcm"
            out.parent.mkdir(parents=True, exist_ok=True)
            temp = out.with_name(f".{out.name}.part")
            ds.save_as(temp, enforce_file_format=True)
            os.replace(temp, out)
        arrays = self.root / "arrays"
        arrays.mkdir(parents=True, exist_ok=True)
        temp = arrays / f".{pair_id}.npz.part"
        with temp.open("wb") as fh:
            np.savez_compressed(fh, image=pair.volume.array, labels=pair.labels,
                                affine=pair.volume.affine, spacing=np.asarray(pair.volume.spacing))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(temp, arrays / f"{pair_id}.npz")
        self.manifest["pairs"][pair_id] = {
            "patient": patient, "series": series_uid,
            "seg": deid.uid(pair.seg.sop_instance_uid),
            "shape": list(pair.labels.shape),
            "spacing": [round(float(s), 4) for s in pair.volume.spacing],
            "label_voxels": {str(k): v for k, v in pair.label_voxels.items()},
            "added": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")}
        self.save()
        return pair_id

    def assign_splits(self, *, test_fraction: float, val_fraction: float,
                      rebuild_test_set: bool = False) -> dict[str, str]:
        """{patient: split}. The test set is drawn only when none exists or on rebuild."""
        patients = sorted({p["patient"] for p in self.manifest["pairs"].values()})
        assigned: dict[str, str] = dict(self.manifest["patients"])
        if rebuild_test_set or self.manifest["test_set"] is None:
            ranked = sorted(patients, key=_rank)
            n_test = max(1, round(test_fraction * len(patients))) if len(patients) > 2 else 0
            test = set(ranked[:n_test])
            assigned = {p: s for p, s in assigned.items() if s != "test" and p not in test}
            assigned.update({p: "test" for p in test})
            self.manifest["test_set"] = {
                "patients": sorted(test),
                "created": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")}
        for patient in patients:
            if patient not in assigned:
                assigned[patient] = "val" if _fraction(patient) < val_fraction else "train"
        if not any(s == "val" for s in assigned.values()):
            spare = sorted((p for p, s in assigned.items() if s == "train"), key=_rank)
            if len(spare) > 1:
                assigned[spare[0]] = "val"
        self.manifest["patients"] = assigned
        self.save()
        return assigned

    def split(self, name: str) -> list[str]:
        patients = self.manifest["patients"]
        return sorted(pid for pid, p in self.manifest["pairs"].items()
                      if patients.get(p["patient"]) == name)

    def load(self, pair_id: str) -> Sample:
        with np.load(self.root / "arrays" / f"{pair_id}.npz") as data:
            spacing = tuple(float(s) for s in data["spacing"])
            return Sample(pair_id, self.manifest["pairs"][pair_id]["patient"],
                          np.asarray(data["image"], dtype=np.float32),
                          np.asarray(data["labels"], dtype=np.uint8),
                          np.asarray(data["affine"], dtype=np.float64),
                          (spacing[0], spacing[1], spacing[2]))

    def manifest_hash(self) -> str:
        """SHA-256 of the pairs and their split: names the data a version was trained on."""
        view = {"pairs": sorted(self.manifest["pairs"]), "patients": self.manifest["patients"]}
        return hashlib.sha256(json.dumps(view, sort_keys=True).encode()).hexdigest()


def _rank(patient: str) -> str:
    return hashlib.sha256(("rank\x1f" + patient).encode()).hexdigest()


def _fraction(patient: str) -> float:
    return int(hashlib.sha256(("split\x1f" + patient).encode()).hexdigest()[:8], 16) / 2**32
