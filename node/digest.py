"""Content digests of stored instances.

Every instance's bytes are hashed while they arrive and the digest is kept in its index
row (``instances.digest``). A SOP Instance received again with the same digest is a
duplicate (nothing changes, nothing is processed again); with another digest it replaces
the stored one. Anyone can check a spool file against what was received: ``b3sum`` on the
file prints the same 64 hex digits.

BLAKE3 rather than SHA-256: both are cryptographic, but on the 2-core benchmark VM
BLAKE3 hashes a 512 KB CT slice in ~0.09 ms and SHA-256 (with the CPU's SHA extensions)
in ~0.29 ms; with four senders at once SHA-256 cost ~0.5 ms of the receiver's ~2.5 ms of
CPU per instance (bench/RESULTS.md, 2026-11-28). Digests are stored as
``blake3:<64 hex digits>``. Rows indexed before the change have an empty ``digest`` and
their SHA-256 in ``instances.sha256`` (:func:`same_content` compares those by SHA-256).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import blake3

PREFIX = "blake3:"


def hasher(data: bytes | bytearray | memoryview = b"") -> blake3.blake3:
    """A new hasher, fed ``data`` (more with ``update``; :func:`hexdigest` at the end).
    It releases the GIL while it hashes long inputs."""
    return blake3.blake3(data)


def hexdigest(state: blake3.blake3) -> str:
    """The stored form of a hasher's digest."""
    return PREFIX + state.hexdigest()


def digest_of(data: bytes | bytearray | memoryview) -> str:
    return hexdigest(hasher(data))


def same_content(stored_digest: str | None, stored_sha256: str | None, digest: str,
                 sha256_of_new: Callable[[], str | None]) -> bool:
    """Whether an index row (its ``digest`` and legacy ``sha256``) describes the same bytes
    as a new instance with ``digest``. A row from before BLAKE3 is compared by SHA-256;
    ``sha256_of_new`` computes that of the new bytes, only then (a rare path: an old
    instance sent again)."""
    if stored_digest:
        return stored_digest == digest
    return bool(stored_sha256) and stored_sha256 == sha256_of_new()


def sha256_of_file(path: Path) -> str | None:
    """SHA-256 of a file (for rows indexed before BLAKE3); None when it is gone."""
    try:
        with path.open("rb") as file:
            return hashlib.file_digest(file, "sha256").hexdigest()
    except FileNotFoundError:
        return None
