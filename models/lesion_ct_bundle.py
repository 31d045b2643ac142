"""Write the lesion_ct MONAI bundle: weights, configs/metadata.json, configs/inference.json
and the model card docs/README.md. Used by train_lesion_ct.py; the values that define the
model live there and reach this module as arguments."""

from __future__ import annotations

import hashlib
import json
import platform
from pathlib import Path
from typing import Any

import monai
import numpy as np
import torch

# DICOM SEG segment description (PS3.3 C.8.20.2; codes from CID 7150 / CID 7151).
SEGMENT = {
    "segment_number": 1,
    "segment_label": "Lesion",
    "algorithm_type": "AUTOMATIC",
    "segmented_property_category": {"CodeValue": "49755003", "CodingSchemeDesignator": "SCT",
                                    "CodeMeaning": "Morphologically abnormal structure"},
    "segmented_property_type": {"CodeValue": "52988006", "CodingSchemeDesignator": "SCT",
                                "CodeMeaning": "Lesion"},
}


def _inference_config(model: dict[str, Any]) -> dict[str, Any]:
    lo, hi = model["window_hu"]
    return {
        "imports": ["$import torch"],
        "bundle_root": ".",
        "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        "network_def": {"_target_": "monai.networks.nets.UNet", **model["network"]},
        "network": "$@network_def.to(@device)",
        "checkpoint": "$@bundle_root + '/models/model.pt'",
        "preprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "EnsureChannelFirst", "channel_dim": "no_channel"},
                {"_target_": "ScaleIntensityRange", "a_min": lo, "a_max": hi, "b_min": 0.0,
                 "b_max": 1.0, "clip": True},
                {"_target_": "EnsureType", "data_type": "tensor", "dtype": "$torch.float32"},
            ],
        },
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": model["roi_size"],
                    "sw_batch_size": model["sw_batch_size"], "overlap": model["overlap"],
                    "mode": model["blend_mode"]},
        "postprocessing": {"_target_": "AsDiscrete", "argmax": True},
    }


def _metadata(model: dict[str, Any], training: dict[str, Any], validation: list[dict[str, Any]],
              weights_sha256: str) -> dict[str, Any]:
    roi = model["roi_size"]
    dices = [v["dice"] for v in validation]
    return {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/"
                  "0.8.1/meta_schema_20220324.json",
        "name": model["name"],
        "version": model["version"],
        "changelog": model["changelog"],
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "optional_packages_version": {"pydicom": __import__("pydicom").__version__},
        "task": "Lesion segmentation in synthetic CT phantoms (demo/reference)",
        "description": "Small 3D UNet that segments spherical lesions in the soft tissue of "
                       "pacsnode's synthetic CT phantoms. Reference model for the node's "
                       "runtime; NOT for clinical use.",
        "authors": "pacsnode project",
        "copyright": "Apache-2.0",
        "data_source": "node/synth.py synthetic phantoms generated at training time",
        "data_type": "dicom",
        "image_classes": "single channel CT in HU, native voxel grid (slices, rows, columns)",
        "label_classes": "0 background, 1 lesion",
        "pred_classes": "0 background, 1 lesion",
        "eval_metrics": {"mean_dice": round(float(np.mean(dices)), 4),
                         "min_dice": round(float(np.min(dices)), 4)},
        "intended_use": "Demonstration and testing of pacsnode on synthetic data only. "
                        "Not a medical device; not for clinical use.",
        "references": [],
        "network_data_format": {
            "inputs": {"image": {
                "type": "image", "format": "hounsfield", "modality": "CT", "num_channels": 1,
                "spatial_shape": roi, "dtype": "float32", "value_range": [0, 1],
                "is_patch_data": True, "channel_def": {"0": "image"}}},
            "outputs": {"pred": {
                "type": "image", "format": "segmentation", "num_channels": 2,
                "spatial_shape": roi, "dtype": "float32", "value_range": [0, 1],
                "is_patch_data": True, "channel_def": {"0": "background", "1": "lesion"}}},
        },
        "labels": {"0": "background", "1": "lesion"},
        "pacsnode": {
            "modality": "CT",
            "input_axes": ["slice", "row", "column"],
            "slice_order": "ascending position along the slice normal "
                           "(ImagePositionPatient . (row x column cosines))",
            "intensity": "HU = stored value * RescaleSlope + RescaleIntercept",
            "target_spacing_mm": model["target_spacing_mm"],
            "window_hu": list(model["window_hu"]),
            "scaled_range": [0.0, 1.0],
            "roi_size": roi,
            "overlap": model["overlap"],
            "sw_batch_size": model["sw_batch_size"],
            "blend_mode": model["blend_mode"],
            "padding_value": 0.0,
            "output": "argmax over channels; label 1 is the lesion",
            "segments": {"1": SEGMENT},
            "validated_geometry": model["geometry"],
            "weights_sha256": weights_sha256,
            "training": training,
            "validation": validation,
        },
    }


