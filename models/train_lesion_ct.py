"""Train the reference CT lesion model and write it as a MONAI bundle (models/lesion_ct).

Synthetic phantoms from ``node.synth`` (spheres in soft tissue, known masks) are the only
training data; nothing is downloaded. The network sees the native voxel grid (no
resampling), HU clipped to a window and scaled to [0, 1], 64^3 patches. Retrain with::

    .venv/bin/python models/train_lesion_ct.py --epochs 18 --volumes 32 --seed 0 \
        --out models/lesion_ct

On a GPU, ``--time-limit S`` fits the number of steps to S seconds of training (measured
over the first steps), ``--workers N`` generates the phantoms in N processes, and
``--norm``/``--roi``/``--batch`` choose the variant.
"""

from __future__ import annotations

import argparse
import hashlib
import dataclasses
import datetime
import logging
import multiprocessing
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from monai.networks.nets import UNet
from pydicom.dataset import Dataset

from lesion_ct_bundle import write_bundle  # models/lesion_ct_bundle.py, beside this script
from node.synth import Lesion, SeriesSpec, SyntheticSeries, make_study

log = logging.getLogger("train_lesion_ct")

NAME = "pacsnode_lesion_ct"
VERSION = "1.1.0"
CHANGELOG = {
    "1.1.0": "retrained on a GPU: 160 phantoms, batch 8, 4,425 steps (was 32, 2, 1,800); "
             "fresh-phantom Dice 0.93-0.99 where 1.0.0 gave 0.73-0.98",
    "1.0.0": "first reference model, trained on synthetic phantoms",
}
WINDOW_HU = (-200.0, 300.0)
ROI_SIZE = (64, 64, 64)
OVERLAP = 0.25
SW_BATCH_SIZE = 4
BLEND_MODE = "gaussian"
NETWORK_ARGS: dict[str, object] = {
    "spatial_dims": 3, "in_channels": 1, "out_channels": 2,
    "channels": [4, 16, 32, 64, 128], "strides": [1, 2, 2, 2], "num_res_units": 0,
    "norm": "INSTANCE"}
# Training geometry: what the model was trained and validated on (see the model card).
PIXEL_SPACING_MM = (0.6, 1.2)
SLICE_THICKNESS_MM = (1.0, 4.0)
SLICES = (64, 96)
MATRIX = (160, 288)
LESION_RADIUS_MM = (4.0, 15.0)
CONTRAST_BRIGHT_HU = (40.0, 150.0)  # above soft tissue (40 HU)
CONTRAST_DARK_HU = (40.0, 120.0)    # below it; darker would look like fat (-100 HU)
TISSUE_HU = 40.0
SOFT_TISSUE_HU = (0.0, 100.0)  # smoothed HU accepted as tissue/organ when placing lesions
BATCH = 2
STEPS_PER_EPOCH = 100
VALIDATION_PHANTOMS = 4
GEOMETRY: dict[str, object] = {
    "pixel_spacing_mm": list(PIXEL_SPACING_MM), "slice_thickness_mm": list(SLICE_THICKNESS_MM),
    "slices": list(SLICES), "matrix": list(MATRIX), "lesion_radius_mm": list(LESION_RADIUS_MM),
    "contrast_bright_hu": list(CONTRAST_BRIGHT_HU), "contrast_dark_hu": list(CONTRAST_DARK_HU),
    "orientation": "axial"}


@dataclass(frozen=True)
class Variant:
    """What a training run may vary: normalisation, patch (= inference ROI) size, batch."""

    norm: str = "INSTANCE"
    roi: tuple[int, int, int] = ROI_SIZE
    batch: int = BATCH

    def network_args(self) -> dict[str, object]:
        return {**NETWORK_ARGS, "norm": self.norm}

    def model(self) -> dict[str, object]:
        """The bundle's description of the model (configs/metadata.json, inference.json)."""
        return {"name": NAME, "version": VERSION, "changelog": CHANGELOG,
                "network": self.network_args(),
                "target_spacing_mm": None, "window_hu": list(WINDOW_HU),
                "roi_size": list(self.roi), "overlap": OVERLAP,
                "sw_batch_size": SW_BATCH_SIZE, "blend_mode": BLEND_MODE,
                "geometry": GEOMETRY}


