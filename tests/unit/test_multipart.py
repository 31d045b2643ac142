"""multipart/related: what DICOMweb bodies look like, and the errors for broken ones."""

from __future__ import annotations

import pytest

from node.multipart import MultipartError, build, parse_media_type, split


def test_round_trip_keeps_binary_payloads_exactly() -> None:
    payloads = [b"\x00\r\n--not-the-boundary\r\n\xff", b"", b"second"]
    body = build(payloads, "xyz", "application/dicom")
    parts = split(b"preamble to ignore\r\n" + body + b"epilogue", "xyz")
    assert [p.content for p in parts] == payloads
    assert {p.content_type for p in parts} == {"application/dicom"}


def test_media_type_parameters_quoted_or_not() -> None:
    media = parse_media_type('Multipart/Related; type="application/dicom"; boundary=a;b=c')
    assert media.value == "multipart/related"
    assert media.params == {"type": "application/dicom", "boundary": "a", "b": "c"}


@pytest.mark.parametrize(("body", "boundary", "message"), [
    (b"--xyz\r\n\r\nabc\r\n", "xyz", "without the closing boundary"),
    (b"no delimiter here", "xyz", "does not contain the boundary"),
    (b"--xyz\r\nContent-Type application/dicom\r\n\r\nabc\r\n--xyz--", "xyz",
     "is not 'Name: value'"),
    (b"--xyz junk\r\n\r\nabc\r\n--xyz--", "xyz", "not followed by CRLF"),
    (b"", "", "boundary parameter is missing"),
])
def test_broken_bodies_are_refused_with_the_reason(body: bytes, boundary: str,
                                                    message: str) -> None:
    with pytest.raises(MultipartError, match=message):
        split(body, boundary)
