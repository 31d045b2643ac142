"""Compare models: Dice per label and HD95 on the locked test set and on
the regression set from the original domain; the promotion gate.

Both models segment through :func:`segment`, the runtime's own pre-processing (HU window,
native grid, sliding window with the bundle's ROI, overlap and blending, argmax).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import torch
from monai.inferers.utils import sliding_window_inference

from node.errors import ModelError
from node.finetune.store import Sample
from node.inference.runner import ModelInfo
from node.settings import FinetuneSettings


def segment(network: torch.nn.Module, image: npt.NDArray[np.float32], info: ModelInfo,
            device: str) -> npt.NDArray[np.uint8]:
    """Label map of ``image`` (HU, slice/row/column) on its own grid."""
    if info.target_spacing is not None:
        raise ModelError(f"model {info.name}: fine-tuning supports models that run on the "
                         f"native grid (target_spacing unset), got {info.target_spacing}")
    x = torch.from_numpy(np.array(image, dtype=np.float32))
    if info.window is not None:
        lo, hi = info.window
        x = (x.clamp(lo, hi) - lo) / (hi - lo)
    network.eval()
    with torch.inference_mode():
        scores = sliding_window_inference(x[None, None].to(device), info.roi_size, 4, network,
                                          overlap=info.overlap, mode=info.blend_mode)
        assert isinstance(scores, torch.Tensor)
        labels = scores.argmax(dim=1)[0]
    return np.asarray(labels.to("cpu", torch.uint8).numpy())


def dice(pred: npt.NDArray[np.bool_], truth: npt.NDArray[np.bool_]) -> float:
    total = int(pred.sum()) + int(truth.sum())
    return 1.0 if total == 0 else 2.0 * int((pred & truth).sum()) / total


def _surface(mask: torch.Tensor) -> torch.Tensor:
    """Voxels of ``mask`` with a 6-neighbour outside it (the edge MONAI measures from)."""
    padded = torch.nn.functional.pad(mask[None, None].float(), (1, 1, 1, 1, 1, 1))
    eroded = -torch.nn.functional.max_pool3d(-padded, 3, stride=1)[0, 0] > 0.5
    return mask & ~eroded


def hd95(pred: npt.NDArray[np.bool_], truth: npt.NDArray[np.bool_],
         spacing: Sequence[float]) -> float | None:
    """95th percentile Hausdorff distance in mm, as monai.metrics.compute_hausdorff_distance
    with percentile=95 defines it (the larger of the two directed 95th percentiles of
    surface-to-surface distances); None when exactly one side is empty. Computed here
    because MONAI's version needs scipy, which the node does not install."""
    if not pred.any() or not truth.any():
        return 0.0 if not pred.any() and not truth.any() else None
    scale = torch.tensor([float(s) for s in spacing], dtype=torch.float64)
    a = torch.nonzero(_surface(torch.from_numpy(pred))).double() * scale
    b = torch.nonzero(_surface(torch.from_numpy(truth))).double() * scale
    directed = []
    for x, y in ((a, b), (b, a)):
        nearest = torch.cat([torch.cdist(chunk, y).min(dim=1).values
                             for chunk in torch.split(x, 4096)])
        directed.append(float(torch.quantile(nearest, 0.95)))
    return max(directed)


@dataclass(frozen=True)
class Scores:
    """Per-label mean Dice and HD95 over a set of cases, and the per-case Dice."""

    dice: dict[int, float]
    hd95: dict[int, float | None]
    cases: dict[str, float] = field(default_factory=dict)

    @property
    def mean_dice(self) -> float:
        return float(np.mean(list(self.dice.values()))) if self.dice else 0.0

    def as_dict(self) -> dict[str, object]:
        return {"mean_dice": round(self.mean_dice, 4),
                "dice": {str(k): round(v, 4) for k, v in self.dice.items()},
                "hd95_mm": {str(k): None if v is None else round(v, 2)
                            for k, v in self.hd95.items()},
                "cases": {k: round(v, 4) for k, v in self.cases.items()}}


def score(network: torch.nn.Module, samples: Sequence[Sample], info: ModelInfo,
          device: str) -> Scores:
    values = [int(spec.value) for spec in info.labels] or [1]
    per_label: dict[int, list[float]] = {v: [] for v in values}
    per_hd: dict[int, list[float]] = {v: [] for v in values}
    cases = {}
    for sample in samples:
        pred = segment(network, sample.image, info, device)
        case = []
        for v in values:
            d = dice(pred == v, sample.labels == v)
            per_label[v].append(d)
            case.append(d)
            h = hd95(pred == v, sample.labels == v, sample.spacing)
            if h is not None:
                per_hd[v].append(h)
        cases[sample.pair_id] = float(np.mean(case))
    return Scores({v: float(np.mean(d)) if d else 0.0 for v, d in per_label.items()},
                  {v: float(np.mean(h)) if h else None for v, h in per_hd.items()}, cases)


@dataclass(frozen=True)
class Decision:
    promote: bool
    reasons: tuple[str, ...]


def gate(*, current_local: Scores, candidate_local: Scores, current_regression: Scores,
         candidate_regression: Scores, config: FinetuneSettings) -> Decision:
    """Promote only if the candidate beats the current model on the locked local test set by
    ``min_improvement`` (mean Dice) and loses at most ``regression_margin`` on the
    regression set."""
    reasons = []
    gain = candidate_local.mean_dice - current_local.mean_dice
    if gain < config.min_improvement:
        reasons.append(f"locked test set: candidate Dice {candidate_local.mean_dice:.4f} vs "
                       f"current {current_local.mean_dice:.4f} (gain {gain:+.4f}, needs at "
                       f"least +{config.min_improvement:.4f})")
    loss = current_regression.mean_dice - candidate_regression.mean_dice
    if loss > config.regression_margin:
        reasons.append(f"regression set: candidate Dice {candidate_regression.mean_dice:.4f} "
                       f"vs current {current_regression.mean_dice:.4f} (loss {loss:.4f}, "
                       f"margin {config.regression_margin:.4f})")
    if reasons:
        return Decision(False, tuple(reasons))
    return Decision(True, (f"locked test set Dice {current_local.mean_dice:.4f} -> "
                           f"{candidate_local.mean_dice:.4f}; regression set "
                           f"{current_regression.mean_dice:.4f} -> "
                           f"{candidate_regression.mean_dice:.4f}",))
