"""Two processes index instances of one new series into one SQLite index at once, as
the receiver and a listener child do (node/listener.py): every instance is indexed
exactly once, the study and series rows are created once, and no store fails."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import blake3
import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from node.db import InstanceRow, SeriesRow, StudyRow, make_engine
from node.spool import Spool
from tests.support import ROOT
from tests.unit.helpers import encode, small_series

_STORER = """
import json, sys, time
from pathlib import Path
from node.db import make_engine
from node.intake import Intake
from node.spool import Spool
root, db, go, staging, *files = sys.argv[1:]
spool = Spool(Path(root), staging=staging)
spool.prepare()
intake = Intake(spool, make_engine(f"sqlite:///{db}"))
datas = [Path(f).read_bytes() for f in files]
print("ready", flush=True)
while not Path(go).exists():
    time.sleep(0.001)
results = [intake.store(d).result.value for d in datas]
intake.close()
print(json.dumps(results), flush=True)
"""


def _run_two(tmp_path: Path, first: list[Path], second: list[Path]) -> list[list[str]]:
    root, db, go = tmp_path / "spool", tmp_path / "index.db", tmp_path / "go"
    make_engine(f"sqlite:///{db}").dispose()       # the tables, before either starts
    procs = [subprocess.Popen([sys.executable, "-c", _STORER, str(root), str(db), str(go),
                               f"p{i}", *map(str, files)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              cwd=ROOT)
             for i, files in enumerate((first, second))]
    try:
        for proc in procs:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "ready", proc.stderr
        go.touch()
        outs = [proc.communicate(timeout=120) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for proc, (_, err) in zip(procs, outs):
        assert proc.returncode == 0, err[-3000:]
    return [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]


def _files(tmp_path: Path, n: int) -> tuple[str, list[Path]]:
    series = small_series(n, seed=11)
    folder = tmp_path / "in"
    folder.mkdir()
    paths = []
    for i, ds in enumerate(series.datasets):
        path = folder / f"{i:03d}.dcm"
        path.write_bytes(encode(ds))
        paths.append(path)
    return series.series_instance_uid, paths


def _index(tmp_path: Path) -> tuple[int, int, list[tuple[str, str, str]]]:
    engine = make_engine(f"sqlite:///{tmp_path / 'index.db'}")
    with Session(engine) as s:
        studies = int(s.scalar(select(func.count()).select_from(StudyRow)) or 0)
        series = int(s.scalar(select(func.count()).select_from(SeriesRow)) or 0)
        rows = [(r.sop_instance_uid, r.path, r.digest) for r in s.scalars(select(InstanceRow))]
    engine.dispose()
    return studies, series, rows


@pytest.mark.parametrize("split", ["interleaved", "same instances"])
def test_two_processes_index_one_new_series_at_once(tmp_path: Path, split: str) -> None:
    n = 40
    series_uid, files = _files(tmp_path, n)
    if split == "interleaved":      # each half of the series, both creating its rows
        first, second = files[0::2], files[1::2]
    else:                           # both send every instance: duplicates across processes
        first, second = files, list(reversed(files))
    t0 = time.monotonic()
    results = _run_two(tmp_path, first, second)
    assert time.monotonic() - t0 < 60
    studies, series, rows = _index(tmp_path)
    assert (studies, series) == (1, 1)
    assert len(rows) == n and len({uid for uid, _, _ in rows}) == n
    spool = Spool(tmp_path / "spool")
    assert sorted(spool.iter_files()) == sorted(path for _, path, _ in rows)
    for _, path, digest in rows:
        data = (spool.root / path).read_bytes()
        assert digest == "blake3:" + blake3.blake3(data).hexdigest()
    flat = results[0] + results[1]
    if split == "interleaved":
        assert flat == ["stored"] * n
    else:   # each instance stored by exactly one process, the other saw a duplicate
        assert sorted(flat) == ["duplicate"] * n + ["stored"] * n
    with Session(make_engine(f"sqlite:///{tmp_path / 'index.db'}")) as s:
        row = s.get(SeriesRow, series_uid)
        assert row is not None and row.state == "receiving" and row.generation == 1
