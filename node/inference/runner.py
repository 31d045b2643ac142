"""Model runners: a MONAI bundle or a TorchScript file, loaded once and kept resident.

Inference is split as MONAI Deploy does: pre-process (intensity window, optional
resampling to the model's spacing), predict (sliding window, mixed precision on CUDA),
post-process (class scores resampled back to the source grid, then argmax), so the mask
matches the source slices voxel for voxel. Nothing is ever downloaded: a bundle whose
weights are not on disk is an error naming the missing file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812  (the usual name)

from node.errors import ModelError
from node.inference.sliding import Window, stream_labels, streamable, whole_labels
from node.inference.volume import Volume
from node.settings import ModelSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LabelSpec:
    """One output class and its coded concepts for DICOM SEG (PS3.3 C.8.20.2)."""

    value: int
    name: str
    category: tuple[str, str, str]     # (code value, scheme, meaning)
    type: tuple[str, str, str]


@dataclass(frozen=True)
class ClassSpec:
    """One output of a classifier (index = position in the network's output) and the
    coded finding the SR reports for it."""

    index: int
    name: str
    finding: tuple[str, str, str]      # (code value, scheme, meaning)


@dataclass(frozen=True)
class ModelInfo:
    name: str
    version: str
    format: str
    path: Path
    weights: Path
    weights_sha256: str
    device: str
    window: tuple[float, float] | None
    target_spacing: tuple[float, float, float] | None
    roi_size: tuple[int, int, int]
    overlap: float
    labels: tuple[LabelSpec, ...]
    blend_mode: str = "constant"
    classes: tuple[ClassSpec, ...] = ()        # a classifier's outputs; () if none
    input_size: tuple[int, int, int] | None = None   # classifier input grid


@dataclass(frozen=True, eq=False)
class Prediction:
    labels: np.ndarray | None           # uint8, the source volume's shape; None: classifier
    model: str
    version: str
    weights_sha256: str
    device: str
    seconds: float
    sw_batch_size: int
    probabilities: np.ndarray | None = None   # float16 (label 1..N, slices, rows, cols)
    class_probabilities: tuple[float, ...] | None = None   # one per ModelInfo.classes


class Runner(Protocol):
    """What a custom runner (entry point group "pacsnode.runners") provides: a class
    taking the model's ModelSettings."""

    info: ModelInfo

    @property
    def loaded(self) -> bool: ...

    def load(self) -> None: ...

    def predict(self, volume: Volume) -> Prediction: ...


RUNNER_GROUP = "pacsnode.runners"


def make_runner(settings: ModelSettings) -> Runner:
    if settings.format != "plugin":
        return TorchRunner(settings)
    from importlib.metadata import entry_points

    found = entry_points(group=RUNNER_GROUP, name=str(settings.plugin))
    if not found:
        raise ModelError(f"model {settings.name}: no entry point {settings.plugin!r} in group "
                         f"{RUNNER_GROUP!r} (is its package installed?)")
    factory = next(iter(found)).load()
    runner: Runner = factory(settings)
    return runner


def pick_device(wanted: str) -> str:
    if wanted == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if wanted.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"device {wanted} requested but CUDA is not available on this host")
    return wanted


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _code(entry: Any, where: str) -> tuple[str, str, str]:
    try:
        return (str(entry["value"]), str(entry["scheme"]), str(entry["meaning"]))
    except (KeyError, TypeError):
        raise ModelError(f"{where}: expected {{value, scheme, meaning}}, got {entry!r}") from None


