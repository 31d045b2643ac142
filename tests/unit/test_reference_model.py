"""The shipped reference model (models/lesion_ct) on phantoms it never saw.

The bundle is loaded the way the runtime loads it: ``network_def`` through MONAI's
ConfigParser, weights with ``torch.load(..., weights_only=True)``, pre-processing and
sliding window from the ``pacsnode`` section of configs/metadata.json. The volume is built
from the datasets alone (HU from the rescale attributes, slices sorted by position).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.inferers import sliding_window_inference
from pydicom import Dataset

from node.synth import Lesion, SeriesSpec, SyntheticSeries, make_study

BUNDLE = Path(__file__).resolve().parents[2] / "models" / "lesion_ct"
WEIGHTS = BUNDLE / "models" / "model.pt"
FRESH = [  # seeds far outside the training and validation ranges (checked below)
    SeriesSpec(modality="CT", slices=64, rows=256, columns=256, pixel_spacing_mm=0.8,
               slice_thickness_mm=1.5, seed=900_001),
    SeriesSpec(modality="CT", slices=40, rows=200, columns=232, pixel_spacing_mm=1.1,
               slice_thickness_mm=3.0, seed=900_002),
    SeriesSpec(modality="CT", slices=72, rows=224, columns=224, pixel_spacing_mm=0.7,
               slice_thickness_mm=1.25, seed=900_003,
               lesions=(Lesion((30.0, -8.0, 5.0), 14.0, -30.0),      # large, darker
                        Lesion((-26.0, -2.0, -10.0), 4.5, 150.0))),  # small, brighter
]


@pytest.fixture(scope="module")
def metadata() -> dict[str, Any]:
    return dict(json.loads((BUNDLE / "configs" / "metadata.json").read_text()))


@pytest.fixture(scope="module")
def network() -> torch.nn.Module:
    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "inference.json"))
    net = parser.get_parsed_content("network_def")
    assert isinstance(net, torch.nn.Module)
    net.load_state_dict(torch.load(WEIGHTS, map_location="cpu", weights_only=True))
    return net.eval()


def _hu_volume(datasets: tuple[Dataset, ...]) -> np.ndarray:
    def position(ds: Dataset) -> float:
        iop = np.array(ds.ImageOrientationPatient, dtype=float)
        return float(np.cross(iop[:3], iop[3:]) @ np.array(ds.ImagePositionPatient, dtype=float))

    return np.stack([ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
                     for ds in sorted(datasets, key=position)]).astype(np.float32)


def _segment(net: torch.nn.Module, hu: np.ndarray, pn: dict[str, Any]) -> np.ndarray:
    assert pn["target_spacing_mm"] is None  # native grid: nothing to resample back
    lo, hi = pn["window_hu"]
    x = torch.from_numpy((np.clip(hu, lo, hi) - lo) / (hi - lo))[None, None]
    with torch.no_grad():
        logits = sliding_window_inference(x, pn["roi_size"], pn["sw_batch_size"], net,
                                          overlap=pn["overlap"], mode=pn["blend_mode"])
    assert isinstance(logits, torch.Tensor)
    return np.asarray(logits.argmax(1)[0].numpy() == 1)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


def test_bundle_files_and_metadata(metadata: dict[str, Any]) -> None:
    assert WEIGHTS.stat().st_size < 5 * 1024 * 1024
    assert (BUNDLE / "docs" / "README.md").read_text().count("NOT for clinical use") == 1
    for key in ("name", "version", "description", "network_data_format", "labels", "pacsnode"):
        assert key in metadata, key
    assert metadata["version"] == "1.1.0"
    assert metadata["labels"] == {"0": "background", "1": "lesion"}
    assert set(metadata["network_data_format"]) == {"inputs", "outputs"}
    pn = metadata["pacsnode"]
    for key in ("target_spacing_mm", "window_hu", "roi_size", "overlap", "segments",
                "weights_sha256", "training", "validation"):
        assert key in pn, key
    segment = pn["segments"]["1"]
    assert segment["segmented_property_category"]["CodeValue"] == "49755003"
    assert segment["segmented_property_type"]["CodeValue"] == "52988006"
    assert {segment[k]["CodingSchemeDesignator"] for k in
            ("segmented_property_category", "segmented_property_type")} == {"SCT"}
    assert hashlib.sha256(WEIGHTS.read_bytes()).hexdigest() == pn["weights_sha256"]


def test_inference_config_matches_metadata(metadata: dict[str, Any]) -> None:
    pn = metadata["pacsnode"]
    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "inference.json"))
    inferer = parser.get_parsed_content("inferer")
    assert list(inferer.roi_size) == pn["roi_size"] and inferer.overlap == pn["overlap"]
    hu = np.array([[[-1000.0, -200.0, 50.0, 300.0, 700.0]]], dtype=np.float32)
    x = parser.get_parsed_content("preprocessing")(hu)
    assert tuple(x.shape) == (1, *hu.shape)
    np.testing.assert_allclose(np.asarray(x)[0, 0, 0], [0.0, 0.0, 0.5, 1.0, 1.0], atol=1e-6)


@pytest.mark.parametrize("spec", FRESH, ids=["seed900001", "seed900002", "seed900003"])
def test_fresh_phantom_dice_and_alignment(spec: SeriesSpec, metadata: dict[str, Any],
                                          network: torch.nn.Module) -> None:
    training = metadata["pacsnode"]["training"]
    for lo, hi in (training["train_seed_range"], training["validation_seed_range"]):
        assert not lo <= spec.seed <= hi
    series: SyntheticSeries = make_study(spec, seed=spec.seed).series[0]
    truth = series.present_mask()
    pred = _segment(network, _hu_volume(series.datasets), metadata["pacsnode"])
    assert pred.shape == (spec.slices, spec.rows, spec.columns) == truth.shape
    score = _dice(pred, truth)
    assert score >= 0.9, f"seed {spec.seed}: Dice {score:.4f}"
    offset = np.argwhere(pred).mean(axis=0) - np.argwhere(truth).mean(axis=0)
    assert np.linalg.norm(offset) <= 1.0, f"seed {spec.seed}: centroid off by {offset} voxels"