F32 = npt.NDArray[np.float32]
BoolArray = npt.NDArray[np.bool_]


@dataclass(frozen=True)
class Volume:
    """One phantom: windowed image in [0, 1] and lesion mask, both (slices, rows, columns)."""

    image: npt.NDArray[np.float16]
    mask: BoolArray
    lesion_voxels: npt.NDArray[np.int32]  # (n, 3) sample of lesion voxel indices


def hu_volume(datasets: tuple[Dataset, ...] | list[Dataset]) -> F32:
    """HU array (slices, rows, columns), slices sorted along the normal (PS3.3 C.7.6.2.1.1)."""
    def position(ds: Dataset) -> float:
        iop = np.array(ds.ImageOrientationPatient, dtype=float)
        return float(np.cross(iop[:3], iop[3:]) @ np.array(ds.ImagePositionPatient, dtype=float))

    ordered = sorted(datasets, key=position)
    return np.stack([ds.pixel_array.astype(np.float32) * np.float32(ds.RescaleSlope)
                     + np.float32(ds.RescaleIntercept) for ds in ordered])


def window(hu: F32) -> F32:
    lo, hi = WINDOW_HU
    return ((np.clip(hu, lo, hi) - lo) / (hi - lo)).astype(np.float32)


def dice(pred: BoolArray, truth: BoolArray) -> float:
    total = int(pred.sum()) + int(truth.sum())
    return 1.0 if total == 0 else 2.0 * int((pred & truth).sum()) / total


def random_spec(rng: np.random.Generator, seed: int) -> SeriesSpec:
    rows = int(rng.integers(MATRIX[0], MATRIX[1] + 1))
    columns = int(np.clip(rows + rng.integers(-32, 33), *MATRIX))
    return SeriesSpec(modality="CT", slices=int(rng.integers(SLICES[0], SLICES[1] + 1)),
                      rows=rows, columns=columns,
                      pixel_spacing_mm=round(float(rng.uniform(*PIXEL_SPACING_MM)), 3),
                      slice_thickness_mm=round(float(rng.uniform(*SLICE_THICKNESS_MM)), 3),
                      lesions=None, seed=seed)


def _surface_dirs(n: int = 64) -> F32:
    i = np.arange(n) + 0.5
    polar, azimuth = np.arccos(1 - 2 * i / n), np.pi * (1 + 5**0.5) * i
    return np.stack([np.cos(polar), np.sin(azimuth) * np.sin(polar),
                     np.cos(azimuth) * np.sin(polar)], axis=1).astype(np.float32)


def place_lesions(spec: SeriesSpec, rng: np.random.Generator) -> tuple[Lesion, ...]:
    """1-4 spheres of varied size and contrast, placed where the lesion-free phantom is soft
    tissue or organ (checked on a lightly smoothed render of the same grid)."""
    series = make_study(dataclasses.replace(spec, lesions=())).series[0]
    hu = torch.from_numpy(hu_volume(series.datasets))[None, None]
    smooth = torch.nn.functional.avg_pool3d(hu, 3, stride=1, padding=1,
                                            count_include_pad=False)[0, 0].numpy()
    ds0 = series.datasets[0]
    row_dir = np.array(ds0.ImageOrientationPatient[:3], dtype=float)
    col_dir = np.array(ds0.ImageOrientationPatient[3:], dtype=float)
    normal = np.cross(row_dir, col_dir)
    origin = np.array(ds0.ImagePositionPatient, dtype=float)
    ps, th = float(ds0.PixelSpacing[0]), float(ds0.SliceThickness)
    shape = np.array(smooth.shape)
    step = np.array([th, ps, ps])
    dirs = _surface_dirs()
    chosen: list[tuple[npt.NDArray[np.float64], float]] = []
    lesions: list[Lesion] = []
    for _ in range(int(rng.integers(1, 5))):
        for _try in range(300):
            r = float(rng.uniform(*LESION_RADIUS_MM))
            centre = rng.uniform(0, shape - 1)  # (slice, row, column) index
            pts = np.vstack([centre, centre + (r + 2.0) * dirs / step,
                             centre + 0.5 * r * dirs / step])
            idx = np.rint(pts).astype(int)
            if (idx < 0).any() or (idx >= shape).any():
                continue
            values = smooth[idx[:, 0], idx[:, 1], idx[:, 2]]
            if not ((values >= SOFT_TISSUE_HU[0]) & (values <= SOFT_TISSUE_HU[1])).all():
                continue
            mm = centre * step
            if any(np.linalg.norm(mm - c) <= r + cr + 2.0 for c, cr in chosen):
                continue
            chosen.append((mm, r))
            bright = rng.uniform() < 0.5
            contrast = float(rng.uniform(*(CONTRAST_BRIGHT_HU if bright else CONTRAST_DARK_HU)))
            x, y, z = (round(float(v), 3) for v in origin + centre[0] * th * normal
                       + centre[1] * ps * col_dir + centre[2] * ps * row_dir)
            hu_value = TISSUE_HU + (contrast if bright else -contrast)
            lesions.append(Lesion((x, y, z), round(r, 3), round(hu_value, 1)))
            break
    return tuple(lesions)