def read_info(settings: ModelSettings) -> ModelInfo:
    """Resolve a model's settings against its bundle metadata; check every file exists."""
    root = settings.path
    meta_path = root / "configs" / "metadata.json"
    if settings.format == "torchscript" and root.is_file():
        meta: dict[str, Any] = {}
        weights = root
    else:
        if not meta_path.is_file():
            raise ModelError(f"model {settings.name}: {meta_path} is missing (not a MONAI "
                             f"bundle folder?)")
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError) as exc:
            raise ModelError(f"model {settings.name}: cannot read {meta_path}: {exc}") from exc
        weights = root / "models" / ("model.ts" if settings.format == "torchscript"
                                     else "model.pt")
    if not weights.is_file():
        raise ModelError(f"model {settings.name}: weights file {weights} is missing; pacsnode "
                         f"never downloads weights, put the file there")
    extra = meta.get("pacsnode", {})
    labels = _labels(extra, meta_path)
    classes = _classes(settings, extra, meta_path)
    raw_input = settings.input_size or extra.get("input_size")
    window = settings.window or _pair(extra.get("window", extra.get("window_hu")))
    spacing = settings.target_spacing or _triple(
        extra.get("target_spacing", extra.get("target_spacing_mm")))
    raw_roi = extra.get("roi_size", (64, 64, 64))
    roi = settings.roi_size or (int(raw_roi[0]), int(raw_roi[1]), int(raw_roi[2]))
    return ModelInfo(
        name=settings.name, version=settings.version or str(meta.get("version", "0")),
        format=settings.format, path=root, weights=weights, weights_sha256=_sha256(weights),
        device=settings.device, window=window, target_spacing=spacing, roi_size=roi,
        overlap=settings.overlap if settings.overlap is not None
        else float(extra.get("overlap", 0.25)),
        labels=tuple(labels),
        blend_mode=str(extra.get("blend_mode", "constant")),
        classes=tuple(classes),
        input_size=(int(raw_input[0]), int(raw_input[1]), int(raw_input[2]))
        if raw_input else None,
    )


def _classes(settings: ModelSettings, extra: dict[str, Any], meta_path: Path,
             ) -> list[ClassSpec]:
    """A classifier's outputs: the model settings' ``classes``, else the "pacsnode"
    section's "classes" list [{name, finding: {value, scheme, meaning}}], in output order."""
    if settings.classes:
        return [ClassSpec(i, c.name, (c.finding.value, c.finding.scheme, c.finding.meaning))
                for i, c in enumerate(settings.classes)]
    raw = extra.get("classes", [])
    if not isinstance(raw, list):
        raise ModelError(f"{meta_path}: pacsnode.classes: expected a list of {{name, finding}} "
                         f"in the network's output order, got {raw!r}")
    out = []
    for i, entry in enumerate(raw):
        where = f"{meta_path}: pacsnode.classes[{i}]"
        if not isinstance(entry, dict) or not entry.get("name"):
            raise ModelError(f"{where}: expected {{name, finding}}, got {entry!r}")
        out.append(ClassSpec(i, str(entry["name"]), _code(entry.get("finding"),
                                                          where + ".finding")))
    return out


def _pair(value: Any) -> tuple[float, float] | None:
    return (float(value[0]), float(value[1])) if value else None


def _triple(value: Any) -> tuple[float, float, float] | None:
    return (float(value[0]), float(value[1]), float(value[2])) if value else None


def _labels(extra: dict[str, Any], meta_path: Path) -> list[LabelSpec]:
    """Labels from the "pacsnode" section: either "labels" {value: {name, category, type}}
    with {value, scheme, meaning} codes, or "segments" with DICOM-style code items."""
    out = []
    for value, entry in sorted(extra.get("labels", {}).items(), key=lambda kv: int(kv[0])):
        where = f"{meta_path}: pacsnode.labels.{value}"
        out.append(LabelSpec(int(value), str(entry.get("name", f"label {value}")),
                             _code(entry.get("category"), where + ".category"),
                             _code(entry.get("type"), where + ".type")))
    for value, entry in sorted(extra.get("segments", {}).items(), key=lambda kv: int(kv[0])):
        where = f"{meta_path}: pacsnode.segments.{value}"
        out.append(LabelSpec(
            int(value), str(entry.get("segment_label", f"label {value}")),
            _dicom_code(entry.get("segmented_property_category"), where),
            _dicom_code(entry.get("segmented_property_type"), where)))
    return out


