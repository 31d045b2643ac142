"""Instance digests (node/digest.py): BLAKE3, and index rows from before BLAKE3 (SHA-256)
still tell a resend of the same bytes from a new version."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import blake3
import pytest
from sqlalchemy import inspect, text
from sqlalchemy.orm import Session

from node.db import InstanceRow, make_engine
from node.digest import digest_of, same_content
from node.domain import StoreResultValues
from tests.unit.helpers import Rig, encode, small_series

# BLAKE3 of the empty input, from the BLAKE3 specification's test vectors.
EMPTY = "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"


def test_digest_is_blake3_with_its_name() -> None:
    assert digest_of(b"") == "blake3:" + EMPTY
    data = os.urandom(100_000)
    assert digest_of(memoryview(data)) == "blake3:" + blake3.blake3(data).hexdigest()


def test_same_content_uses_sha256_only_for_old_rows() -> None:
    asked: list[int] = []

    def sha256_of_new() -> str:
        asked.append(1)
        return "aa"

    assert same_content("blake3:x", "", "blake3:x", sha256_of_new)
    assert not same_content("blake3:x", "aa", "blake3:y", sha256_of_new)
    assert asked == []                      # a BLAKE3 row never reads the new file
    assert same_content(None, "aa", "blake3:y", sha256_of_new)
    assert not same_content("", "bb", "blake3:y", sha256_of_new)
    assert not same_content(None, "", "blake3:y", sha256_of_new)   # nothing to compare
    assert len(asked) == 2


def _make_legacy(rig: Rig, uid: str, data: bytes) -> None:
    """Turn the row of ``uid`` into one written before BLAKE3: SHA-256, no digest."""
    with rig.engine.begin() as conn:
        conn.execute(text("UPDATE instances SET digest = NULL, sha256 = :sha "
                          "WHERE sop_instance_uid = :uid"),
                     {"sha": hashlib.sha256(data).hexdigest(), "uid": uid})


@pytest.mark.parametrize("state", ["receiving", "complete"])
def test_resend_of_an_instance_indexed_with_sha256(tmp_path: Path, state: str) -> None:
    """Same bytes again: a duplicate, nothing reopened. Other bytes: replaced, and the
    row then has the new BLAKE3 digest. ``receiving`` takes the SQLite fast path,
    ``complete`` the general one."""
    rig = Rig(tmp_path)
    ds = small_series(1).datasets[0]
    data = encode(ds)
    assert rig.intake.store(data).result is StoreResultValues.STORED
    _make_legacy(rig, ds.SOPInstanceUID, data)
    if state == "complete":
        with rig.engine.begin() as conn:
            conn.execute(text("UPDATE studies SET state = 'complete'"))
            conn.execute(text("UPDATE series SET state = 'complete'"))

    assert rig.intake.store(data).result is StoreResultValues.DUPLICATE
    with Session(rig.engine) as s:
        row = s.get(InstanceRow, ds.SOPInstanceUID)
        assert row is not None and row.digest is None       # untouched
        states = set(s.execute(text("SELECT state FROM series")).scalars())
    assert states == {"receiving" if state == "receiving" else "complete"}

    ds.SeriesDescription = "corrected"
    changed = encode(ds)
    assert rig.intake.store(changed).result is StoreResultValues.REPLACED
    with Session(rig.engine) as s:
        row = s.get(InstanceRow, ds.SOPInstanceUID)
        assert row is not None
        assert (row.digest, row.sha256) == (digest_of(changed), "")
    assert (rig.spool.root / row.path).read_bytes() == changed


def test_an_index_from_before_digests_gains_the_column(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'index.db'}"
    rig = Rig(tmp_path)
    ds = small_series(1).datasets[0]
    data = encode(ds)
    rig.intake.store(data)
    _make_legacy(rig, ds.SOPInstanceUID, data)
    rig.intake.close()
    with rig.engine.begin() as conn:        # as the table was before the column
        conn.execute(text("ALTER TABLE instances DROP COLUMN digest"))
    rig.engine.dispose()

    engine = make_engine(url)
    assert "digest" in {c["name"] for c in inspect(engine).get_columns("instances")}
    with Session(engine) as s:
        row = s.get(InstanceRow, ds.SOPInstanceUID)
        assert row is not None
        assert (row.digest, row.sha256) == (None, hashlib.sha256(data).hexdigest())
    engine.dispose()