def _card(meta: dict[str, Any]) -> str:
    pn = meta["pacsnode"]
    tr, geo = pn["training"], pn["validated_geometry"]
    rows = "\n".join(
        f"| {v['seed']} | {' x '.join(map(str, v['shape']))} | {v['pixel_spacing_mm']} | "
        f"{v['slice_thickness_mm']} | {v['lesions']} | {v['dice']:.4f} |"
        for v in pn["validation"])
    net = ", ".join(f"{k}={v}" for k, v in tr["network"].items())
    radius, bright, dark = (geo[k] for k in ("lesion_radius_mm", "contrast_bright_hu",
                                             "contrast_dark_hu"))
    patch = tr.get("patch", [64, 64, 64])
    retrain = (f"--epochs {tr['epochs']} --volumes {tr['phantoms']} --seed {tr['seed']} "
               f"--lr {tr['learning_rate']} --batch {tr['batch']} "
               f"--roi {' '.join(map(str, patch))} --norm {tr['network']['norm']}")
    return f"""# {meta['name']} {meta['version']} — model card

**Demo/reference model on synthetic data only. Not a medical device; NOT for clinical use.**
It has never seen a patient image and its output on one means nothing.

## What it does
Segments spherical lesions (label 1) in the soft tissue of the synthetic CT phantoms made
by `node/synth.py`. pacsnode's default configuration routes CT series to it so that a fresh
install does real inference end to end; results go out as DICOM SEG with the segment
SCT 49755003 "Morphologically abnormal structure" / SCT 52988006 "Lesion".

## Network
MONAI `UNet({net})`; {pn['training']['parameters']:,} parameters,
weights `models/model.pt` (state_dict, loads with `torch.load(..., weights_only=True)`),
SHA-256 `{pn['weights_sha256']}`. The first level keeps full resolution (stride 1): the
last nonlinear decoder layer then combines each voxel's own intensity with the upsampled
context, which is what puts the mask boundary on the right voxel. (With a stride-2 first
level the boundary comes from half-resolution features and ends up blurred and shifted by
up to a voxel.) Instance normalisation: each patch is normalised by its own statistics, so
the model was trained on patches of the same size as its inference ROI.

## Pre- and post-processing (fixed)
1. Volume `(slices, rows, columns)` from the series, slices in ascending position along the
   slice normal; HU = stored value x RescaleSlope + RescaleIntercept.
2. No resampling: the model runs on the native grid (`target_spacing_mm: null`), so the
   mask lines up voxel for voxel with the source images.
3. HU clipped to [{pn['window_hu'][0]:g}, {pn['window_hu'][1]:g}] and scaled to [0, 1].
4. `monai.inferers.sliding_window_inference`, ROI {pn['roi_size']}, overlap {pn['overlap']},
   `{pn['blend_mode']}` blending, padding value 0.
5. Argmax over the two channels; label 1 is the lesion.

## Training data
{tr['phantoms']} synthetic phantoms (seeds {tr['train_seed_range'][0]}–{tr['train_seed_range'][1]}),
{geo['slices'][0]}–{geo['slices'][1]} slices of {geo['matrix'][0]}–{geo['matrix'][1]} pixels,
pixel spacing {geo['pixel_spacing_mm'][0]}–{geo['pixel_spacing_mm'][1]} mm, slice thickness
{geo['slice_thickness_mm'][0]}–{geo['slice_thickness_mm'][1]} mm, axial. Half use synth's own
random lesions (1–3, contrast ±60–120 HU); half have 1–4 placed lesions of radius
{radius[0]:g}–{radius[1]:g} mm, {bright[0]:g}–{bright[1]:g} HU brighter or
{dark[0]:g}–{dark[1]:g} HU
darker than soft tissue (40 HU). {tr['steps']} steps of {tr['batch']} random
{'×'.join(map(str, patch))} patches (60 % centred near a lesion), flips and row/column swap
(no intensity augmentation: synthetic HU are exact); Dice + cross-entropy, Adam with
one-cycle learning rate (peak {tr['learning_rate']}); seed {tr['seed']};
{tr['train_time_s']} s on {tr['device']} ({tr['torch_threads']} threads), trained {tr['date']}.

## Measured on fresh phantoms (validation seeds, never trained on)
| seed | shape | pixel mm | slice mm | lesions | Dice |
|---|---|---|---|---|---|
{rows}

`tests/unit/test_reference_model.py` checks Dice ≥ 0.9 and voxel alignment on further
phantoms with seeds outside both ranges.

## Limitations
- Synthetic phantoms only: perfect spheres, constant lesion HU, Gaussian noise, no partial
  volume, no artefacts, no real anatomy. Expect nonsense on real CT.
- Validated for axial series within the geometry above; thicker slices, other pixel
  spacings or lesion contrasts under about 40 HU are untested.
- A dark lesion near fat density (about −100 HU) can be confused with fat.
- No calibration or uncertainty; the output is a hard mask.

## Retrain
```
.venv/bin/python models/train_lesion_ct.py {retrain} --out models/lesion_ct
```
"""


def write_bundle(out: Path, state_dict: dict[str, torch.Tensor], *, model: dict[str, Any],
                 training: dict[str, Any], validation: list[dict[str, Any]]) -> None:
    """Write (or overwrite) the bundle folder ``out``."""
    for sub in ("configs", "models", "docs"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    weights = out / "models" / "model.pt"
    torch.save(state_dict, weights)
    sha = hashlib.sha256(weights.read_bytes()).hexdigest()
    training = {**training, "network": model["network"],
                "parameters": int(sum(t.numel() for t in state_dict.values())),
                "python_version": platform.python_version()}
    meta = _metadata(model, training, validation, sha)
    (out / "configs" / "metadata.json").write_text(json.dumps(meta, indent=2) + "\n")
    (out / "configs" / "inference.json").write_text(
        json.dumps(_inference_config(model), indent=2) + "\n")
    (out / "docs" / "README.md").write_text(_card(meta))
