from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest

from node.cli import main


def test_synth_writes_a_readable_series_with_ground_truth(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "mr"
    code = main(["synth", "--modality", "MR", "--slices", "8", "--size", "48", "--omit", "3",
                 "--lesion", "0,0,0,6,900", "--out", str(out), "--json"])
    assert code == 0
    info = json.loads(capsys.readouterr().out)
    assert info["files"] == 7
    files = sorted(out.rglob("*.dcm"))
    assert len(files) == 7
    ds = pydicom.dcmread(files[0])
    assert ds.Modality == "MR" and ds.ImagesInAcquisition == 8
    assert {int(pydicom.dcmread(f).InstanceNumber) for f in files} == {1, 2, 4, 5, 6, 7, 8}
    assert info["series"][0]["lesion_volume_mm3"] > 0


def test_bad_lesion_argument_is_a_clear_error(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["synth", "--lesion", "1,2", "--out", str(tmp_path)]) == 2
    assert "lesion" in capsys.readouterr().err


def test_usage_error_exit_code() -> None:
    with pytest.raises(SystemExit) as exc:
        main(["jobs", "frobnicate"])
    assert exc.value.code == 2
