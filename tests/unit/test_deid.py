"""De-identification of the training set: PS3.15 Annex E Basic Profile (Table E.1-1) with
the Retain Longitudinal Temporal Information with Modified Dates Option."""

from __future__ import annotations

import subprocess
from datetime import datetime
from pathlib import Path

import pydicom
import pytest
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset

from node import synth
from node.finetune.deid import Deidentifier, load_secret
from node.finetune.deid_table import BASIC_PROFILE
from tests.support import have
from tests.unit.finetune_helpers import reference_seg

SECRET = bytes(range(32))
_TEXT = {"LO", "SH", "LT", "ST", "UT", "UC", "CS"}


def _known(keyword: str, i: int) -> object:
    vr = dictionary_VR(tag_for_keyword(keyword) or 0)
    value: object
    if vr == "SQ":
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator = f"PHI{i}", "99PHI"
        item.CodeMeaning = f"identifying item {i}"
        item.PersonName = f"Item^Person{i}"
        value = [item]
    elif vr == "PN":
        value = f"Known^Person{i}"
    elif vr == "DA":
        value = f"2020{1 + i % 12:02d}{1 + i % 27:02d}"
    elif vr == "TM":
        value = f"{i % 24:02d}{i % 60:02d}17"
    elif vr == "DT":
        value = f"2020010{1 + i % 9}101112"
    elif vr == "UI":
        value = f"1.2.826.0.1.3680043.10.999.{i}"
    elif vr == "AS":
        value = "045Y"
    elif vr in _TEXT:
        value = f"KNOWN{i}"
    else:
        return None
    return value


def _filled_ct() -> tuple[Dataset, dict[str, object]]:
    study = synth.make_study(synth.SeriesSpec(slices=2, rows=16, columns=16), seed=5)
    ds = study.series[0].datasets[0]
    filled: dict[str, object] = {}
    for i, (keyword, _) in enumerate(BASIC_PROFILE):
        tag = tag_for_keyword(keyword)
        if tag is None or tag >> 16 == 0x0002:
            continue
        if keyword in ds:
            filled[keyword] = ds[keyword].value
            continue
        value = _known(keyword, i)
        if value is not None:
            setattr(ds, keyword, value)
            filled[keyword] = ds[keyword].value
    block = ds.private_block(0x0009, "HOSPITAL PHI", create=True)
    block.add_new(0x10, "LO", "PRIVATE PHI VALUE")
    ds.add_new(0x60003000, "OW", b"\x01\x00" * 8)        # overlay data
    ds.add_new(0x60004000, "LT", "overlay comment PHI")
    return ds, filled


def test_no_table_e11_attribute_keeps_its_original_value() -> None:
    ds, filled = _filled_ct()
    assert len(filled) >= 200, len(filled)        # most of the table is exercised
    out = Deidentifier(SECRET)(ds)
    kept = [k for k, v in filled.items() if k in out and str(out[k].value) == str(v)
            and str(v) != ""]
    assert kept == []
    assert not any(elem.tag.is_private for elem in out)
    assert 0x60003000 not in out and 0x60004000 not in out
    assert out.PatientIdentityRemoved == "YES"
    assert [c.CodeValue for c in out.DeidentificationMethodCodeSequence] == ["113100",
                                                                             "113107"]
    assert out.LongitudinalTemporalInformationModified == "MODIFIED"
    assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID != ds.SOPInstanceUID
    assert out.pixel_array.tobytes() == ds.pixel_array.tobytes()     # pixels untouched
    assert ds.PatientID == "SYN000005"                                # the input unchanged


def test_pseudonyms_dates_and_uids_are_consistent() -> None:
    deid = Deidentifier(SECRET)
    one = synth.make_patient(11)
    other = synth.make_patient(12)
    first = synth.make_series(synth.SeriesSpec(slices=2, rows=16, columns=16), patient=one,
                              study_instance_uid="1.2.3.1", study_date="20250101")
    later = synth.make_series(synth.SeriesSpec(slices=2, rows=16, columns=16), patient=one,
                              study_instance_uid="1.2.3.2", study_date="20250311")
    stranger = synth.make_series(synth.SeriesSpec(slices=2, rows=16, columns=16),
                                 patient=other, study_instance_uid="1.2.3.3",
                                 study_date="20250101")
    a, b, c = (deid(s.datasets[0]) for s in (first, later, stranger))
    assert a.PatientID == b.PatientID == a.PatientName != c.PatientID
    assert one.patient_id not in (a.PatientID, str(a.PatientName))
    day = "%Y%m%d"
    interval = datetime.strptime(b.StudyDate, day) - datetime.strptime(a.StudyDate, day)
    assert interval.days == 69 and a.StudyDate != "20250101"        # interval kept, moved
    assert a.StudyInstanceUID != b.StudyInstanceUID
    # the same UID maps to the same pseudonymous UID in every object: a SEG still points
    # at its (de-identified) source images
    seg = deid(reference_seg(first.datasets, first.present_mask()))
    ref = seg.ReferencedSeriesSequence[0]
    assert ref.SeriesInstanceUID == a.SeriesInstanceUID
    referenced = {i.ReferencedSOPInstanceUID for i in ref.ReferencedInstanceSequence}
    assert referenced and referenced <= {deid(ds).SOPInstanceUID for ds in first.datasets}
    assert seg.FrameOfReferenceUID == a.FrameOfReferenceUID
    assert Deidentifier(b"another secret 16b")(first.datasets[0]).PatientID != a.PatientID


def test_secret_is_created_once_and_private(tmp_path: Path) -> None:
    path = tmp_path / "var" / "deid.key"
    key = load_secret(path)
    assert len(key) == 32 and load_secret(path) == key
    assert path.stat().st_mode & 0o077 == 0


@pytest.mark.skipif(not have("dciodvfy"), reason="dicom3tools not installed")
def test_deidentified_ct_and_seg_pass_dciodvfy(tmp_path: Path) -> None:
    series = synth.make_study(synth.SeriesSpec(slices=3, rows=32, columns=32), seed=9).series[0]
    deid = Deidentifier(SECRET)
    ct = deid(series.datasets[0])
    seg = deid(reference_seg(series.datasets, series.present_mask()))
    for name, ds in (("ct", ct), ("seg", seg)):
        path = tmp_path / f"{name}.dcm"
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
        out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True,
                             check=False)
        errors = [line for line in (out.stdout + out.stderr).splitlines() if "Error" in line]
        assert errors == [], (name, errors)
