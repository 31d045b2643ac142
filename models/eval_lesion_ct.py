"""Score lesion-model bundles on phantoms none of them trained or validated on.

Each bundle is loaded the way the node loads it (``network_def`` from configs/inference.json,
weights with ``weights_only=True``, ROI and window from configs/metadata.json). Phantoms:
``--fresh N`` random ones drawn like the training set (seeds from 800000), plus the fixed
phantoms of tests/unit/test_reference_model.py (the issue's Dice gate). Prints, per bundle,
Dice and mask-centroid offset for each phantom, then the mean and minimum::

    .venv/bin/python models/eval_lesion_ct.py models/lesion_ct other/bundle --fresh 12
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.bundle import ConfigParser
from monai.inferers import sliding_window_inference

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "models")]

from node.synth import SeriesSpec, SyntheticSeries, make_study  # noqa: E402
from train_lesion_ct import hu_volume, make_series  # noqa: E402

FRESH_SEED = 800_000


def gate_specs() -> list[SeriesSpec]:
    """The phantoms of the reference-model test, unwrapped from their pytest marks."""
    sys.path.insert(0, str(ROOT / "tests" / "unit"))
    import test_reference_model as gate  # noqa: PLC0415  (only this script needs it)

    return [getattr(p, "values", (p,))[0] for p in gate.FRESH]


def load(bundle: Path, device: torch.device) -> tuple[torch.nn.Module, dict[str, Any]]:
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(torch.load(bundle / "models" / "model.pt", map_location="cpu",
                                   weights_only=True))
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    return net.to(device).eval(), meta["pacsnode"]


def segment(net: torch.nn.Module, hu: np.ndarray, pn: dict[str, Any],
            device: torch.device) -> np.ndarray:
    lo, hi = pn["window_hu"]
    x = torch.from_numpy((np.clip(hu, lo, hi) - lo) / (hi - lo)).to(device)[None, None]
    with torch.no_grad():
        logits = sliding_window_inference(x, pn["roi_size"], pn["sw_batch_size"], net,
                                          overlap=pn["overlap"], mode=pn["blend_mode"])
    assert isinstance(logits, torch.Tensor)
    return np.asarray(logits.argmax(1)[0].cpu().numpy() == 1)


def score(pred: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    dice = 2.0 * float((pred & truth).sum()) / max(1.0, float(pred.sum() + truth.sum()))
    if not pred.any():
        return dice, float("inf")
    offset = np.argwhere(pred).mean(axis=0) - np.argwhere(truth).mean(axis=0)
    return dice, float(np.linalg.norm(offset))


def phantoms(fresh: int) -> list[tuple[str, SyntheticSeries]]:
    out = [(f"gate {spec.seed}", make_study(spec, seed=spec.seed).series[0])
           for spec in gate_specs()]
    for i in range(fresh):
        seed = FRESH_SEED + i
        out.append((f"fresh {seed}", make_series(seed, np.random.default_rng([7, seed]))))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundles", nargs="+", type=Path)
    parser.add_argument("--fresh", type=int, default=8, help="random fresh phantoms")
    parser.add_argument("--json", type=Path, default=None, help="also write the scores here")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cases = [(name, hu_volume(s.datasets), s.present_mask()) for name, s in phantoms(args.fresh)]
    report: dict[str, Any] = {}
    for bundle in args.bundles:
        net, pn = load(bundle, device)
        rows = {}
        for name, hu, truth in cases:
            dice, offset = score(segment(net, hu, pn, device), truth)
            rows[name] = {"dice": round(dice, 4), "centroid_offset_voxels": round(offset, 3)}
        dices = [r["dice"] for r in rows.values()]
        gate_ok = all(r["dice"] >= 0.9 and r["centroid_offset_voxels"] <= 1.0
                      for n, r in rows.items() if n.startswith("gate"))
        report[str(bundle)] = {"phantoms": rows, "mean_dice": round(float(np.mean(dices)), 4),
                               "min_dice": round(min(dices), 4), "gate_passed": gate_ok}
        print(f"\n{bundle}: mean Dice {np.mean(dices):.4f}, min {min(dices):.4f}, "
              f"gate {'passed' if gate_ok else 'failed'}")
        for name, r in rows.items():
            print(f"  {name:>14}: Dice {r['dice']:.4f}  centroid offset "
                  f"{r['centroid_offset_voxels']:.2f} voxels")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