def _dicom_code(entry: Any, where: str) -> tuple[str, str, str]:
    try:
        return (str(entry["CodeValue"]), str(entry["CodingSchemeDesignator"]),
                str(entry["CodeMeaning"]))
    except (KeyError, TypeError):
        raise ModelError(f"{where}: expected CodeValue, CodingSchemeDesignator, CodeMeaning; "
                         f"got {entry!r}") from None


def build_network(info: ModelInfo, fmt: str = "monai_bundle") -> torch.nn.Module:
    """The model's network with its weights, on the CPU (TorchScript file or bundle)."""
    weights = info.weights
    if weights.suffix == ".ts" or fmt == "torchscript":
        scripted: torch.nn.Module = torch.jit.load(  # type: ignore[no-untyped-call]  # torch stub
            str(weights), map_location="cpu")
        return scripted
    from monai.bundle.config_parser import ConfigParser

    config = info.path / "configs" / "inference.json"
    if not config.is_file():
        raise ModelError(f"model {info.name}: {config} is missing")
    parser = ConfigParser()
    parser.read_config(str(config))
    try:
        network = parser.get_parsed_content("network_def")
    except Exception as exc:  # noqa: BLE001  ConfigParser raises many kinds
        raise ModelError(f"model {info.name}: cannot build network_def from "
                         f"{config}: {exc}") from exc
    state = torch.load(weights, map_location="cpu", weights_only=True)
    try:
        network.load_state_dict(state)
    except RuntimeError as exc:
        raise ModelError(f"model {info.name}: {weights} does not fit the network "
                         f"of {config}: {exc}") from exc
    if not isinstance(network, torch.nn.Module):
        raise ModelError(f"model {info.name}: network_def is not a torch module")
    return network


