"""multipart/related bodies (RFC 2387 over RFC 2046 §5.1), as DICOMweb uses them.

Only what STOW-RS and WADO-RS need: split a body into parts, each with its own headers,
and build one. Part payloads are never decoded. :func:`iter_parts` reads a body as it
arrives (STOW-RS: an upload of any size in about a megabyte of memory plus the part
being stored); :func:`split` does the same for a body already in memory.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable, Iterable, Iterator
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


Read = Callable[[int], bytes]     # read(n): up to n bytes; b"" only at the end

CHUNK = 1 << 20                    # bytes asked of ``read`` at a time
MAX_HEADERS = 64 * 1024            # a part's header block longer than this is refused


class StreamPart:
    """One part of a body being read (:func:`iter_parts`): its headers now, its content
    as it arrives (:meth:`pieces`). Read the content before asking for the next part;
    what is left unread is skipped then."""

    def __init__(self, reader: _Reader, headers: dict[str, str], number: int) -> None:
        self.headers = headers        # names in lower case
        self.number = number          # its position in the body, from 1
        self._reader = reader
        self.done = False

    @property
    def content_type(self) -> str | None:
        value = self.headers.get("content-type")
        return parse_media_type(value).value if value else None

    def pieces(self) -> Iterator[bytes]:
        """The content in pieces of at most about :data:`CHUNK` bytes, each a new bytes
        object (kept by nobody else). Raises MultipartError when the body ends first."""
        while not self.done:
            piece, self.done = self._reader.content_piece(self.number)
            if piece:
                yield piece


def iter_parts(read: Read, boundary: str) -> Iterator[StreamPart]:
    """The parts of a body read with ``read`` as they arrive, never more than about
    :data:`CHUNK` bytes held at once. Raises MultipartError as :func:`split` does, at
    the point of the body where the fault is (parts before it are given first)."""
    if not boundary or len(boundary) > 70:
        raise MultipartError("the Content-Type boundary parameter is missing or longer than "
                             "70 characters (RFC 2046 §5.1.1)")
    reader = _Reader(read, boundary)
    if not reader.skip_to_delimiter():
        raise MultipartError(f"the body does not contain the boundary {boundary!r}")
    number = 0
    while True:
        number += 1
        headers = reader.part_start(number)
        if headers is None:
            reader.drain()                  # the epilogue
            return
        part = StreamPart(reader, headers, number)
        yield part
        for _ in part.pieces():             # what the caller left unread
            pass


def split(body: bytes, boundary: str) -> list[Part]:
    """The parts of ``body``; raises MultipartError naming what is wrong and where."""
    view = io.BytesIO(body)
    return [Part(part.headers, b"".join(part.pieces()))
            for part in iter_parts(view.read, boundary)]


class _Reader:
    """A body read in chunks, searched for the delimiter ``CRLF--boundary``; a delimiter
    split across two chunks is found since the last ``len(delimiter) - 1`` bytes of the
    one are kept until the next arrives."""

    def __init__(self, read: Read, boundary: str) -> None:
        self._read = read
        self._boundary = boundary
        self._delimiter = b"\r\n--" + boundary.encode("latin-1")
        self._buffer = bytearray(b"\r\n")   # the first delimiter may start the body
        self._ended = False

    def _fill(self) -> bool:
        """Read more; False at the end of the body."""
        if self._ended:
            return False
        data = self._read(CHUNK)
        if not data:
            self._ended = True
            return False
        self._buffer += data
        return True

    def skip_to_delimiter(self) -> bool:
        """Drop the preamble and the first delimiter; False when there is none."""
        keep = len(self._delimiter) - 1
        while True:
            found = self._buffer.find(self._delimiter)
            if found >= 0:
                del self._buffer[:found + len(self._delimiter)]
                return True
            del self._buffer[:max(0, len(self._buffer) - keep)]
            if not self._fill():
                return False

    def _need(self, count: int) -> bool:
        while len(self._buffer) < count:
            if not self._fill():
                return False
        return True

    def part_start(self, number: int) -> dict[str, str] | None:
        """After a delimiter: None for the closing one, else the next part's headers."""
        self._need(2)
        if self._buffer[:2] == b"--":
            return None
        line_end = self._find(b"\r\n", 0, 1000)
        if line_end < 0 or self._buffer[:line_end].strip(b" \t"):
            raise MultipartError(f"part {number}: the boundary line is not followed by CRLF")
        del self._buffer[:line_end + 2]
        self._need(2)
        if self._buffer[:2] == b"\r\n":
            del self._buffer[:2]
            return {}
        head_end = self._find(b"\r\n\r\n", 0, MAX_HEADERS)
        delimiter = self._buffer.find(self._delimiter)
        if head_end < 0 or 0 <= delimiter < head_end + 4:     # (a delimiter's CRLF may
            # end the header block only if another CRLF comes before it)
            if 0 <= delimiter < MAX_HEADERS:
                raise MultipartError(f"part {number}: no blank line ends its headers")
            if len(self._buffer) >= MAX_HEADERS:
                raise MultipartError(f"part {number}: its headers are longer than "
                                     f"{MAX_HEADERS} bytes")
            raise self._unterminated(number)
        text = bytes(self._buffer[:head_end]).decode("latin-1")
        del self._buffer[:head_end + 4]
        headers: dict[str, str] = {}
        for line in text.split("\r\n"):
            name, colon, value = line.partition(":")
            if not colon or not name.strip():
                raise MultipartError(f"part {number}: header line {line[:60]!r} is not "
                                     f"'Name: value'")
            headers[name.strip().lower()] = value.strip()
        return headers

    def _find(self, needle: bytes, start: int, limit: int) -> int:
        """Where ``needle`` is within the first ``limit`` bytes (reading as needed), or -1."""
        while True:
            found = self._buffer.find(needle, start, limit)
            if found >= 0 or len(self._buffer) >= limit or not self._fill():
                return found

    def content_piece(self, number: int) -> tuple[bytes, bool]:
        """The next piece of a part's content and whether it was the last (the delimiter
        after it has been read)."""
        keep = len(self._delimiter) - 1
        searched = 0                        # no delimiter starts before this
        while True:
            found = self._buffer.find(self._delimiter, searched)
            if found >= 0:
                piece = bytes(self._buffer[:found])
                del self._buffer[:found + len(self._delimiter)]
                return piece, True
            searched = max(0, len(self._buffer) - keep)
            if len(self._buffer) >= CHUNK:
                cut = len(self._buffer) - keep
                piece = bytes(self._buffer[:cut])
                del self._buffer[:cut]
                return piece, False
            if not self._fill():
                raise self._unterminated(number)

    def _unterminated(self, number: int) -> MultipartError:
        return MultipartError(f"part {number}: the body ends without the closing boundary "
                              f"'--{self._boundary}--'")

    def drain(self) -> None:
        """Read (and drop) the rest of the body."""
        self._buffer.clear()
        while self._fill():
            self._buffer.clear()


def build(contents: Iterable[bytes], boundary: str, content_type: str) -> bytes:
    """A multipart body with one part of ``content_type`` per item."""
    out = bytearray()
    for content in contents:
        out += f"--{boundary}\r\nContent-Type: {content_type}\r\n\r\n".encode("latin-1")
        out += content
        out += b"\r\n"
    out += f"--{boundary}--\r\n".encode("latin-1")
    return bytes(out)
