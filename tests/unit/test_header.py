"""The fast header reader against pydicom's, on pydicom's own test files and ours.

Where the fast reader answers at all it must give exactly pydicom's header; where it gives
up, ``read_header`` falls back to pydicom. It must answer for the common case (our
synthetic CT/MR and pydicom's CT_small/MR_small in both little-endian transfer syntaxes,
with undefined-length sequences in the header) or it buys nothing.
"""

from __future__ import annotations

import io
from pathlib import Path

import pydicom
import pydicom.data
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from node import synth
from node.errors import InvalidInstanceError
from node.header import read_header, read_header_fast, read_header_pydicom


def _pydicom_or_error(data: bytes) -> object:
    try:
        return read_header_pydicom(data)
    except InvalidInstanceError as exc:
        return exc


TEST_FILES = Path(pydicom.data.__file__).parent / "test_files"  # no downloads


def test_fast_reader_agrees_with_pydicom_on_every_test_file() -> None:
    answered, files = 0, sorted(p for p in TEST_FILES.rglob("*") if p.is_file())
    assert len(files) > 50
    for path in files:
        data = Path(path).read_bytes()
        fast = read_header_fast(data)
        if fast is None:
            continue
        answered += 1
        assert fast == _pydicom_or_error(data), path
    assert answered >= 20, f"fast reader answered only {answered} of {len(files)} files"


def _encoded(ds: Dataset, syntax: str) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(_plain(ds)), force=True)
    ds.file_meta.TransferSyntaxUID = syntax
    out = io.BytesIO()
    ds.save_as(out, implicit_vr=syntax == ImplicitVRLittleEndian, little_endian=True,
               enforce_file_format=True)
    return out.getvalue()


def _plain(ds: Dataset) -> bytes:
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_fast_reader_answers_the_common_case(syntax: str) -> None:
    ct = synth.make_study(synth.SeriesSpec(slices=2, rows=16, columns=16), seed=3)
    mr = synth.make_study(synth.SeriesSpec(modality="MR", slices=2, rows=16, columns=16),
                          seed=4)
    samples = [ct.series[0].datasets[0], mr.series[0].datasets[1],
               pydicom.dcmread(TEST_FILES / "CT_small.dcm"),
               pydicom.dcmread(TEST_FILES / "MR_small.dcm")]
    # an undefined-length sequence, nested, before the attributes read (group 0008)
    nested = Dataset()
    nested.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    inner = Dataset()
    inner.CodeValue, inner.CodingSchemeDesignator, inner.CodeMeaning = "1", "99X", "x\\y"
    nested.PurposeOfReferenceCodeSequence = Sequence([inner])
    with_sequence = ct.series[0].datasets[1]
    with_sequence.ReferencedImageSequence = Sequence([nested, Dataset()])
    for parent, keyword in ((with_sequence, "ReferencedImageSequence"),
                            (nested, "PurposeOfReferenceCodeSequence")):
        parent[keyword].is_undefined_length = True
        for item in parent[keyword].value:
            item.is_undefined_length_sequence_item = True
    samples.append(with_sequence)
    for ds in samples:
        data = _encoded(ds, syntax)
        fast = read_header_fast(data)
        assert fast is not None, ds.SOPInstanceUID
        assert fast == read_header_pydicom(data)
        assert fast.transfer_syntax_uid == syntax
    assert b"\xff\xff\xff\xff" in _encoded(with_sequence, syntax)  # undefined lengths


def test_fast_reader_gives_up_and_pydicom_explains() -> None:
    ds = synth.make_study(synth.SeriesSpec(slices=1, rows=16, columns=16), seed=5) \
        .series[0].datasets[0]
    good = _encoded(ds, ExplicitVRLittleEndian)
    # multi-valued where one value is expected, and a character set it does not decode
    for keyword, value in (("Modality", "CT\\MR"), ("SpecificCharacterSet", "ISO_IR 144")):
        odd = pydicom.dcmread(io.BytesIO(good))
        setattr(odd, keyword, value)
        data = _plain(odd)
        assert read_header_fast(data) is None
        assert read_header(data) == read_header_pydicom(data)
    # truncated inside the header: the fast reader declines, pydicom names the problem
    cut = good[:good.index(b"\x20\x00\x0d\x00") + 12]
    assert read_header_fast(cut) is None
    del ds.SeriesInstanceUID
    with pytest.raises(InvalidInstanceError, match="SeriesInstanceUID"):
        read_header(_encoded(ds, ExplicitVRLittleEndian))


def test_start_only_answers_from_the_start_of_an_instance_or_not_at_all() -> None:
    """The C-STORE fast path reads the header from the first fragment: an answer must be
    the one the whole instance gives, and none unless every element before the pixel data
    was in the part seen."""
    ds = synth.make_study(synth.SeriesSpec(slices=1, rows=64, columns=64), seed=9) \
        .series[0].datasets[0]
    data = _encoded(ds, ExplicitVRLittleEndian)
    pixels = data.index(b"\xe0\x7f\x10\x00")           # (7FE0,0010) starts here
    whole = read_header(data)
    assert read_header_fast(data[:pixels + 12], start_only=True) == whole
    assert read_header_fast(data, start_only=True) == whole
    # cut anywhere before the pixel data: the rest could change the answer
    for cut in (200, pixels // 2, pixels - 1, pixels):
        assert read_header_fast(data[:cut], start_only=True) is None, cut
    # a cut at an element boundary reads "fine" as a whole instance, but not as a start
    boundary = data.index(b"\x20\x00\x13\x00")         # InstanceNumber (0020,0013)
    assert read_header_fast(data[:boundary]) is not None
    assert read_header_fast(data[:boundary], start_only=True) is None
    # no pixel data at all (an SR, say): only the whole instance answers
    del ds.PixelData
    no_pixels = _encoded(ds, ExplicitVRLittleEndian)
    assert read_header_fast(no_pixels, start_only=True) is None
    assert read_header_fast(no_pixels) == read_header_pydicom(no_pixels)
