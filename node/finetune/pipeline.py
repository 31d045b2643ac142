"""harvest -> de-identify -> split -> train -> evaluate -> gate -> promote.

``run_finetune`` is what ``pacsnode finetune`` runs; ``nightly`` is what the scheduler
calls. The stages are separate functions (``prepare``, ``train``, ``compare``,
``promote``) so that a caller can, for example, train a candidate on other data and still
go through the same gate.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from node.db import make_engine
from node.errors import ModelError
from node.finetune.card import model_card
from node.finetune.deid import Deidentifier, load_secret
from node.finetune.evaluate import Decision, Scores, gate, score
from node.finetune.harvest import HarvestError, load_pair, survey
from node.finetune.phantoms import family_a
from node.finetune.registry import Registry, VersionInfo, registry_root
from node.finetune.store import Sample, TrainingStore
from node.finetune.train import Progress, TrainResult, train_candidate
from node.inference.runner import ModelInfo, build_network, pick_device, read_info
from node.inference.volume import volume_from_datasets
from node.settings import ModelSettings, Settings

log = logging.getLogger(__name__)

REGRESSION_SEED = 7_000_000
REPLAY_SEED = 7_100_000


@dataclass(frozen=True)
class Outcome:
    """What one fine-tuning run did; ``status`` is promoted, kept or skipped."""

    model: str
    status: str
    reasons: tuple[str, ...]
    active_version: int | None
    active_version_name: str | None = None
    new_pairs: int = 0
    split: dict[str, int] = field(default_factory=dict)
    refused: tuple[tuple[str, str], ...] = ()
    ignored_automatic: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"model": self.model, "status": self.status, "reasons": list(self.reasons),
                "active_version": self.active_version,
                "active_version_name": self.active_version_name, "new_pairs": self.new_pairs,
                "split": self.split, "refused": [list(r) for r in self.refused],
                "ignored_automatic": self.ignored_automatic, "metrics": self.metrics}


@dataclass(frozen=True, eq=False)
class Prepared:
    settings: Settings
    model: ModelSettings
    registry: Registry
    base: VersionInfo
    info: ModelInfo
    device: str
    store: TrainingStore
    train: tuple[Sample, ...]
    val: tuple[Sample, ...]
    test: tuple[Sample, ...]
    regression: tuple[Sample, ...]
    new_pairs: int          # pairs in the store that no run has trained on yet
    refused: tuple[tuple[str, str], ...]
    ignored_automatic: int


def _model(settings: Settings, name: str) -> ModelSettings:
    for model in settings.models:
        if model.name == name:
            if model.format != "monai_bundle":
                raise ModelError(f"model {name}: fine-tuning needs a MONAI bundle, "
                                 f"format is {model.format!r}")
            return model
    raise ModelError(f"no model named {name!r}; configured: "
                     f"{[m.name for m in settings.models]}")


def _registry(settings: Settings, model: ModelSettings) -> tuple[Registry, VersionInfo]:
    """The registry, with the configured bundle imported as version 1 on first use."""
    registry = Registry(registry_root(settings), model.name)
    if not registry.versions():
        meta = json.loads((model.path / "configs" / "metadata.json").read_text())
        version = registry.add(model.path, {
            "version": str(meta.get("version", "0")), "parent": None,
            "source": str(model.path), "date": _now(), "data_manifest_sha256": None,
            "metrics": {}}, f"# {model.name} {meta.get('version', '0')}\n\nImported from "
                            f"`{model.path}` (the configured bundle); see docs/README.md.\n")
        registry.set_active(version.number)
    active = registry.active()
    if active is None:
        active = registry.versions()[-1]
        registry.set_active(active.number)
    return registry, active


def phantom_samples(first_seed: int, count: int,
                    shape: tuple[int, int, int]) -> tuple[Sample, ...]:
    """Family A phantoms (the original domain) as samples, the same every run."""
    out = []
    for seed in range(first_seed, first_seed + count):
        phantom = family_a(seed, shape)
        volume = volume_from_datasets(phantom.datasets)
        order = {str(ds.SOPInstanceUID): int(ds.InstanceNumber) - 1 for ds in phantom.datasets}
        labels = phantom.mask[[order[u] for u in volume.sop_instance_uids]].astype("uint8")
        out.append(Sample(f"A{seed}", "phantom-A", volume.array, labels, volume.affine,
                          volume.spacing))
    return tuple(out)


def regression_set(settings: Settings) -> tuple[Sample, ...]:
    config = settings.finetune
    return phantom_samples(REGRESSION_SEED, config.regression_phantoms, config.regression_shape)


def harvest_into_store(settings: Settings, model: ModelSettings, info: ModelInfo,
                       store: TrainingStore, deid: Deidentifier
                       ) -> tuple[int, tuple[tuple[str, str], ...], int]:
    """Add every new labelled pair; returns (new pairs, refusals, AI-only SEGs ignored)."""
    codes = {(spec.type[0], spec.type[1]): int(spec.value) for spec in info.labels}
    engine = make_engine(settings.storage.database)
    try:
        found = survey(engine, settings.storage.spool)
        refused = list(found.refused)
        new = 0
        for candidate in found.candidates:
            if store.has(store.pair_id(deid, candidate.sop_instance_uid)):
                continue
            try:
                pair = load_pair(engine, settings.storage.spool, candidate, codes)
            except HarvestError as exc:
                refused.append((candidate.sop_instance_uid, str(exc)))
                log.warning("harvest: %s", exc)
                continue
            store.add(pair, deid)
            new += 1
    finally:
        engine.dispose()
    return new, tuple(refused), len(found.automatic)


def prepare(settings: Settings, name: str, *, rebuild_test_set: bool = False) -> Prepared:
    config = settings.finetune
    model = _model(settings, name)
    registry, base = _registry(settings, model)
    device = pick_device(config.device)
    info = read_info(model.model_copy(update={"path": base.path, "version": None}))
    var = settings.storage.spool.parent
    store = TrainingStore((config.store or var / "training") / model.name)
    deid = Deidentifier(load_secret(config.secret_file or var / "deid.key"),
                        retain_dates=config.retain_dates)
    new, refused, automatic = harvest_into_store(settings, model, info, store, deid)
    store.assign_splits(test_fraction=config.test_fraction, val_fraction=config.val_fraction,
                        rebuild_test_set=rebuild_test_set)
    splits = {s: tuple(store.load(p) for p in store.split(s)) for s in ("train", "val", "test")}
    unused = len(set(store.manifest["pairs"]) - set(store.manifest.get("last_run_pairs", [])))
    log.info("harvest for %s: %d pair(s) added, %d not yet trained on", name, new, unused)
    return Prepared(settings, model, registry, base, info, device, store, splits["train"],
                    splits["val"], splits["test"], regression_set(settings), unused, refused,
                    automatic)


def current_network(prepared: Prepared) -> torch.nn.Module:
    return build_network(prepared.info).to(prepared.device)


def train(prepared: Prepared, samples: tuple[Sample, ...] | None = None, *,
          progress: Progress | None = None) -> tuple[torch.nn.Module, TrainResult]:
    """A candidate fine-tuned from the active version on ``samples`` (default: the train
    split) plus ``replay_phantoms`` original-domain phantoms (rehearsal against
    forgetting; never the regression set's seeds)."""
    config = prepared.settings.finetune
    replay = phantom_samples(REPLAY_SEED, config.replay_phantoms, config.regression_shape)
    network = current_network(prepared)
    result = train_candidate(network, prepared.info, (*(samples or prepared.train), *replay),
                             prepared.val,
                             prepared.settings.finetune, device=prepared.device,
                             progress=progress)
    return network, result


@dataclass(frozen=True)
class Comparison:
    current_local: Scores
    candidate_local: Scores
    current_regression: Scores
    candidate_regression: Scores
    decision: Decision

    def as_dict(self) -> dict[str, Any]:
        return {"locked_test": {"current": self.current_local.as_dict(),
                                "candidate": self.candidate_local.as_dict()},
                "regression": {"current": self.current_regression.as_dict(),
                               "candidate": self.candidate_regression.as_dict()}}


def compare(prepared: Prepared, candidate: torch.nn.Module) -> Comparison:
    current = current_network(prepared)
    info, device = prepared.info, prepared.device
    scores = [score(net, samples, info, device) for samples in (prepared.test,
                                                                prepared.regression)
              for net in (current, candidate)]
    decision = gate(current_local=scores[0], candidate_local=scores[1],
                    current_regression=scores[2], candidate_regression=scores[3],
                    config=prepared.settings.finetune)
    return Comparison(scores[0], scores[1], scores[2], scores[3], decision)


def promote(prepared: Prepared, result: TrainResult, comparison: Comparison) -> VersionInfo:
    """Write the candidate as the next version and make it active (atomic pointer)."""
    registry, base = prepared.registry, prepared.base
    number = max(v.number for v in registry.versions()) + 1
    root = re.sub(r"-local\.\d+$", "", base.version)
    version = f"{root}-local.{number}"
    with tempfile.TemporaryDirectory(dir=registry.root) as tmp:
        bundle = Path(tmp) / "bundle"
        shutil.copytree(base.path, bundle,
                        ignore=shutil.ignore_patterns("version.json", "MODEL_CARD.md"))
        for path in bundle.rglob("*"):
            path.chmod(path.stat().st_mode | stat.S_IWUSR)
        weights = bundle / "models" / "model.pt"
        torch.save(result.state_dict, weights)
        import hashlib

        sha = hashlib.sha256(weights.read_bytes()).hexdigest()
        meta_path = bundle / "configs" / "metadata.json"
        meta = json.loads(meta_path.read_text())
        meta["version"] = version
        meta.setdefault("changelog", {})[version] = (
            f"fine-tuned on local data from version {base.number} ({base.version})")
        meta.setdefault("pacsnode", {})["weights_sha256"] = sha
        meta_path.write_text(json.dumps(meta, indent=2) + "\n")
        record = {
            "version": version, "parent": base.number, "parent_version": base.version,
            "date": _now(), "data_manifest_sha256": prepared.store.manifest_hash(),
            "weights_sha256": sha, "metrics": comparison.as_dict(),
            "gate": list(comparison.decision.reasons),
            "training": {"best_epoch": result.best_epoch, "stopped_early": result.stopped_early,
                         "history": [e.__dict__ for e in result.history],
                         "config": prepared.settings.finetune.model_dump(mode="json"),
                         "device": prepared.device},
            "split": _split_counts(prepared)}
        added = registry.add(bundle, record, model_card(prepared.model.name, record))
    registry.set_active(added.number)
    return added


def _split_counts(prepared: Prepared) -> dict[str, int]:
    return {"train": len(prepared.train), "val": len(prepared.val), "test": len(prepared.test),
            "regression": len(prepared.regression)}


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Limit torch's CPU threads for the duration (0: leave torch's default)."""
    before = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_finetune(settings: Settings, name: str, *, rebuild_test_set: bool = False,
                 min_new_pairs: int = 0, progress: Progress | None = None) -> Outcome:
    """The whole loop for model ``name``; skipped when fewer than ``min_new_pairs`` new
    labelled pairs were found, or when the data cannot make a train and a test set."""
    with torch_threads(settings.finetune.threads):
        return _run(settings, name, rebuild_test_set=rebuild_test_set,
                    min_new_pairs=min_new_pairs, progress=progress)


def _run(settings: Settings, name: str, *, rebuild_test_set: bool, min_new_pairs: int,
         progress: Progress | None) -> Outcome:
    prepared = prepare(settings, name, rebuild_test_set=rebuild_test_set)
    base = prepared.base
    common: dict[str, Any] = {
        "model": name, "new_pairs": prepared.new_pairs, "refused": prepared.refused,
              "ignored_automatic": prepared.ignored_automatic,
              "split": _split_counts(prepared)}
    if prepared.new_pairs < min_new_pairs:
        return Outcome(status="skipped", reasons=(
            f"{prepared.new_pairs} new labelled pair(s), fewer than {min_new_pairs}",),
            active_version=base.number, active_version_name=base.version, **common)
    if not prepared.train or not prepared.test:
        return Outcome(status="skipped", reasons=(
            f"not enough patients for a train and a locked test set ({len(prepared.train)} "
            f"train, {len(prepared.test)} test pair(s))",),
            active_version=base.number, active_version_name=base.version, **common)
    network, result = train(prepared, progress=progress)
    comparison = compare(prepared, network)
    prepared.store.manifest["last_run_pairs"] = sorted(prepared.store.manifest["pairs"])
    prepared.store.save()
    metrics = {**comparison.as_dict(), "best_epoch": result.best_epoch,
               "history": [e.__dict__ for e in result.history]}
    if not comparison.decision.promote:
        log.info("model %s: candidate refused: %s", name, "; ".join(comparison.decision.reasons))
        return Outcome(status="kept", reasons=comparison.decision.reasons,
                       active_version=base.number, active_version_name=base.version,
                       metrics=metrics, **common)
    added = promote(prepared, result, comparison)
    log.info("model %s: version %d (%s) promoted: %s", name, added.number, added.version,
             "; ".join(comparison.decision.reasons))
    return Outcome(status="promoted", reasons=comparison.decision.reasons,
                   active_version=added.number, active_version_name=added.version,
                   metrics=metrics, **common)


def nightly(settings: Settings) -> tuple[Outcome, ...]:
    """Fine-tune every MONAI-bundle model that has at least ``[finetune] min_new_pairs``
    new labelled pairs. Safe to run twice: pairs already in the store are not new."""
    return tuple(run_finetune(settings, m.name, min_new_pairs=settings.finetune.min_new_pairs)
                 for m in settings.models if m.format == "monai_bundle")
