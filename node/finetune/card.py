"""MODEL_CARD.md for a fine-tuned version, generated from its version record."""

from __future__ import annotations

from typing import Any


def _row(name: str, cur: dict[str, Any], cand: dict[str, Any]) -> str:
    hd = cur["hd95_mm"], cand["hd95_mm"]
    return (f"| {name} | {cur['mean_dice']:.4f} | {cand['mean_dice']:.4f} | "
            f"{', '.join(f'{k}: {v}' for k, v in hd[0].items())} | "
            f"{', '.join(f'{k}: {v}' for k, v in hd[1].items())} |")


def _pair(entry: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    return entry["current"], entry["candidate"]


def model_card(name: str, record: dict[str, Any]) -> str:
    metrics, training = record["metrics"], record["training"]
    config, split = training["config"], record["split"]
    epochs = "\n".join(
        f"| {e['epoch']} | {e['loss']:.4f} | "
        f"{'-' if e['val_dice'] is None else format(e['val_dice'], '.4f')} | "
        f"{e['seconds']:.1f} |" for e in training["history"])
    return f"""# {name} {record['version']} — model card

**Fine-tuned on local data by pacsnode. Not a medical device unless its parent was; read
the parent's card (docs/README.md in this folder) for intended use and limitations.**

- Parent: version {record['parent']} ({record['parent_version']})
- Date: {record['date']}
- Weights SHA-256: `{record['weights_sha256']}`
- Training data: manifest SHA-256 `{record['data_manifest_sha256']}`
  ({split['train']} training, {split['val']} validation, {split['test']} locked test pairs;
  de-identified per PS3.15 Basic Profile; split by patient)
- Device: {training['device']}; best epoch {training['best_epoch']}
  (early stop: {training['stopped_early']})
- Settings: learning rate {config['learning_rate']}, up to {config['epochs']} epochs of
  {config['steps_per_epoch']} steps, batch {config['batch_size']}, patch
  {config['patch_size']}, trainable {config['trainable']}, augmentation {config['augment']},
  patience {config['patience']}

## Evaluation (parent vs this version)
| set | Dice parent | Dice this | HD95 parent (mm) | HD95 this (mm) |
|---|---|---|---|---|
{_row("locked local test", *_pair(metrics['locked_test']))}
{_row("regression (original domain)", *_pair(metrics['regression']))}

Gate: {'; '.join(record['gate'])}

## Training log
| epoch | loss | validation Dice | seconds |
|---|---|---|---|
{epochs}

## Limitations
- Measured on {split['test']} locked local pair(s) only; small test sets give noisy Dice.
- Labels are what people sent back as MANUAL/SEMIAUTOMATIC SEGs; their quality bounds
  this model's.
- Roll back with `pacsnode models rollback {name}`.
"""
