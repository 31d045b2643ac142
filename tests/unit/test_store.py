"""The training store's split: by patient, with a locked test set that new data never
enters unless the admin rebuilds it."""

from __future__ import annotations

from pathlib import Path

from node.finetune.store import TrainingStore


def _add(store: TrainingStore, patients: range) -> None:
    for p in patients:
        for study in range(2):                # two studies per patient: never split apart
            store.manifest["pairs"][f"pair-{p}-{study}"] = {"patient": f"PN{p:04d}"}


def test_locked_test_set_survives_new_patients_until_rebuilt(tmp_path: Path) -> None:
    store = TrainingStore(tmp_path)
    _add(store, range(8))
    first = store.assign_splits(test_fraction=0.25, val_fraction=0.2)
    test = {p for p, s in first.items() if s == "test"}
    assert len(test) == 2 and "val" in first.values() and "train" in first.values()
    for name in ("train", "val", "test"):
        patients = {store.manifest["pairs"][i]["patient"] for i in store.split(name)}
        assert all(first[p] == name for p in patients)
    hash_before = store.manifest_hash()

    reopened = TrainingStore(tmp_path)                 # persisted in manifest.json
    _add(reopened, range(8, 40))
    second = reopened.assign_splits(test_fraction=0.25, val_fraction=0.2)
    assert {p for p, s in second.items() if s == "test"} == test
    assert all(second[p] in ("train", "val") for p in second if p not in first)
    assert all(second[p] == s for p, s in first.items())      # nobody moves
    assert reopened.manifest_hash() != hash_before

    rebuilt = reopened.assign_splits(test_fraction=0.25, val_fraction=0.2,
                                     rebuild_test_set=True)
    new_test = {p for p, s in rebuilt.items() if s == "test"}
    assert len(new_test) == 10 and reopened.manifest["test_set"]["patients"] == sorted(new_test)
    assert all(rebuilt[p] != "test" for p in test - new_test)
