"""Model runners on a tiny bundle made here (random weights): loading, geometry of the
output, TorchScript, missing files, the out-of-memory policy, resident models."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from monai.networks.nets import UNet

from node import synth
from node.errors import ModelError
from node.inference.runner import ModelPool, TorchRunner, read_info
from node.inference.volume import Volume, volume_from_datasets
from node.settings import ModelSettings

NET_ARGS = {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "channels": [4, 8],
            "strides": [2], "num_res_units": 0}
LESION = {"name": "lesion",
          "category": {"value": "49755003", "scheme": "SCT",
                       "meaning": "Morphologically abnormal structure"},
          "type": {"value": "52988006", "scheme": "SCT", "meaning": "Lesion"}}


def make_bundle(root: Path, *, spacing: list[float] | None = None) -> Path:
    (root / "configs").mkdir(parents=True)
    (root / "models").mkdir()
    (root / "configs" / "metadata.json").write_text(json.dumps({
        "version": "1.0.0", "name": "tiny",
        "pacsnode": {"window": [-200, 300], "roi_size": [16, 16, 16], "overlap": 0.25,
                     "target_spacing": spacing, "labels": {"1": LESION}}}))
    (root / "configs" / "inference.json").write_text(json.dumps({
        "network_def": {"_target_": "monai.networks.nets.UNet", **NET_ARGS}}))
    torch.manual_seed(0)
    torch.save(UNet(**NET_ARGS).state_dict(), root / "models" / "model.pt")  # type: ignore[arg-type]
    return root


@pytest.fixture(scope="module")
def volume() -> Volume:
    spec = synth.SeriesSpec(slices=12, rows=24, columns=20, slice_thickness_mm=2.0)
    return volume_from_datasets(synth.make_study(spec, seed=3).series[0].datasets)


def test_bundle_runs_and_mask_matches_the_source_grid(tmp_path: Path, volume: Volume) -> None:
    bundle = make_bundle(tmp_path / "b")
    runner = TorchRunner(ModelSettings(name="tiny", path=bundle, device="cpu"))
    assert not runner.loaded
    prediction = runner.predict(volume)
    assert runner.loaded
    assert prediction.labels.shape == volume.array.shape
    assert prediction.labels.dtype == np.uint8
    assert set(np.unique(prediction.labels)) <= {0, 1}
    weights = (bundle / "models" / "model.pt").read_bytes()
    assert prediction.weights_sha256 == hashlib.sha256(weights).hexdigest()
    assert (prediction.model, prediction.version, prediction.device) == ("tiny", "1.0.0", "cpu")
    info = read_info(runner.settings)
    assert info.labels[0].type == ("52988006", "SCT", "Lesion")


def test_resampling_to_the_model_spacing_returns_to_the_source_grid(
        tmp_path: Path, volume: Volume) -> None:
    bundle = make_bundle(tmp_path / "b", spacing=[3.0, 1.5, 1.5])
    prediction = TorchRunner(ModelSettings(name="t", path=bundle)).predict(volume)
    assert prediction.labels.shape == volume.array.shape


def test_torchscript_model(tmp_path: Path, volume: Volume) -> None:
    torch.manual_seed(0)
    scripted = torch.jit.script(UNet(**NET_ARGS))  # type: ignore[arg-type]
    path = tmp_path / "net.ts"
    scripted.save(str(path))
    runner = TorchRunner(ModelSettings(name="ts", path=path, format="torchscript",
                                       window=(-200, 300), roi_size=(16, 16, 16)))
    assert runner.predict(volume).labels.shape == volume.array.shape


def test_missing_weights_are_named_and_never_downloaded(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b")
    (bundle / "models" / "model.pt").unlink()
    with pytest.raises(ModelError, match=r"model\.pt is missing; pacsnode never downloads"):
        TorchRunner(ModelSettings(name="x", path=bundle))
    with pytest.raises(ModelError, match="metadata.json is missing"):
        TorchRunner(ModelSettings(name="x", path=tmp_path))


def test_weights_that_do_not_fit_the_network(tmp_path: Path, volume: Volume) -> None:
    bundle = make_bundle(tmp_path / "b")
    torch.save({"nonsense": torch.zeros(1)}, bundle / "models" / "model.pt")
    with pytest.raises(ModelError, match="does not fit the network"):
        TorchRunner(ModelSettings(name="x", path=bundle)).predict(volume)


def test_out_of_memory_halves_the_batch_then_falls_back_to_cpu(
        tmp_path: Path, volume: Volume) -> None:
    runner = TorchRunner(ModelSettings(name="x", path=make_bundle(tmp_path / "b"),
                                       sw_batch_size=4))
    runner.load()
    runner.device = "cuda"                       # pretend: this host has no GPU
    tries: list[tuple[str, int]] = []
    real = TorchRunner._infer

    def infer(self: TorchRunner, vol: Volume, device: str, batch: int) -> Any:  # noqa: ANN401
        tries.append((device, batch))
        if device == "cuda":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        self.device = "cpu"
        return real(self, vol, device, batch)

    runner._infer = infer.__get__(runner)  # type: ignore[method-assign]
    prediction = runner.predict(volume)
    assert tries == [("cuda", 4), ("cuda", 2), ("cuda", 1), ("cpu", 1)]
    assert prediction.device == "cpu" and prediction.labels.shape == volume.array.shape


def test_out_of_memory_on_the_cpu_fails_the_job_with_the_reason(
        tmp_path: Path, volume: Volume) -> None:
    runner = TorchRunner(ModelSettings(name="x", path=make_bundle(tmp_path / "b")))

    def infer(*_: Any) -> Any:
        raise torch.cuda.OutOfMemoryError("simulated")

    runner._infer = infer  # type: ignore[method-assign]
    with pytest.raises(ModelError, match="out of memory on the CPU"):
        runner.predict(volume)


def test_pool_loads_each_model_once(tmp_path: Path, volume: Volume,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    bundle = make_bundle(tmp_path / "b")
    pool = ModelPool({"tiny": ModelSettings(name="tiny", path=bundle)})
    builds = []
    real = TorchRunner._build

    def counting(self: TorchRunner) -> torch.nn.Module:
        builds.append(self.info.name)
        return real(self)

    monkeypatch.setattr(TorchRunner, "_build", counting)
    assert pool.loaded() == {"tiny": False}
    pool.predict("tiny", volume)
    pool.predict("tiny", volume)
    assert builds == ["tiny"] and pool.loaded() == {"tiny": True}
    with pytest.raises(ModelError, match="no model named 'other'"):
        pool.predict("other", volume)


def test_unknown_plugin_runner(tmp_path: Path) -> None:
    pool = ModelPool({"p": ModelSettings(name="p", path=tmp_path, format="plugin",
                                         plugin="nope")})
    with pytest.raises(ModelError, match="no entry point 'nope' in group 'pacsnode.runners'"):
        pool.runner("p")


class ThresholdRunner:
    """A custom runner as a third party would ship it (entry point "pacsnode.runners")."""

    def __init__(self, settings: ModelSettings) -> None:
        from node.inference.runner import ModelInfo
        self.settings = settings
        self.info = ModelInfo(name=settings.name, version="0.1", format="plugin",
                              path=settings.path, weights=settings.path,
                              weights_sha256="-", device="cpu", window=None,
                              target_spacing=None, roi_size=(1, 1, 1), overlap=0.0, labels=())
        self.loads = 0

    @property
    def loaded(self) -> bool:
        return self.loads > 0

    def load(self) -> None:
        self.loads += 1

    def predict(self, volume: Volume) -> Any:
        from node.inference.runner import Prediction
        return Prediction((volume.array > 100).astype(np.uint8), self.info.name, "0.1", "-",
                          "cpu", 0.0, 1)


def test_plugin_runner_from_an_entry_point(tmp_path: Path, volume: Volume,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    dist = tmp_path / "site" / "pacsnode_threshold-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: pacsnode-threshold\n"
                                   "Version: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[pacsnode.runners]\nthreshold = tests.unit.test_runner:ThresholdRunner\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    pool = ModelPool({"thr": ModelSettings(name="thr", path=tmp_path, format="plugin",
                                           plugin="threshold")})
    prediction = pool.predict("thr", volume)
    assert isinstance(pool.runner("thr"), ThresholdRunner)
    assert prediction.labels.shape == volume.array.shape
    assert prediction.labels.sum() == (volume.array > 100).sum()


def test_fractional_models_return_probabilities_consistent_with_labels(
        tmp_path: Path, volume: Volume) -> None:
    runner = TorchRunner(ModelSettings(name="f", path=make_bundle(tmp_path / "b"),
                                       seg_type="fractional"))
    prediction = runner.predict(volume)
    assert prediction.probabilities is not None
    assert prediction.probabilities.shape == (1, *volume.array.shape)
    probs = prediction.probabilities[0].astype(np.float32)
    assert probs.min() >= 0 and probs.max() <= 1
    assert ((probs > 0.5) == (prediction.labels == 1)).mean() > 0.999   # two classes: argmax
    assert TorchRunner(ModelSettings(name="b", path=tmp_path / "b")).predict(volume) \
        .probabilities is None