class TorchRunner:
    """A MONAI bundle (network_def + model.pt, or model.ts) or a TorchScript file."""

    def __init__(self, settings: ModelSettings) -> None:
        self.settings = settings
        self.info = read_info(settings)
        if self.info.classes and self.info.labels:
            raise ModelError(f"model {settings.name}: declares both labels and classes; a "
                             f"TorchScript or bundle network gives one output, so a model "
                             f"that segments and classifies needs a plugin runner")
        self.device = pick_device(settings.device)
        self._network: torch.nn.Module | None = None
        self._lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        return self._network is not None

    def load(self) -> None:
        with self._lock:
            if self._network is None:
                start = time.monotonic()
                self._network = self._build().to(self.device).eval()
                log.info("model %s %s loaded on %s in %.2f s", self.info.name,
                         self.info.version, self.device, time.monotonic() - start)

    def _build(self) -> torch.nn.Module:
        return build_network(self.info, self.settings.format)

    def predict(self, volume: Volume) -> Prediction:
        self.load()
        start = time.monotonic()
        if self.info.classes:
            classes = self._classify(volume)
            return Prediction(None, self.info.name, self.info.version,
                              self.info.weights_sha256, self.device,
                              time.monotonic() - start, 1, class_probabilities=classes)
        batch = self.settings.sw_batch_size
        device = self.device
        while True:
            try:
                labels, probabilities = self._infer(volume, device, batch)
                break
            except torch.cuda.OutOfMemoryError:
                if device == "cpu":
                    raise ModelError(f"model {self.info.name}: out of memory on the CPU") \
                        from None
                torch.cuda.empty_cache()
                if batch > 1:
                    batch = max(1, batch // 2)
                    log.warning("model %s: CUDA out of memory; retrying with sliding-window "
                                "batch %d", self.info.name, batch)
                else:
                    log.warning("model %s: CUDA out of memory at batch 1; retrying on the "
                                "CPU", self.info.name)
                    device = "cpu"
        return Prediction(labels, self.info.name, self.info.version, self.info.weights_sha256,
                          device, time.monotonic() - start, batch, probabilities)

    def _prepare(self, volume: Volume) -> torch.Tensor:
        image = torch.from_numpy(np.array(volume.array, dtype=np.float32))  # a writable copy
        if self.info.window is not None:
            lo, hi = self.info.window
            image.clamp_(lo, hi).sub_(lo).div_(hi - lo)         # in place: no second copy
        return image[None, None]

    def _classify(self, volume: Volume) -> tuple[float, ...]:
        """The whole volume (resized to ``input_size`` when declared) through the network;
        its output, shape (1, classes), is read as logits."""
        network = self._network
        assert network is not None
        image = self._prepare(volume)
        if self.info.input_size is not None:
            image = F.interpolate(image, size=list(self.info.input_size), mode="trilinear",
                                  align_corners=False)
        with torch.inference_mode():
            logits = network(image.to(self.device))
        wanted = (1, len(self.info.classes))
        if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != wanted:
            shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits)
            raise ModelError(f"model {self.info.name}: a classifier must return logits of "
                             f"shape {wanted} (one per declared class), got {shape}")
        probabilities = torch.softmax(logits.float(), dim=1)[0].to("cpu")
        return tuple(float(p) for p in probabilities)

    def _infer(self, volume: Volume, device: str,
               sw_batch_size: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Labels (and float16 probabilities for fractional SEG) on the source grid. The
        sliding window streams along the slice axis (node/inference/sliding.py), so memory
        beyond the volume and the label map stays flat; a model that resamples to its own
        spacing, or a volume smaller than the window, takes the whole-volume pass."""
        network = self._network
        assert network is not None
        if device != self.device:
            network = network.to(device)
        window = Window(self.info.roi_size, self.info.overlap, self.info.blend_mode,
                        sw_batch_size, device,
                        amp=device.startswith("cuda") and self.settings.mixed_precision,
                        intensity=self.info.window,
                        fractional=self.settings.seg_type == "fractional")
        shape = volume.array.shape
        size = None
        if self.info.target_spacing is not None:
            size = [max(1, round(n * s / t)) for n, s, t in
                    zip(shape, volume.spacing, self.info.target_spacing, strict=True)]
        try:
            with torch.inference_mode():
                if size is None and streamable(shape, self.info.roi_size):
                    return stream_labels(volume.array, network, window)
                return whole_labels(volume.array, network, window, size=size)
        finally:
            if device != self.device:
                network.to(self.device)


class ModelPool:
    """Every configured model, each loaded on first use and then kept resident."""

    def __init__(self, models: dict[str, ModelSettings]) -> None:
        self._settings = dict(models)
        self._runners: dict[str, Runner] = {}
        self._gates: dict[str, threading.Semaphore] = {}
        self._lock = threading.Lock()
        self.seconds: dict[str, float] = {}
        self.runs: dict[str, int] = {}

    def runner(self, name: str) -> Runner:
        with self._lock:
            if name not in self._runners:
                if name not in self._settings:
                    raise ModelError(f"no model named {name!r}; configured: "
                                     f"{sorted(self._settings)}")
                settings = self._settings[name]
                self._runners[name] = make_runner(settings)
                self._gates[name] = threading.Semaphore(settings.max_concurrency)
            return self._runners[name]

    def update(self, models: dict[str, ModelSettings]) -> list[str]:
        """Take new settings (e.g. a newly promoted model version); a model whose settings
        changed is reloaded on next use. Returns the names of those models."""
        with self._lock:
            changed = [n for n, m in models.items() if self._settings.get(n) != m]
            for name in changed:
                self._runners.pop(name, None)
            self._settings = dict(models)
        return changed

    def predict(self, name: str, volume: Volume) -> Prediction:
        runner = self.runner(name)
        with self._gates[name]:
            prediction = runner.predict(volume)
        with self._lock:
            self.seconds[name] = self.seconds.get(name, 0.0) + prediction.seconds
            self.runs[name] = self.runs.get(name, 0) + 1
        return prediction

    def loaded(self) -> dict[str, bool]:
        with self._lock:
            return {name: name in self._runners and self._runners[name].loaded
                    for name in self._settings}