def make_series(seed: int, rng: np.random.Generator) -> SyntheticSeries:
    """A phantom for ``seed``: synth's own lesions for even seeds, placed ones for odd."""
    spec = random_spec(rng, seed)
    if seed % 2:
        spec = dataclasses.replace(spec, lesions=place_lesions(spec, rng) or None)
    return make_study(spec, seed=seed).series[0]


def make_volume(seed: int, base_seed: int) -> Volume:
    """The training phantom for ``seed``; its own random stream, so phantoms can be made
    in any order and in parallel."""
    rng = np.random.default_rng([base_seed, seed])
    series = make_series(seed, rng)
    mask = np.ascontiguousarray(series.present_mask())
    voxels = np.argwhere(mask).astype(np.int32)
    if len(voxels) > 4096:
        voxels = voxels[rng.choice(len(voxels), 4096, replace=False)]
    return Volume(window(hu_volume(series.datasets)).astype(np.float16), mask, voxels)


def make_volumes(seeds: range, base_seed: int, workers: int) -> list[Volume]:
    if workers <= 1:
        return [make_volume(s, base_seed) for s in seeds]
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        return pool.starmap(make_volume, [(s, base_seed) for s in seeds], chunksize=1)


def crop(vol: Volume, centre: npt.NDArray[np.int64],
         roi: tuple[int, int, int]) -> tuple[F32, BoolArray]:
    """A ``roi`` patch around ``centre``; outside the volume is 0 (as sliding window pads)."""
    size = np.array(roi)
    start = centre - size // 2
    img = np.zeros(roi, dtype=np.float32)
    lab = np.zeros(roi, dtype=np.bool_)
    lo = np.maximum(start, 0)
    hi = np.minimum(start + size, vol.mask.shape)
    src = tuple(slice(a, b) for a, b in zip(lo, hi))
    dst = tuple(slice(a - s, b - s) for a, b, s in zip(lo, hi, start))
    img[dst] = vol.image[src]
    lab[dst] = vol.mask[src]
    return img, lab


def sample_batch(volumes: list[Volume], rng: np.random.Generator,
                 variant: Variant) -> tuple[torch.Tensor, ...]:
    images, labels = [], []
    for _ in range(variant.batch):
        vol = volumes[int(rng.integers(len(volumes)))]
        shape = np.array(vol.mask.shape)
        if len(vol.lesion_voxels) and rng.uniform() < 0.6:
            centre = vol.lesion_voxels[int(rng.integers(len(vol.lesion_voxels)))].astype(np.int64)
            centre = centre + rng.integers(-20, 21, 3)
        else:
            centre = rng.integers(0, shape)
        img, lab = crop(vol, centre, variant.roi)
        for axis in range(3):
            if rng.uniform() < 0.5:
                img, lab = np.flip(img, axis), np.flip(lab, axis)
        if variant.roi[1] == variant.roi[2] and rng.uniform() < 0.5:  # swap rows, columns
            img, lab = img.transpose(0, 2, 1), lab.transpose(0, 2, 1)
        images.append(np.ascontiguousarray(img))
        labels.append(np.ascontiguousarray(lab))
    return (torch.from_numpy(np.stack(images))[:, None],
            torch.from_numpy(np.stack(labels).astype(np.uint8))[:, None])  # long on the device


