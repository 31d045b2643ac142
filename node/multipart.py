"""multipart/related bodies (RFC 2387 over RFC 2046 §5.1), as DICOMweb uses them.

Only what STOW-RS and WADO-RS need: split a body into parts, each with its own headers,
and build one. Part payloads are returned as slices of the body, never decoded.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from node.errors import PacsnodeError

_PARAM = re.compile(r';\s*([A-Za-z0-9_.-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;\s]*)')


class MultipartError(PacsnodeError):
    """A multipart body or its Content-Type cannot be read; the message says why."""


@dataclass(frozen=True)
class MediaType:
    """A Content-Type value: ``type/subtype`` (lower case) and its parameters."""

    value: str
    params: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Part:
    headers: dict[str, str]        # names in lower case
    content: bytes

    @property
    def content_type(self) -> str | None:
        value = self.headers.get("content-type")
        return parse_media_type(value).value if value else None


def parse_media_type(text: str) -> MediaType:
    """``multipart/related; type="application/dicom"; boundary=x`` → value and params."""
    head, _, rest = text.partition(";")
    params = {}
    for name, raw in _PARAM.findall(";" + rest):
        value = raw[1:-1].replace('\\"', '"') if raw.startswith('"') else raw
        params[name.lower()] = value
    return MediaType(head.strip().lower(), params)


def split(body: bytes, boundary: str) -> list[Part]:
    """The parts of ``body``; raises MultipartError naming what is wrong and where."""
    if not boundary or len(boundary) > 70:
        raise MultipartError("the Content-Type boundary parameter is missing or longer than "
                             "70 characters (RFC 2046 §5.1.1)")
    delimiter = b"\r\n--" + boundary.encode("latin-1")
    data = b"\r\n" + body
    start = data.find(delimiter)
    if start < 0:
        raise MultipartError(f"the body does not contain the boundary {boundary!r}")
    parts: list[Part] = []
    pos = start + len(delimiter)
    while True:
        if data[pos:pos + 2] == b"--":
            return parts
        line_end = data.find(b"\r\n", pos)
        if line_end < 0 or data[pos:line_end].strip(b" \t"):
            raise MultipartError(f"part {len(parts) + 1}: the boundary line is not followed "
                                 f"by CRLF")
        nxt = data.find(delimiter, line_end)
        if nxt < 0:
            raise MultipartError(f"part {len(parts) + 1}: the body ends without the closing "
                                 f"boundary '--{boundary}--'")
        parts.append(_part(data[line_end + 2:nxt], len(parts) + 1))
        pos = nxt + len(delimiter)


def _part(raw: bytes, number: int) -> Part:
    if raw.startswith(b"\r\n"):
        return Part({}, raw[2:])
    head_end = raw.find(b"\r\n\r\n")
    if head_end < 0:
        raise MultipartError(f"part {number}: no blank line ends its headers")
    headers: dict[str, str] = {}
    for line in raw[:head_end].decode("latin-1").split("\r\n"):
        name, colon, value = line.partition(":")
        if not colon or not name.strip():
            raise MultipartError(f"part {number}: header line {line[:60]!r} is not 'Name: value'")
        headers[name.strip().lower()] = value.strip()
    return Part(headers, raw[head_end + 4:])


def build(contents: Iterable[bytes], boundary: str, content_type: str) -> bytes:
    """A multipart body with one part of ``content_type`` per item."""
    out = bytearray()
    for content in contents:
        out += f"--{boundary}\r\nContent-Type: {content_type}\r\n\r\n".encode("latin-1")
        out += content
        out += b"\r\n"
    out += f"--{boundary}--\r\n".encode("latin-1")
    return bytes(out)
