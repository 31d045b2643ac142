"""Fine-tune a bundle's network on local samples: patches, Dice + cross-entropy, Adam,
cosine learning-rate decay, early stopping on validation Dice, best weights kept.

Training starts from the current model's weights; ``trainable = "all"`` (default) updates
every layer, ``"head"`` only the last two parameter tensors. Augmentation: random flips,
row/column swap and a small intensity scale and shift in HU.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
from monai.losses.dice import DiceCELoss

from node.finetune.evaluate import score
from node.finetune.store import Sample
from node.inference.runner import ModelInfo
from node.settings import FinetuneSettings

log = logging.getLogger(__name__)

Progress = Callable[[int, int, str], None]   # (done, total, text)


@dataclass(frozen=True)
class EpochLog:
    epoch: int
    loss: float
    val_dice: float | None
    seconds: float


@dataclass(frozen=True, eq=False)
class TrainResult:
    state_dict: dict[str, torch.Tensor]
    history: tuple[EpochLog, ...]
    best_epoch: int
    stopped_early: bool


def _window(image: npt.NDArray[np.float32], info: ModelInfo) -> npt.NDArray[np.float32]:
    if info.window is None:
        return image
    lo, hi = info.window
    return ((np.clip(image, lo, hi) - lo) / (hi - lo)).astype(np.float32)


def _patch(sample: Sample, size: tuple[int, int, int], rng: np.random.Generator,
           config: FinetuneSettings, info: ModelInfo) -> tuple[npt.NDArray[np.float32],
                                                               npt.NDArray[np.int64]]:
    """A patch (zero-padded at the edges), centred on a labelled voxel 60 % of the time."""
    shape = np.array(sample.labels.shape)
    fg = np.argwhere(sample.labels > 0)
    if len(fg) and rng.uniform() < 0.6:
        centre = fg[int(rng.integers(len(fg)))] + rng.integers(-8, 9, 3)
    else:
        centre = rng.integers(0, shape)
    start = centre - np.array(size) // 2
    lo, hi = np.maximum(start, 0), np.minimum(start + np.array(size), shape)
    image = np.full(size, info.window[0] if info.window else 0.0, dtype=np.float32)
    labels = np.zeros(size, dtype=np.int64)
    src = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    dst = tuple(slice(a - s, b - s) for a, b, s in zip(lo, hi, start, strict=True))
    image[dst], labels[dst] = sample.image[src], sample.labels[src]
    if config.augment:
        image = image * np.float32(rng.uniform(0.95, 1.05)) + np.float32(rng.uniform(-15, 15))
        for axis in range(3):
            if rng.uniform() < 0.5:
                image, labels = np.flip(image, axis), np.flip(labels, axis)
        if size[1] == size[2] and rng.uniform() < 0.5:
            image, labels = image.transpose(0, 2, 1), labels.transpose(0, 2, 1)
    return _window(np.ascontiguousarray(image), info), np.ascontiguousarray(labels)


def _trainable(network: torch.nn.Module, mode: str) -> list[torch.nn.Parameter]:
    params = list(network.parameters())
    if mode == "all":
        return params
    for p in params[:-2]:
        p.requires_grad_(False)
    return params[-2:]


def train_candidate(network: torch.nn.Module, info: ModelInfo, train: Sequence[Sample],
                    val: Sequence[Sample], config: FinetuneSettings, *, device: str,
                    progress: Progress | None = None) -> TrainResult:
    """Fine-tune ``network`` (changed in place) and return the best weights by validation
    Dice (the last weights when there is no validation set)."""
    if not train:
        raise ValueError("train_candidate: no training samples")
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    network.to(device)
    params = _trainable(network, config.trainable)
    opt = torch.optim.Adam(params, lr=config.learning_rate)
    total = config.epochs * config.steps_per_epoch
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, batch=True)
    size = config.patch_size
    history: list[EpochLog] = []
    best, best_epoch, since = -1.0, 0, 0
    best_state = copy.deepcopy(network.state_dict())
    stopped = False
    for epoch in range(1, config.epochs + 1):
        started = time.monotonic()
        network.train()
        losses = []
        for step in range(config.steps_per_epoch):
            batch = [_patch(train[int(rng.integers(len(train)))], size, rng, config, info)
                     for _ in range(config.batch_size)]
            x = torch.from_numpy(np.stack([b[0] for b in batch]))[:, None].to(device)
            y = torch.from_numpy(np.stack([b[1] for b in batch]))[:, None].to(device)
            opt.zero_grad()
            loss = loss_fn(network(x), y)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.item()))
            if progress is not None:
                done = (epoch - 1) * config.steps_per_epoch + step + 1
                progress(done, total, f"epoch {epoch}/{config.epochs} loss {losses[-1]:.3f}")
        val_dice = score(network, val, info, device).mean_dice if val else None
        entry = EpochLog(epoch, float(np.mean(losses)), val_dice, time.monotonic() - started)
        history.append(entry)
        log.info("fine-tune epoch %d/%d: loss %.4f, validation Dice %s (%.1f s)", epoch,
                 config.epochs, entry.loss, "-" if val_dice is None else f"{val_dice:.4f}",
                 entry.seconds)
        current = val_dice if val_dice is not None else -entry.loss
        if current > best:
            best, best_epoch, since = current, epoch, 0
            best_state = copy.deepcopy(network.state_dict())
        else:
            since += 1
            if since >= config.patience:
                stopped = True
                log.info("early stop after epoch %d: no better validation Dice for %d "
                         "epoch(s); best epoch %d", epoch, since, best_epoch)
                break
    network.load_state_dict(best_state)
    cpu_state = {k: v.detach().to("cpu") for k, v in best_state.items()}
    return TrainResult(cpu_state, tuple(history), best_epoch, stopped)
