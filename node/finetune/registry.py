"""Model versions: immutable bundle copies, an atomic pointer to the active one, rollback.

Layout (``[finetune] registry``, default ``var/models``)::

    <model>/versions/<n>/   bundle (configs/, models/, docs/), version.json, MODEL_CARD.md
    <model>/active.json     {"version": n}, replaced atomically

Version 1 is a copy of the configured bundle, made on the first fine-tune. Files of a
version are made read-only once written. This module imports no torch: the worker and the
CLI resolve the active version with it.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from node.errors import ModelError
from node.settings import ModelSettings, Settings


def registry_root(settings: Settings) -> Path:
    return settings.finetune.registry or settings.storage.spool.parent / "models"


@dataclass(frozen=True)
class VersionInfo:
    number: int
    path: Path
    meta: dict[str, Any]

    @property
    def version(self) -> str:
        return str(self.meta.get("version", "?"))


class Registry:
    def __init__(self, root: Path, name: str) -> None:
        self.root = root / name
        self.name = name
        self.versions_dir = self.root / "versions"
        self.pointer = self.root / "active.json"

    def versions(self) -> list[VersionInfo]:
        if not self.versions_dir.is_dir():
            return []
        out = []
        for child in self.versions_dir.iterdir():
            if child.name.isdigit() and (child / "version.json").is_file():
                out.append(VersionInfo(int(child.name), child,
                                       json.loads((child / "version.json").read_text())))
        return sorted(out, key=lambda v: v.number)

    def get(self, number: int) -> VersionInfo:
        for v in self.versions():
            if v.number == number:
                return v
        raise ModelError(f"model {self.name}: no version {number} in {self.versions_dir} "
                         f"(have {[v.number for v in self.versions()]})")

    def active(self) -> VersionInfo | None:
        if not self.pointer.is_file():
            return None
        try:
            number = int(json.loads(self.pointer.read_text())["version"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelError(f"model {self.name}: unreadable pointer {self.pointer}: {exc}") \
                from exc
        return self.get(number)

    def set_active(self, number: int) -> None:
        self.get(number)
        temp = self.pointer.with_name(".active.json.part")
        with temp.open("w") as fh:
            json.dump({"version": number}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(temp, self.pointer)

    def add(self, bundle: Path, meta: dict[str, Any], card: str) -> VersionInfo:
        """Copy ``bundle`` in as the next version (not yet active), read-only."""
        number = max((v.number for v in self.versions()), default=0) + 1
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        staging = self.versions_dir / f".staging-{number}"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(bundle, staging, ignore=shutil.ignore_patterns("version.json",
                                                                       "MODEL_CARD.md"))
        meta = {**meta, "number": number}
        (staging / "version.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        (staging / "MODEL_CARD.md").write_text(card)
        for path in staging.rglob("*"):
            if path.is_file():
                path.chmod(stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
        os.replace(staging, self.versions_dir / str(number))
        return self.get(number)

    def rollback(self, to: int | None = None) -> VersionInfo:
        """Make ``to`` (default: the active version's parent) the active version."""
        current = self.active()
        if to is None:
            if current is None or current.meta.get("parent") is None:
                raise ModelError(f"model {self.name}: nothing to roll back to (active version "
                                 f"{current.number if current else 'none'} has no parent)")
            to = int(current.meta["parent"])
        self.set_active(to)
        return self.get(to)


def active_model_settings(settings: Settings) -> tuple[ModelSettings, ...]:
    """The configured models, each pointed at its active registry version if it has one
    (the version string then comes from that version's bundle metadata)."""
    root = registry_root(settings)
    out = []
    for model in settings.models:
        active = Registry(root, model.name).active() if model.format == "monai_bundle" \
            else None
        out.append(model if active is None else
                   model.model_copy(update={"path": active.path, "version": None}))
    return tuple(out)