def build_network(variant: Variant) -> UNet:
    return UNet(**variant.network_args())  # type: ignore[arg-type]  # JSON args for the bundle


def predict(net: torch.nn.Module, hu: F32, device: torch.device,
            roi: tuple[int, int, int]) -> BoolArray:
    """Lesion mask on the input's own grid: window, sliding window, argmax."""
    x = torch.from_numpy(window(hu))[None, None].to(device)
    net.eval()
    with torch.no_grad():
        logits = sliding_window_inference(x, roi, SW_BATCH_SIZE, net, overlap=OVERLAP,
                                          mode=BLEND_MODE)
    return np.asarray(logits.argmax(1)[0].cpu().numpy(), dtype=np.bool_)  # type: ignore[union-attr]


def _save_checkpoint(path: Path, *, epoch: int, net: torch.nn.Module,
                     opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LRScheduler,
                     rng: np.random.Generator, seconds: float) -> None:
    """Everything needed to resume after ``epoch`` (written atomically)."""
    tmp = path.with_suffix(".tmp")
    torch.save({"epoch": epoch, "net": net.state_dict(), "opt": opt.state_dict(),
                "sched": sched.state_dict(), "rng": rng.bit_generator.state,
                "seconds": seconds}, tmp)
    tmp.replace(path)


