"""The DICOM File Format wrapper (PS3.10 Section 7): preamble, prefix, file meta group.

Built by hand because it is a handful of fixed elements and sits on the hot path of
every C-STORE; the data set that follows is stored exactly as received.
"""

from __future__ import annotations

import struct

# pacsnode's Implementation Class UID: a UUID-derived UID (PS3.5 Annex B.2).
IMPLEMENTATION_CLASS_UID = "2.25.51105144965641154879846318087701710740"
IMPLEMENTATION_VERSION_NAME = "PACSNODE_010"
_PREAMBLE = b"\x00" * 128 + b"DICM"


def _element(group_element: int, vr: bytes, value: bytes) -> bytes:
    tag = struct.pack("<HH", 0x0002, group_element)
    if vr == b"OB":
        return tag + vr + b"\x00\x00" + struct.pack("<I", len(value)) + value
    return tag + vr + struct.pack("<H", len(value)) + value


def ui_value(value: str) -> bytes:
    """A UID value as encoded: ASCII, padded to even length with one NUL (PS3.5 9.1)."""
    raw = value.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


def _text(value: str) -> bytes:
    raw = value.encode("ascii", "replace")
    return raw + b" " if len(raw) % 2 else raw


def file_header(
    sop_class_uid: str,
    sop_instance_uid: str,
    transfer_syntax_uid: str,
    *,
    source_ae_title: str | None = None,
) -> bytes:
    """Preamble, "DICM" and the file meta group for one instance (Explicit VR LE)."""
    body = b"".join((
        _element(0x0001, b"OB", b"\x00\x01"),
        _element(0x0002, b"UI", ui_value(sop_class_uid)),
        _element(0x0003, b"UI", ui_value(sop_instance_uid)),
        _element(0x0010, b"UI", ui_value(transfer_syntax_uid)),
        _element(0x0012, b"UI", ui_value(IMPLEMENTATION_CLASS_UID)),
        _element(0x0013, b"SH", _text(IMPLEMENTATION_VERSION_NAME)),
        _element(0x0016, b"AE", _text(source_ae_title)) if source_ae_title else b"",
    ))
    group_length = _element(0x0000, b"UL", struct.pack("<I", len(body)))
    return _PREAMBLE + group_length + body
