from __future__ import annotations

import io

import pydicom
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, JPEG2000Lossless

from node.part10 import IMPLEMENTATION_CLASS_UID, file_header
from tests.unit.helpers import encode, small_series


def test_file_header_reads_back_as_valid_file_meta() -> None:
    header = file_header(CTImageStorage, "1.2.3.45", JPEG2000Lossless, source_ae_title="MODALITY")
    ds = pydicom.dcmread(io.BytesIO(header), force=True)
    meta = ds.file_meta
    assert meta.MediaStorageSOPClassUID == CTImageStorage
    assert meta.MediaStorageSOPInstanceUID == "1.2.3.45"
    assert meta.TransferSyntaxUID == JPEG2000Lossless
    assert meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID
    assert meta.SourceApplicationEntityTitle == "MODALITY"
    assert meta.FileMetaInformationVersion == b"\x00\x01"
    assert meta.FileMetaInformationGroupLength == len(header) - 132 - 12


def test_header_plus_received_data_set_is_a_readable_part10_file() -> None:
    ds = small_series(1).datasets[0]
    full = encode(ds)
    meta_len = int(pydicom.dcmread(io.BytesIO(full), stop_before_pixels=True)
                   .file_meta.FileMetaInformationGroupLength)
    dataset_part = full[132 + 12 + meta_len:]
    rebuilt = file_header(ds.SOPClassUID, ds.SOPInstanceUID, ExplicitVRLittleEndian) + dataset_part
    back = pydicom.dcmread(io.BytesIO(rebuilt))
    assert back.SOPInstanceUID == ds.SOPInstanceUID
    assert back.pixel_array.shape == (32, 32)
    assert (back.pixel_array == ds.pixel_array).all()