def _init_from(net: torch.nn.Module, path: Path) -> None:
    """Start from another model's weights: every tensor they share must match in shape;
    what only this network has (e.g. batch-norm parameters where the other used instance
    norm) keeps its fresh initial value."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    result = net.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise SystemExit(f"--init {path}: tensors this network lacks: {result.unexpected_keys}")
    log.info("initialised from %s (%d tensors new: %s)", path, len(result.missing_keys),
             ", ".join(sorted({k.rsplit(".", 1)[-1] for k in result.missing_keys})))


def _fit_epochs(seconds: float, step_seconds: float, steps_per_epoch: int) -> int:
    """Whole epochs that fit ``seconds`` at ``step_seconds`` a step (at least one)."""
    return max(1, int(seconds / (step_seconds * steps_per_epoch)))


def train(args: argparse.Namespace) -> None:
    if not 1 <= args.volumes <= 500:
        raise SystemExit(f"--volumes: expected 1..500, got {args.volumes}")
    if args.time_limit and args.checkpoint:
        raise SystemExit("--time-limit and --checkpoint: choose one (a resumed run keeps "
                         "the schedule it started with)")
    variant = Variant(norm=args.norm, roi=tuple(args.roi), batch=args.batch)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    rng = np.random.default_rng(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    train_seeds = range(1000 * (args.seed + 1), 1000 * (args.seed + 1) + args.volumes)
    val_seeds = range(train_seeds.start + 500, train_seeds.start + 500 + VALIDATION_PHANTOMS)
    started = time.monotonic()
    volumes = make_volumes(train_seeds, args.seed, args.workers)
    log.info("generated %d training phantoms in %.0f s", len(volumes), time.monotonic() - started)
    net = build_network(variant).to(device)
    if args.init:
        _init_from(net, Path(args.init))
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, batch=True)
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)

    def step(lr_scheduler: torch.optim.lr_scheduler.LRScheduler | None) -> float:
        x, y = (t.to(device) for t in sample_batch(volumes, rng, variant))
        opt.zero_grad()
        loss = loss_fn(net(x), y.long())
        loss.backward()
        opt.step()
        if lr_scheduler is not None:
            lr_scheduler.step()
        return float(loss.item())

    started = time.monotonic()  # training time from here (phantoms excluded)
    epochs, warmup_steps = args.epochs, 0
    if args.time_limit:
        # Fit the schedule to the time: a few steps at the schedule's starting rate, timed.
        for group in opt.param_groups:
            group["lr"] = args.lr / 25.0  # OneCycleLR's initial rate (div_factor 25)
        for _ in range(5):
            step(None)
        mark = time.monotonic()
        for _ in range(20):
            step(None)
        warmup_steps = 25
        per_step = (time.monotonic() - mark) / 20
        epochs = _fit_epochs(args.time_limit - (time.monotonic() - started), per_step,
                             args.steps_per_epoch)
        for group in opt.param_groups:
            group["lr"] = args.lr
        log.info("%.1f ms a step: %d epochs of %d steps fit %.0f s", per_step * 1000, epochs,
                 args.steps_per_epoch, args.time_limit)
    total = epochs * args.steps_per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=total,
                                                pct_start=0.05)
    first, spent = 0, 0.0
    if args.checkpoint and Path(args.checkpoint).exists():
        state = torch.load(args.checkpoint, map_location=device, weights_only=True)
        net.load_state_dict(state["net"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        rng.bit_generator.state = state["rng"]
        first, spent = int(state["epoch"]), float(state["seconds"])
        log.info("resumed from %s after epoch %d", args.checkpoint, first)
    started -= spent
    for epoch in range(first, epochs):
        net.train()
        losses = [step(sched) for _ in range(args.steps_per_epoch)]
        log.info("epoch %d/%d loss %.4f lr %.2e (%.0f s)", epoch + 1, epochs,
                 float(np.mean(losses)), sched.get_last_lr()[0], time.monotonic() - started)
        if args.checkpoint:
            _save_checkpoint(Path(args.checkpoint), epoch=epoch + 1, net=net, opt=opt,
                             sched=sched, rng=rng, seconds=time.monotonic() - started)
    train_time = time.monotonic() - started
    results = []
    for seed in val_seeds:
        series = make_series(seed, np.random.default_rng([args.seed, seed]))
        spec = series.spec
        pred = predict(net, hu_volume(series.datasets), device, variant.roi)
        score = dice(pred, series.present_mask())
        results.append({"seed": seed, "shape": list(pred.shape), "dice": round(score, 4),
                        "pixel_spacing_mm": spec.pixel_spacing_mm,
                        "slice_thickness_mm": spec.slice_thickness_mm,
                        "lesions": len(series.lesions)})
        log.info("validation seed %d shape %s dice %.4f", seed, pred.shape, score)
    device_name = (f"{device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda"
                   else str(device))
    write_bundle(Path(args.out), net.cpu().state_dict(), model=variant.model(), training={
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "seed": args.seed, "epochs": epochs, "steps": total + warmup_steps,
        "batch": variant.batch, "patch": list(variant.roi), "learning_rate": args.lr,
        "phantoms": args.volumes,
        "train_seed_range": [train_seeds.start, train_seeds.stop - 1],
        "validation_seed_range": [val_seeds.start, val_seeds.stop - 1],
        "train_time_s": round(train_time), "device": device_name,
        "time_limit_s": args.time_limit, "timed_warmup_steps": warmup_steps,
        "torch_threads": torch.get_num_threads(),
        "initialised_from": (f"{args.init} (sha256 "
                             f"{hashlib.sha256(Path(args.init).read_bytes()).hexdigest()})"
                             if args.init else None),
    }, validation=results)
    log.info("wrote %s (validation Dice %s)", args.out, [r["dice"] for r in results])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=18,
                        help="epochs of --steps-per-epoch steps of --batch patches")
    parser.add_argument("--steps-per-epoch", type=int, default=STEPS_PER_EPOCH)
    parser.add_argument("--batch", type=int, default=BATCH, help="patches per step")
    parser.add_argument("--roi", type=int, nargs=3, default=list(ROI_SIZE),
                        metavar=("SLICES", "ROWS", "COLUMNS"),
                        help="training patch, also the bundle's inference ROI")
    parser.add_argument("--norm", choices=("INSTANCE", "BATCH"), default="INSTANCE",
                        help="normalisation layers of the UNet")
    parser.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                        help="fit the number of epochs to this much training time "
                             "(replaces --epochs)")
    parser.add_argument("--workers", type=int, default=1,
                        help="processes generating the training phantoms")
    parser.add_argument("--volumes", type=int, default=32, help="training phantoms (<= 500)")
    parser.add_argument("--seed", type=int, default=0, help="seed for everything")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    parser.add_argument("--init", default=None,
                        help="model.pt to start from (e.g. the previous version's weights)")
    parser.add_argument("--checkpoint", default=None,
                        help="file to save after every epoch and to resume from if present")
    parser.add_argument("--out", default=str(Path(__file__).parent / "lesion_ct"),
                        help="bundle folder to write")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    train(args)


if __name__ == "__main__":
    main()
