"""multipart/related: what DICOMweb bodies look like, and the errors for broken ones."""

from __future__ import annotations

import io
import os
from collections.abc import Callable

import pytest

from node.multipart import (
    CHUNK,
    MAX_HEADERS,
    MultipartError,
    build,
    iter_parts,
    parse_media_type,
    split,
)


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


def _reader(body: bytes, at_most: int) -> Callable[[int], bytes]:
    """read(n) over ``body`` that gives at most ``at_most`` bytes a call (as a socket may)."""
    view = io.BytesIO(body)
    return lambda n: view.read(min(n, at_most))


# contents near the delimiter (CRLF--xyz) that are not one
TRICKY = [b"", b"\r\n", b"\r\n--", b"\r\n--xy", b"-xyz", b"\r\n--xyq\r\n-", b"x\r\n--xy\r\n",
          bytes(range(256)) * 3, b"\r"]


@pytest.mark.parametrize("at_most", [1, 2, 3, 5, 7, 64, 1 << 22])
def test_parts_read_as_they_arrive_are_those_of_the_whole_body(at_most: int) -> None:
    body = b"a preamble\r\n" + build(TRICKY, "xyz", "application/dicom") + b"an epilogue"
    parts = [(p.number, p.content_type, b"".join(p.pieces()))
             for p in iter_parts(_reader(body, at_most), "xyz")]
    assert parts == [(i, "application/dicom", t) for i, t in enumerate(TRICKY, start=1)]


def test_a_large_part_comes_in_bounded_pieces_while_the_body_is_read() -> None:
    big = os.urandom(5 * CHUNK + 123)
    body = build([big, b"tail"], "xyz", "application/dicom")
    stream = io.BytesIO(body)
    pieces: list[bytes] = []
    for part in iter_parts(stream.read, "xyz"):
        for piece in part.pieces():
            pieces.append(piece)
            # never more than two chunks read ahead of what has been handed out
            handed = sum(map(len, pieces))
            assert stream.tell() - handed <= 2 * CHUNK + 200
    assert b"".join(pieces) == big + b"tail"
    assert len(pieces) >= 5 and max(map(len, pieces)) <= 2 * CHUNK


def test_a_part_is_handed_out_before_the_rest_of_the_body_is_read() -> None:
    first = build([b"first"], "xyz", "application/dicom").removesuffix(b"--\r\n")
    calls = [first]

    def read(n: int) -> bytes:
        if not calls:
            raise ConnectionError("the sender went away")
        return calls.pop(0)

    parts = iter_parts(read, "xyz")
    assert b"".join(next(parts).pieces()) == b"first"     # complete without more reads
    with pytest.raises(ConnectionError):
        next(parts)


def test_headers_that_end_in_the_delimiter_are_refused() -> None:
    with pytest.raises(MultipartError, match="no blank line ends its headers"):
        split(b"--xyz\r\nContent-Type: a\r\n\r\n--xyz--", "xyz")
    with pytest.raises(MultipartError, match="headers are longer than"):
        split(b"--xyz\r\nX: " + b"y" * (MAX_HEADERS + 10) + b"\r\n\r\nz\r\n--xyz--", "xyz")
