"""Fine-tuning through the node's store: the domain-shift experiment (issue 7).

The shipped reference model (models/lesion_ct, trained on family A phantoms) meets
family B, another "scanner" (3 mm slices, 1.5 mm pixels, +35 HU calibration offset, more
noise, 30 % of the lesion contrast, textured lesions). A few B studies with MANUAL reference
SEGs go into the node's spool through the real intake; ``run_finetune`` harvests them,
de-identifies them, splits by patient, fine-tunes the shipped weights, compares on the
locked B test set and on family A, and promotes. A candidate trained on shuffled labels
goes through the same gate and is refused.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest

from node.finetune import pipeline
from node.finetune.phantoms import FamilyB, family_b
from node.finetune.registry import Registry, active_model_settings, registry_root
from node.finetune.store import Sample
from node.inference.runner import ModelPool, TorchRunner, read_info
from node.inference.volume import volume_from_datasets
from node.results.seg import build_seg
from node.settings import Settings, load_settings
from node.synth import make_patient
from tests.support import ROOT, write_config
from tests.unit.finetune_helpers import reference_seg, store_all

REFERENCE = ROOT / "models" / "lesion_ct"
SHAPE = (32, 96, 96)
SCANNER_B = FamilyB(offset_hu=35.0, lesion_contrast=0.3)  # the shipped model: mean Dice ~0.56
PATIENTS = 6
FINETUNE = {"epochs": 6, "steps_per_epoch": 20, "patience": 3, "batch_size": 4,
            "patch_size": [32, 48, 48], "learning_rate": 2e-3, "device": "cpu", "threads": 1,
            "test_fraction": 0.34, "val_fraction": 0.2, "min_improvement": 0.05,
            "regression_margin": 0.05, "regression_phantoms": 2,
            "regression_shape": [48, 96, 96], "min_new_pairs": 3, "replay_phantoms": 1}


def _b_study(i: int) -> tuple[Any, list[pydicom.Dataset]]:
    patient = make_patient(600 + i)
    phantom = family_b(8100 + i, SHAPE, patient=patient,
                       study_instance_uid=f"1.2.826.0.1.3680043.10.1000.{i}",
                       scanner=SCANNER_B)
    seg = reference_seg(phantom.datasets, phantom.mask)
    return phantom, [*phantom.datasets, seg]


@pytest.fixture(scope="module")
def outcome_and_settings(tmp_path_factory: pytest.TempPathFactory
                         ) -> tuple[pipeline.Outcome, Settings]:
    root = tmp_path_factory.mktemp("finetune")
    secret = root / "deid.key"
    secret.write_bytes(bytes(range(32)))       # fixed: the patient split is reproducible
    config = write_config(root / "cfg", models=[{"name": "lesion-ct", "path": str(REFERENCE),
                                                 "device": "cpu"}],
                          finetune={**FINETUNE, "secret_file": str(secret)})
    settings = load_settings(config)
    datasets: list[pydicom.Dataset] = []
    for i in range(PATIENTS):
        phantom, objects = _b_study(i)
        datasets += objects
        if i == 0:   # an AI SEG of the same series: must never become ground truth
            datasets.append(reference_seg(phantom.datasets, np.zeros_like(phantom.mask)
                                          | phantom.mask[::-1], algorithm="AUTOMATIC"))
    store_all(settings, datasets)
    outcome = pipeline.run_finetune(settings, "lesion-ct")
    return outcome, settings


def test_domain_shift_fine_tune_is_promoted(
        outcome_and_settings: tuple[pipeline.Outcome, Settings]) -> None:
    outcome, settings = outcome_and_settings
    local = outcome.metrics["locked_test"]
    regression = outcome.metrics["regression"]
    print(f"\nlocked family-B test set ({outcome.split['test']} pairs): Dice "
          f"{local['current']['mean_dice']:.3f} -> {local['candidate']['mean_dice']:.3f}, "
          f"HD95 {local['current']['hd95_mm']} -> {local['candidate']['hd95_mm']} mm")
    print(f"regression family A ({outcome.split['regression']} phantoms): Dice "
          f"{regression['current']['mean_dice']:.3f} -> "
          f"{regression['candidate']['mean_dice']:.3f}")
    assert outcome.status == "promoted", outcome.reasons
    assert outcome.new_pairs == PATIENTS and outcome.ignored_automatic == 1
    assert outcome.refused == ()
    assert outcome.split["test"] >= 2 and outcome.split["train"] >= 2
    gain = local["candidate"]["mean_dice"] - local["current"]["mean_dice"]
    assert gain >= FINETUNE["min_improvement"]
    assert (regression["current"]["mean_dice"] - regression["candidate"]["mean_dice"]
            <= FINETUNE["regression_margin"])
    # the new version is immutable, carries its provenance, and is what the runtime loads
    registry = Registry(registry_root(settings), "lesion-ct")
    active = registry.active()
    assert active is not None and active.number == outcome.active_version == 2
    assert active.meta["parent"] == 1 and active.version == "1.1.0-local.2"
    assert len(active.meta["data_manifest_sha256"]) == 64
    assert "Dice parent" in (active.path / "MODEL_CARD.md").read_text()
    weights = active.path / "models" / "model.pt"
    assert not weights.stat().st_mode & 0o222
    (model,) = active_model_settings(settings)
    info = read_info(model)
    assert info.version == "1.1.0-local.2" and info.weights_sha256 == active.meta[
        "weights_sha256"]
    # ... and the version that goes into the SEG it writes
    series = _b_study(0)[0]
    prediction = TorchRunner(model).predict(volume_from_datasets(series.datasets))
    seg = build_seg(series.datasets, prediction.labels, info.labels, model="lesion-ct",
                    version=prediction.version, weights_sha256=prediction.weights_sha256,
                    job_key="finetune-test")
    assert seg is not None and seg.SoftwareVersions == "1.1.0-local.2"
    assert "1.1.0-local.2" in seg.ContentDescription


def test_locked_test_set_stays_fixed_and_bad_candidate_is_refused(
        outcome_and_settings: tuple[pipeline.Outcome, Settings]) -> None:
    outcome, settings = outcome_and_settings
    prepared = pipeline.prepare(settings, "lesion-ct")
    manifest = prepared.store.manifest
    assert {s.patient for s in prepared.test} == set(manifest["test_set"]["patients"])
    assert prepared.new_pairs == 0          # nothing new since the run that promoted
    assert prepared.base.number == 2        # the gate compares against the active version
    # the training store holds no identifiers: pseudonyms, shifted dates, new UIDs
    people = [make_patient(600 + i) for i in range(PATIENTS)]
    secrets = {x for p in people for x in (p.patient_id, p.patient_name, p.birth_date)}
    secrets |= {_b_study(i)[0].series_instance_uid for i in range(2)}
    root = prepared.store.root
    manifest_text = (root / "manifest.json").read_text()
    assert not [x for x in secrets if x in manifest_text]
    files = sorted((root / "dicom").rglob("*.dcm"))
    assert len(files) == PATIENTS * (SHAPE[0] + 1)           # source slices + the SEG
    for path in files[::7]:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert ds.PatientIdentityRemoved == "YES" and ds.StudyDate != "20260101"
        assert not [x for x in secrets if x in str(ds)]
        assert not any(elem.tag.is_private for elem in ds)
    with np.load(next((root / "arrays").glob("*.npz"))) as arrays:
        assert sorted(arrays.files) == ["affine", "image", "labels", "spacing"]
    # a candidate trained on labels shuffled voxel by voxel
    rng = np.random.default_rng(0)
    shuffled = tuple(Sample(s.pair_id, s.patient, s.image,
                            rng.permutation(s.labels.ravel()).reshape(s.labels.shape),
                            s.affine, s.spacing) for s in prepared.train)
    quick = settings.model_copy(update={"finetune": settings.finetune.model_copy(
        update={"epochs": 1, "replay_phantoms": 0})})
    network, _ = pipeline.train(dataclasses.replace(prepared, settings=quick), shuffled)
    comparison = pipeline.compare(prepared, network)
    print(f"\nshuffled-label candidate: {comparison.decision.reasons}")
    assert not comparison.decision.promote
    assert any("locked test set" in r for r in comparison.decision.reasons)
    still = Registry(registry_root(settings), "lesion-ct").active()
    assert still is not None and still.number == 2


def test_nightly_skips_without_new_pairs_and_rollback_is_one_command(
        outcome_and_settings: tuple[pipeline.Outcome, Settings]) -> None:
    _, settings = outcome_and_settings
    from node.finetune import nightly

    (skipped,) = nightly(settings)
    assert skipped.status == "skipped" and "0 new labelled pair(s)" in skipped.reasons[0]
    config = str(settings.source_file)
    out = subprocess.run([sys.executable, "-m", "node.cli", "models", "rollback", "lesion-ct",
                          "-c", config, "--json"], capture_output=True, text=True, cwd=ROOT,
                         check=False)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["active_version"] == 1
    listed = subprocess.run([sys.executable, "-m", "node.cli", "models", "list", "-c", config,
                             "--json"], capture_output=True, text=True, cwd=ROOT, check=False)
    (row,) = json.loads(listed.stdout)
    assert row["active_version"] == 1 and row["version"] == "1.1.0"
    assert [v["number"] for v in row["versions"]] == [1, 2]
    # a resident model pool (the worker's) switches back at its next job
    volume = volume_from_datasets(_b_study(0)[0].datasets)
    registry = Registry(registry_root(settings), "lesion-ct")
    registry.set_active(2)
    pool = ModelPool({m.name: m for m in active_model_settings(settings)})
    assert pool.predict("lesion-ct", volume).version == "1.1.0-local.2"
    registry.rollback()
    assert pool.update({m.name: m for m in active_model_settings(settings)}) == ["lesion-ct"]
    assert pool.predict("lesion-ct", volume).version == "1.1.0"
    registry.set_active(2)


def test_finetune_command_without_labels_skips_and_names_why(tmp_path: Path) -> None:
    config = write_config(tmp_path / "cfg", models=[{"name": "lesion-ct",
                                                     "path": str(REFERENCE)}],
                          finetune={"regression_phantoms": 1, "device": "cpu"})
    run = [sys.executable, "-m", "node.cli", "finetune", "-c", str(config)]
    out = subprocess.run([*run, "--model", "lesion-ct", "--json"], capture_output=True,
                         text=True, cwd=ROOT, check=False)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["status"] == "skipped" and "not enough patients" in data["reasons"][0]
    assert data["active_version"] == 1            # the configured bundle, imported as v1
    missing = subprocess.run([*run, "--model", "nope"], capture_output=True, text=True,
                             cwd=ROOT, check=False)
    assert missing.returncode == 4 and "no model named 'nope'" in missing.stderr
